# CM3Leon reproduction: the commands a user types. Every target installs first when needed.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install lint format test test-slow demo data bench eval-fid notebook world-model sft figures world-cfg world-cfg-paired tokenizers clean-data help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install: $(STAMP)  ## create .venv from requirements.txt (pinned)

$(STAMP): requirements.txt requirements.lock pyproject.toml
	test -d .venv || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt -c requirements.lock
	.venv/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: install  ## ruff: lint and format check (config in pyproject.toml)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: install  ## ruff: fix what can be fixed and format the tree
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

test: install  ## the default test suite (CPU, ~10 min on 2 cores)
	$(PY) -m pytest -q

test-slow: install  ## the heavier tests too
	$(PY) -m pytest -q -m "slow or not slow"

# The demo's second half samples the shipped world model (data/shipped/world_lm.safetensors, `make
# world-model`): 64 validation captions, best of 4 samples by CLIP score, top-p 0.3 with CFG 3.
SHIPPED_LM := data/shipped/world_lm.safetensors
DEMO_SAMPLES := logs/demo/shipped_world_model
demo: install  ## the main job: train the tiny model on the embedded world (~5 min), then sample the shipped world model (~2 min)
	$(PY) src/train.py
	$(PY) src/eval_fid.py ckpt=$(SHIPPED_LM) eval=embedded eval.n_captions=64 eval.samples_per_caption=4 \
		decoding.top_p=0.3 decoding.guidance_scale=3 progress=false out_dir=$(DEMO_SAMPLES)

data: install  ## generate the embedded world and its token shards
	$(PY) src/make_world.py
	$(PY) src/preprocess.py

bench: install  ## hot-path benchmarks against their peers, printed as JSON
	$(PY) src/bench.py

gpu-check: install  ## the prepared GPU check (one H100/H200, ~8 min): JSON + Markdown in logs/gpu_check/
	$(PY) src/gpu_check.py --out logs/gpu_check

notebook: install  ## execute notebooks/evaluate.ipynb headless (the shipped world model by default); output in logs/notebooks/
	$(PY) notebooks/execute.py notebooks/evaluate.ipynb

eval-fid: install  ## zero-shot FID (see README "Evaluation"); pass ARGS="ckpt=... eval=coco30k"
	$(PY) src/eval_fid.py $(ARGS)

WORLD_RUN := logs/train/world_long
# conf/experiment/world_long.yaml ends at step 6000; the README's model resumes it to WORLD_STEPS
# (the LR schedule is recomputed for the new length, so it jumps from 0.1x back to 0.56x of the peak)
WORLD_STEPS := 12000
WORLD_CKPT_6K = $(WORLD_RUN)/checkpoints/step_0006000.ckpt
WORLD_CKPT = $(WORLD_RUN)/checkpoints/step_00$(WORLD_STEPS).ckpt
WORLD_EVAL = $(PY) src/eval_fid.py -m ckpt=$(WORLD_CKPT) eval=embedded eval.n_captions=200 eval.samples_per_caption=1 eval.rerank.enabled=false
world-cfg: install  ## the README's CFG table: train experiment=world_long to 12,000 steps (~3.3 h on 2 CPU cores), then 9 decodings (~8 min)
	test -f $(WORLD_CKPT_6K) || $(PY) src/train.py experiment=world_long hydra.run.dir=$(WORLD_RUN)
	test -f $(WORLD_CKPT) || $(PY) src/train.py experiment=world_long trainer.max_steps=$(WORLD_STEPS) \
		ckpt_path=$(WORLD_CKPT_6K) hydra.run.dir=$(WORLD_RUN)
	$(WORLD_EVAL) decoding=topp_cfg decoding.guidance_scale=1,3 decoding.truncate_on=guided 'out_dir=$(WORLD_RUN)/eval/topp_cfg$${decoding.guidance_scale}'
	$(WORLD_EVAL) decoding=topp_cfg decoding.guidance_scale=3 'out_dir=$(WORLD_RUN)/eval/topp_cfg$${decoding.guidance_scale}_conditional'
	$(WORLD_EVAL) decoding=topp_cfg decoding.top_p=0.5 decoding.guidance_scale=1,3 'out_dir=$(WORLD_RUN)/eval/topp0.5_cfg$${decoding.guidance_scale}_conditional'
	$(WORLD_EVAL) decoding=topp_cfg decoding.top_p=0.3 decoding.guidance_scale=1,3 'out_dir=$(WORLD_RUN)/eval/topp0.3_cfg$${decoding.guidance_scale}_conditional'
	$(WORLD_EVAL) decoding=cdk decoding.guidance_scale=1,3 'out_dir=$(WORLD_RUN)/eval/cdk_cfg$${decoding.guidance_scale}'
	$(PY) src/eval_table.py $(WORLD_RUN)/eval

SHIPPED_RUN := logs/train/world_shipped
# bf16 autocast only where the CPU has native bf16 (cm3leon.utils.cpu_training_precision); expanded when
# the recipe runs, after install
CPU_PRECISION = $(shell $(PY) -c "from cm3leon.utils import cpu_training_precision as p; print(p())")
world-model: install  ## train the shipped world model (world_long to 8,000 steps, one schedule, ~1.5-2 h on 2 cores; rerun to resume) and write $(SHIPPED_LM)
	$(PY) src/train.py experiment=world_long trainer.max_steps=8000 trainer.precision=$(CPU_PRECISION) \
		callbacks.model_checkpoint.every_n_train_steps=500 hydra.run.dir=$(SHIPPED_RUN) ckpt_path=last
	$(PY) src/convert_checkpoint.py src=$(SHIPPED_RUN)/checkpoints/step_0008000.ckpt dst=$(SHIPPED_LM)

SHIPPED_SFT := data/shipped/world_sft.safetensors
SFT_RUN := logs/train/sft_world
SFT_EDIT_RUN := logs/train/sft_world_edit
SFT_EVAL := logs/eval_sft
sft: install  ## instruction tuning of the shipped world model in two stages (experiment=sft_world, then sft_world_edit: ~25 min of data, ~2 h of training on 2 cores; rerun to resume), $(SHIPPED_SFT), then base vs SFT on 500 val samples per task: docs/figures/sft.*
	$(PY) src/train.py experiment=sft_world trainer.precision=$(CPU_PRECISION) hydra.run.dir=$(SFT_RUN) ckpt_path=last
	$(PY) src/train.py experiment=sft_world_edit ckpt_init=$(SFT_RUN)/checkpoints/last.ckpt trainer.precision=$(CPU_PRECISION) hydra.run.dir=$(SFT_EDIT_RUN) ckpt_path=last
	$(PY) src/convert_checkpoint.py src=$(SFT_EDIT_RUN)/checkpoints/last.ckpt dst=$(SHIPPED_SFT)
	$(PY) src/eval_sft.py ckpt=$(SHIPPED_LM) out_dir=$(SFT_EVAL)/base
	$(PY) src/eval_sft.py ckpt=$(SHIPPED_SFT) out_dir=$(SFT_EVAL)/sft
	$(PY) src/eval_sft.py compare=[$(SFT_EVAL)/base,$(SFT_EVAL)/sft]

figures: install  ## the paper's claims in miniature (README "Claims"): docs/figures/*.png; trains the figure models first (hours on CPU), resumes when rerun
	$(PY) src/figures.py

WORLD_PAIRED = $(WORLD_RUN)/eval1000
world-cfg-paired: install  ## after world-cfg: CFG 3 vs none, caption by caption, 1,000 val captions x 2 seeds (~20 min)
	$(PY) src/eval_fid.py -m ckpt=$(WORLD_CKPT) eval=embedded eval.n_captions=1000 eval.samples_per_caption=1 \
		eval.rerank.enabled=false seed=0,1 decoding=topp_cfg decoding.top_p=0.3 decoding.guidance_scale=1,3 \
		'out_dir=$(WORLD_PAIRED)/topp0.3_seed$${seed}_cfg$${decoding.guidance_scale}_conditional'
	$(PY) src/eval_paired.py $(foreach s,0 1,$(WORLD_PAIRED)/topp0.3_seed$(s)_cfg1_conditional $(WORLD_PAIRED)/topp0.3_seed$(s)_cfg3_conditional)

VQ_RUN := logs/train_tokenizer/world_vqgan
VQ_DECODER_STEPS := 3000
tokenizers: install  ## rebuild the shipped tiny tokenizers from the embedded world (~2 h on 2 CPU cores)
	$(PY) src/make_world.py
	$(PY) src/train_bpe.py overwrite=true
	# the shipped VQGAN's schedule: (1) a 512-code model, 2000 steps of a 3000-step cosine, then a
	# 6000-step cosine to step 4000; (2) its codebook split into 2048 codes, 2000 steps; (3) the
	# decoder alone (codes frozen) $(VQ_DECODER_STEPS) steps
	$(PY) src/train_tokenizer.py hydra.run.dir=$(VQ_RUN)/512 tokenizer.n_embed=512 trainer.max_steps=2000 \
		module.optim.total_steps=3000
	$(PY) src/train_tokenizer.py hydra.run.dir=$(VQ_RUN)/512 tokenizer.n_embed=512 trainer.max_steps=4000 \
		module.optim.total_steps=6000 ckpt_path=$(VQ_RUN)/512/checkpoints/last.ckpt export_to=$(VQ_RUN)/vqgan_512.ckpt overwrite=true
	$(PY) src/train_tokenizer.py hydra.run.dir=$(VQ_RUN)/2048 init_from=$(VQ_RUN)/vqgan_512.ckpt \
		trainer.max_steps=2000 module.optim.lr=5e-4 export_to=$(VQ_RUN)/vqgan_2048.ckpt overwrite=true
	$(PY) src/train_tokenizer.py hydra.run.dir=$(VQ_RUN)/decoder init_from=$(VQ_RUN)/vqgan_2048.ckpt \
		module.decoder_only=true trainer.max_steps=$(VQ_DECODER_STEPS) module.optim.lr=3e-4 \
		export_to=data/shipped/world_vqgan.ckpt overwrite=true

clean-data:  ## remove generated data (the shipped artefacts stay)
	rm -rf data/world
