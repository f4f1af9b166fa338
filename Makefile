# CM3Leon reproduction: the commands a user types. Every target installs first when needed.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install test test-slow demo data bench eval-fid tokenizers clean-data help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install: $(STAMP)  ## create .venv from requirements.txt (pinned)

$(STAMP): requirements.txt requirements.lock
	test -d .venv || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt -c requirements.lock
	touch $(STAMP)

test: install  ## the default test suite (CPU, ~10 min on 2 cores)
	$(PY) -m pytest -q

test-slow: install  ## the heavier tests too
	$(PY) -m pytest -q -m "slow or not slow"

demo: install  ## the main job: train the tiny model on the embedded world, sample images
	$(PY) src/train.py

data: install  ## generate the embedded world and its token shards
	$(PY) src/make_world.py
	$(PY) src/preprocess.py

bench: install  ## hot-path benchmarks against their peers, printed as JSON
	$(PY) src/bench.py

eval-fid: install  ## zero-shot FID (see README "Evaluation"); pass ARGS="ckpt=... eval=coco30k"
	$(PY) src/eval_fid.py $(ARGS)

VQ_RUN := logs/train_tokenizer/world_vqgan
VQ_STEPS := 4000
tokenizers: install  ## rebuild the shipped tiny tokenizers from the embedded world (~1 h on 2 CPU cores)
	$(PY) src/make_world.py
	$(PY) src/train_bpe.py
	# the shipped VQGAN's two-stage schedule: 2000 steps of a 3000-step cosine, then a 6000-step cosine to step $(VQ_STEPS)
	$(PY) src/train_tokenizer.py hydra.run.dir=$(VQ_RUN) trainer.max_steps=2000 module.optim.total_steps=3000
	$(PY) src/train_tokenizer.py hydra.run.dir=$(VQ_RUN) trainer.max_steps=$(VQ_STEPS) module.optim.total_steps=6000 \
		ckpt_path=$(VQ_RUN)/checkpoints/last.ckpt export_to=data/shipped/world_vqgan.ckpt

clean-data:  ## remove generated data (the shipped artefacts stay)
	rm -rf data/world
