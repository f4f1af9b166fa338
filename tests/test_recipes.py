"""The paper's recipes (conf/experiment/paper_*.yaml): they compose, their dry run derives the steps
from the token budget and states real (non-pad) tokens per step; the token-accounting callback
counts real targets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "paper_350m": ("350m", 1.4e12, 6.0e-4),
    "paper_760m": ("760m", 1.9e12, 5.0e-4),
    "paper_7b": ("7b", 2.4e12, 1.2e-4),
}
NO_DATA = "data.tokens_dir=/nonexistent"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_recipe_composes_with_the_papers_settings(name, compose_config):
    from omegaconf import OmegaConf

    from cm3leon.lit.recipe import max_steps

    size, budget, lr = RECIPES[name]
    cfg = compose_config("train", [f"experiment={name}", NO_DATA])
    OmegaConf.resolve(cfg)
    assert cfg.model.name == size and cfg.optim.lr == lr and cfg.optim.warmup_steps == 1500
    assert cfg.optim.final_lr_ratio == 0.1 and cfg.global_batch_tokens == 8 * 2**20
    assert cfg.token_budget == budget and cfg.trainer.max_steps is None
    assert max_steps(cfg) == math.ceil(budget / (8 * 2**20))
    assert cfg.retrieval.name == "ra" and cfg.retrieval.per_query == 2 and cfg.retrieval.k == 2
    assert cfg.trainer.precision == "bf16-mixed" and "ModelParallelStrategy" in cfg.trainer.strategy._target_
    assert cfg.model.activation_checkpointing is True
    assert cfg.data.embedded_world is False and cfg.data.packing == "split"
    # an explicit trainer.max_steps wins over the budget (short trials)
    assert max_steps(compose_config("train", [f"experiment={name}", "trainer.max_steps=2"])) == 2


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_recipe_dry_run_accounts_for_real_tokens(name, compose_config):
    from cm3leon.lit.recipe import dry_run

    cfg = compose_config("train", [f"experiment={name}", NO_DATA, "trainer.num_nodes=4"])
    out = dry_run(cfg)
    for key in (
        "params",
        "flops_per_token",
        "max_steps",
        "token_budget",
        "accumulate_grad_batches",
        "tokens_per_step",
        "real_tokens_per_step",
        "real_tokens_source",
        "gpu_hours",
        "mfu",
    ):
        assert out[key] is not None, key
    assert out["max_steps"] == math.ceil(out["token_budget"] / cfg.global_batch_tokens)
    assert out["world_size"] == 32 and out["accumulate_grad_batches"] == 8 * 2**20 // (32 * 4 * 4096)
    assert out["tokens_per_step"] == 8 * 2**20 and out["mfu"] == 0.45
    assert out["real_tokens_source"].startswith("paper shapes")
    # paper shapes, k=2: </s> (T <break> I <break>) x 2, Tq <break> Iq </s> = 1 + 2 x 1,046 + 1,045 + 1 ids
    assert out["real_tokens_per_sequence"] == 1 + 2 * 1046 + 1045 + 1 - 1
    # packing split: one target lost per piece boundary (~1.3 pieces per row), nothing else
    assert out["packing"] == "split" and 0 < out["pad_fraction"] < 0.001
    assert out["real_tokens_per_step"] == pytest.approx(2048 * 4096 * (1 - out["pad_fraction"]), rel=1e-4)


@pytest.mark.parametrize("packing,low,high", [("none", 0.23, 0.24), ("whole", 0.23, 0.24), ("split", 0, 0.001)])
def test_dry_run_pad_fraction_per_packing_mode(packing, low, high, compose_config):
    """k=2 at paper shapes: one ~3.1k-token example per row unless examples are cut at row ends."""
    from cm3leon.lit.recipe import dry_run

    out = dry_run(compose_config("train", ["experiment=paper_350m", NO_DATA, f"data.packing={packing}"]))
    assert low <= out["pad_fraction"] < high and out["packing"] == packing


def test_dry_run_budget_with_k3_drops_one_document(compose_config):
    from cm3leon.lit.recipe import expected_real_tokens

    cfg = compose_config("train", ["experiment=paper_350m", NO_DATA, "retrieval.k=3"])
    est = expected_real_tokens(cfg)
    assert est["retrieved_per_sequence"] == {"k": 3, "kept_mean": 2.0}  # ~4.2k > 4,096: one dropped


def test_paper_7b_dry_run_script_without_data():
    env = {**os.environ, "CM3LEON_DATA": "/nonexistent"}  # data=shutterstock without data
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src/train.py"), "experiment=paper_7b", "dry_run=true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    out = json.loads(lines[-1])
    assert out["model"] == "7b" and out["max_steps"] == 286103 and out["world_size"] == 512


def test_token_accounting_counts_real_targets():
    from types import SimpleNamespace

    from cm3leon.lit.callbacks import TokenAccounting, batch_tokens_fn

    targets = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "targets": targets, "keys": ["a", "b"]}
    assert batch_tokens_fn(batch) == 4

    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=lambda d, **kw: logged.append(d))
    strategy = SimpleNamespace(reduce=lambda t, reduce_op: t)
    trainer = SimpleNamespace(accumulate_grad_batches=2, strategy=strategy)
    cb = TokenAccounting()
    for i in range(2):  # one optimizer step of two micro-batches
        cb.on_train_batch_start(trainer, module, batch, i)
        cb.on_train_batch_end(trainer, module, None, batch, i)
    assert len(logged) == 1
    assert logged[0]["train/real_tokens"] == 8
    assert logged[0]["train/pad_fraction"] == pytest.approx(1 - 8 / 16)
    assert logged[0]["train/real_tokens_per_sec"] > 0


def test_token_budget_sets_max_steps_and_training_logs_real_tokens(tiny_tokens, tmp_path):
    """Through the script: max_steps from token_budget (8,192 / 4,096 = 2 steps of 2 micro-batches
    of 4 x 512), the default callbacks' TokenAccounting and ThroughputMonitor in a real fit."""
    import csv

    from test_train import run_train, small_run_args

    run = tmp_path / "run"
    args = small_run_args(
        tiny_tokens,
        run,
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "trainer.max_steps=null",
        "global_batch_tokens=4096",
        "token_budget=8192",
        callbacks="~callbacks.samples",  # the default callbacks, without the sample grids
    )
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_step"] == 2
    rows = [
        r for r in csv.DictReader((run / "csv" / "metrics.csv").read_text().splitlines()) if r.get("train/real_tokens")
    ]
    assert len(rows) == 2
    for r in rows:
        real, pad = float(r["train/real_tokens"]), float(r["train/pad_fraction"])
        assert 0 < real <= 2 * 4 * 511 and 0 <= pad < 1 and float(r["train/real_tokens_per_sec"]) > 0


@pytest.mark.parametrize("packing", ["none", "whole", "split"])
def test_dry_run_reads_real_tokens_from_token_shards(tiny_tokens, compose_config, packing):
    from cm3leon.lit.recipe import dry_run

    cfg = compose_config(
        "train", ["data=shutterstock", f"data.tokens_dir={tiny_tokens}", "model=tiny", f"data.packing={packing}"]
    )
    out = dry_run(cfg)
    assert out["real_tokens_source"].startswith("token shards") and out["packing"] == packing
    assert 0 < out["real_tokens_per_sequence"] < cfg.data.seq_len
    assert 0 < out["real_tokens_per_step"] <= out["tokens_per_step"]
