"""Instruction tuning through the real src/train.py: a 2-step SFT run from a tiny checkpoint starts from
its weights (not its optimizer or step) and resumes with ckpt_path=last; a vocabulary mismatch between
the checkpoint and the SFT shards is refused in one line."""

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

from cm3leon.cli import USAGE_EXIT_CODE
from eval_builders import make_tiny_lm
from sft_fixtures import SEQ_LEN, SHIPPED_VQ, make_sft_world_tokens
from test_train import run_train, small_run_args


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """(SFT token shards of every world task, a random 2-layer checkpoint with the shipped tokenizers)."""
    root = tmp_path_factory.mktemp("sft_train")
    return make_sft_world_tokens(root), make_tiny_lm(root / "lm.ckpt", SHIPPED_VQ, max_seq_len=SEQ_LEN)


def sft_args(tokens, run_dir, ckpt, *extra: str, validate: bool = False) -> list[str]:
    # small_run_args' model overrides are replaced by the checkpoint's architecture
    return small_run_args(
        tokens,
        run_dir,
        "experiment=sft_world",
        f"ckpt_init={ckpt}",
        "ckpt_path=last",  # one command line starts the run and resumes it
        "trainer.val_check_interval=1" if validate else "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        *extra,
    )


def model_weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.")}


def test_sft_two_steps_from_a_tiny_checkpoint_then_resume(sft_data, tmp_path):
    tokens, ckpt = sft_data
    run = tmp_path / "run"
    proc = run_train(sft_args(tokens, run, ckpt, "trainer.max_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["global_step"] == 2 and summary["train/loss"] > 0
    assert "[init] loaded the weights" in proc.stdout and "SFT mixture: 80 samples per epoch" in proc.stdout
    # the architecture is the checkpoint's (2 layers of 64), not small_run_args' model.n_layer=1
    hp = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert hp.ckpt_init == str(ckpt)
    init, trained = model_weights(ckpt), model_weights(run / "checkpoints" / "last.ckpt")
    assert set(init) == set(trained) and "model.blocks.1.attn.out_proj.weight" in trained
    # 2 steps at the warmup's first LRs (3e-6, 6e-6) move a weight by ~1e-5: the run started from ckpt_init
    # (a fresh init would differ by ~0.02: random draws, and zeros for the residual outputs)
    diff = max(float((init[k] - trained[k]).abs().max()) for k in init)
    assert 0 < diff < 1e-3, diff
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and saved["hyper_parameters"]["init_from"] == str(ckpt)

    proc = run_train(sft_args(tokens, run, ckpt, "trainer.max_steps=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_step"] == 3
    assert "note: resuming from" in proc.stdout and "[init] loaded the weights" not in proc.stdout
    with open(run / "csv" / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == [0, 1, 2]  # the rows of both runs, each step once


def test_sft_with_retrieval_trains_and_records_its_bank(sft_data, tiny_bank, tmp_path):
    """retrieval=ra with a pretraining memory bank: the examples carry retrieved documents, and the
    checkpoint records the bank, which generation and eval_sft then retrieve from by default."""
    tokens, ckpt = sft_data
    run = tmp_path / "run"
    keys = "+callbacks.keys._target_=cm3leon.lit.callbacks.BatchKeysRecorder"
    proc = run_train(
        sft_args(tokens, run, ckpt, "trainer.max_steps=2", "retrieval=ra", f"retrieval.dir={tiny_bank}", keys)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["data_meta"]["retrieval"] == {"k": 2, "folder": str(tiny_bank.resolve())}
    batches = [json.loads(line) for line in (run / "batch_keys.jsonl").read_text().splitlines()]
    retrieved = [n for b in batches for n in b["n_retrieved"]]
    assert len(batches) == 2 and max(retrieved) > 0  # (a 256-token context leaves no room beside an edit)


def test_sft_validation_logs_the_loss_of_each_source(sft_data, tmp_path):
    """Unpacked validation rows carry their source: val/loss_source/<name> per task, the overall
    val/loss their token-weighted mean (so between the smallest and the largest)."""
    tokens, ckpt = sft_data
    run = tmp_path / "run"
    proc = run_train(sft_args(tokens, run, ckpt, "trainer.max_steps=1", "data.val_max_samples=20", validate=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(rows) == 1
    per_source = {k.removeprefix("val/loss_source/"): float(v) for k, v in rows[0].items() if "loss_source/" in k}
    assert set(per_source) == {"edit", "control", "grounded", "vqa", "caption"}
    overall = float(rows[0]["val/loss"])
    assert min(per_source.values()) < overall < max(per_source.values()), (overall, per_source)
    assert len(set(per_source.values())) == 5  # five different losses, not one value logged five times


def test_a_vocabulary_mismatch_is_refused_in_one_line(sft_data, tmp_path):
    from cm3leon.tokenizers.image_tokenizer import CONFIG_DIR, ImageTokenizer, save_vqgan

    tokens, _ = sft_data
    config = {**OmegaConf.to_container(OmegaConf.load(str(CONFIG_DIR / "tiny.yaml"))), "n_embed": 512}
    vqgan = save_vqgan(ImageTokenizer.from_config(config).model, tmp_path / "vq512.pt")
    other = make_tiny_lm(tmp_path / "other.ckpt", vqgan, max_seq_len=SEQ_LEN)  # 512 image codes, the data 2048
    proc = run_train(sft_args(tokens, tmp_path / "run", other, "trainer.max_steps=1"))
    assert proc.returncode == USAGE_EXIT_CODE
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ckpt_init=") and "vocabulary" in lines[0], proc.stderr
    assert "its vocabulary has n_image_codes 512, the data's n_image_codes 2048" in lines[0]


def test_sft_configs_compose_with_the_papers_recipe(compose_config):
    from cm3leon.lit.recipe import accumulation, max_steps

    for overrides in (["experiment=sft_world"], ["experiment=sft_paper"], ["data=sft_files"], ["data=sft_world"]):
        OmegaConf.to_container(compose_config("train", overrides), resolve=True)  # every interpolation resolves
    cfg = compose_config("train", ["experiment=sft_paper", "ckpt_init=/x.ckpt"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.data.seq_len) == (5e-5, 150, 4096)  # PAPER.md section 7
    assert cfg.global_batch_tokens == 2 * 1024 * 1024 and cfg.token_budget == 30_000_000_000
    assert max_steps(cfg) == 14306 and accumulation(cfg) == 16  # ceil(30e9 / 2M); 2M / (8 x 4 x 4096)
    assert (cfg.data.mixture.max_repeat, cfg.data.mixture.min_keep) == (3.0, 0.3) and cfg.data.loss_on == "all"
    world = compose_config("train", ["experiment=sft_world"])
    assert world.ckpt_init.endswith("data/shipped/world_lm.safetensors") and world.data.embedded_world
    assert {s.n_train for s in world.data.sources.values()} == {20000}
    # make sft's stage two: from stage one's last checkpoint, editing upweighted, the rest as stage one
    stage_two = compose_config("train", ["experiment=sft_world_edit"])
    assert stage_two.ckpt_init.endswith("logs/train/sft_world/checkpoints/last.ckpt")
    weights = {name: s.weight for name, s in stage_two.data.sources.items()}
    assert weights == {"edit": 3.0, "control": 1.0, "grounded": 1.0, "vqa": 1.0, "caption": 1.0}
    assert stage_two.optim.lr == world.optim.lr / 2 and stage_two.trainer.max_steps == 2000


def test_instruction_tuning_without_a_pretrained_model_is_refused(compose_config, tmp_path):
    """Forgetting ckpt_init would fine-tune random weights: one line says what to pass."""
    from cm3leon.errors import UsageError
    from cm3leon.lit.init_from import init_for_run

    cfg = compose_config("train", ["experiment=sft_paper", f"paths.output_dir={tmp_path}"])
    with pytest.raises(UsageError, match="ckpt_init=PATH"):
        init_for_run(cfg)
    assert init_for_run(compose_config("train", ["experiment=sft_paper", "ckpt_init=scratch"])) is None
