"""The main job through its real entry point: configs compose, dry runs, fail-fast errors,
fast_dev_run, resume without repeating data, multirun, and 2-process DDP (gloo) on CPU."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cm3leon.cli import USAGE_EXIT_CODE
from project import CONF_DIR as CONF
from project import PROJECT_ROOT

TRAIN = PROJECT_ROOT / "src" / "train.py"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group", ["model", "data", "objective", "retrieval", "optim", "trainer", "callbacks", "logger", "experiment"]
)
def test_every_config_group_option_composes_and_resolves(group, compose_config):
    options = group_options(group)
    assert options, group
    for option in options:
        cfg = compose_config("train", [f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=True)  # raises on a broken interpolation


def test_cpu_trainer_config_instantiates(compose_config):
    import hydra

    cfg = compose_config("train", ["trainer.max_steps=1"])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == 1 and trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize("size,expected", [("350m", 0.35e9), ("760m", 0.76e9), ("7b", 6.7e9)])
def test_dry_run_param_counts_match_the_paper(size, expected, compose_config):
    from cm3leon.lit.recipe import dry_run

    cfg = compose_config("train", [f"model={size}", "data=shutterstock", "data.tokens_dir=/nonexistent"])
    out = dry_run(cfg)
    assert abs(out["params"] - expected) / expected < 0.10, out
    # the paper's 8M-token global batch from devices x micro-batch x accumulation
    assert out["tokens_per_step"] == 2048 * 4096
    assert out["accumulate_grad_batches"] == 2048 // cfg.data.micro_batch_size


def run_train(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, str(TRAIN), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=PROJECT_ROOT,
    )


def test_dry_run_script_prints_one_json_line():
    proc = run_train(["model=7b", "dry_run=true"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"params", "tokens_per_step", "flops_per_token"} <= set(out)
    assert abs(out["params"] - 6.7e9) / 6.7e9 < 0.10


def test_missing_shards_fail_fast_with_one_line():
    t0 = time.time()
    proc = run_train(["model=350m", "data=shutterstock"], env={"CM3LEON_DATA": "/nonexistent/shutterstock"})
    assert time.time() - t0 < 20
    assert proc.returncode == USAGE_EXIT_CODE
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "/nonexistent/shutterstock/train" in lines[0] and "README" in lines[0]


def small_run_args(tokens: Path, run_dir: Path, *extra: str, callbacks: str = "callbacks=minimal") -> list[str]:
    """A 1-layer run on `tokens` into `run_dir`; `callbacks` picks the callback set (an override)."""
    return [
        f"hydra.run.dir={run_dir}",
        "data.embedded_world=false",
        f"data.tokens_dir={tokens}",
        "data.micro_batch_size=4",
        "data.val_max_samples=8",
        "model.n_layer=1",
        "model.d_model=64",
        "model.n_head=2",
        "logger=csv",
        callbacks,
        "trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.mark.slow  # every default training test covers this path
def test_fast_dev_run(tiny_tokens, tmp_path):
    proc = run_train(small_run_args(tiny_tokens, tmp_path / "run", "+trainer.fast_dev_run=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["global_step"] == 1 and summary["train/loss"] > 0


def read_keys(run_dir: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for line in (run_dir / "batch_keys.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], []).extend(rec["keys"])
    return out


def test_resume_continues_from_saved_step_without_repeating_data(tiny_tokens, tmp_path):
    """Also issue 14 item 7: the resumed run keeps its history (CSV rows of both runs, one W&B run id)."""
    common = [
        "data.num_workers=2",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "+callbacks.keys._target_=cm3leon.lit.callbacks.BatchKeysRecorder",
        "trainer.val_check_interval=100",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
    ]

    def args(run_dir, *extra):  # W&B (offline) and CSV, as a default run logs
        return [a if a != "logger=csv" else "logger=default" for a in small_run_args(tiny_tokens, run_dir, *extra)]

    straight = tmp_path / "straight"
    proc = run_train(args(straight, "trainer.max_steps=6", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]

    resumed = tmp_path / "resumed"
    proc = run_train(args(resumed, "trainer.max_steps=3", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (resumed / "checkpoints" / "last.ckpt").is_file()
    proc = run_train(args(resumed, "trainer.max_steps=6", f"ckpt_path={resumed}/checkpoints/last.ckpt", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]  # W&B prints after it
    assert json.loads(summary)["global_step"] == 6

    full, parts = read_keys(straight), read_keys(resumed)
    assert sorted(parts) == list(range(6))  # steps 0-2 from the first run, 3-5 after the resume
    assert parts == full  # the same batches in the same order: nothing repeated, nothing skipped
    seen = [k for s in range(6) for k in parts[s]]
    assert len(seen) == len(set(seen))  # 24 samples < one epoch of 192: all distinct

    def loss_steps(run_dir):
        with open(run_dir / "csv" / "metrics.csv", newline="") as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]

    assert loss_steps(resumed) == loss_steps(straight) == list(range(6))  # rows of both runs, each step once
    run_id = (resumed / "wandb_run_id").read_text().strip()
    runs = sorted(p.name for p in (resumed / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs), runs  # two sessions of one W&B run


def test_multirun_makes_one_folder_per_job(tiny_tokens, tmp_path):
    sweep = tmp_path / "sweep"
    args = small_run_args(tiny_tokens, tmp_path / "unused", "trainer.max_steps=2", "trainer.limit_val_batches=0")
    args = [a for a in args if not a.startswith("hydra.run.dir")]
    proc = run_train(["-m", f"hydra.sweep.dir={sweep}", "model=tiny", "optim.lr=1e-3,2e-3", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, lr in zip(jobs, ("0.001", "0.002")):
        # 2 steps, no periodic checkpoint yet: ModelCheckpoint's own last.ckpt, and no last-v1.ckpt beside it
        assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["last.ckpt"]
        assert f"optim.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow  # ~30 s; the default suite's multi-process run is test_multinode's two-node torchrun
def test_ddp_two_cpu_processes_gloo(tiny_tokens, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_train(
        small_run_args(
            tiny_tokens,
            run_dir,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "+trainer.strategy.process_group_backend=gloo",
            "trainer.max_steps=3",
            "trainer.limit_val_batches=0",
            "data.num_workers=1",
            "+callbacks.keys._target_=cm3leon.lit.callbacks.BatchKeysRecorder",
        ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # both ranks wrote into the one run folder, and read disjoint data
    recs = [json.loads(line) for line in (run_dir / "batch_keys.jsonl").read_text().splitlines()]
    by_rank = {r: {k for rec in recs if rec["rank"] == r for k in rec["keys"]} for r in (0, 1)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    # one run folder for both ranks (Lightning relaunches rank 1 with the same hydra.run.dir)
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    assert (run_dir / "train_ddp_process_1.log").is_file()


def test_retrieval_on_and_off_train_from_the_same_command_line(tiny_tokens, tmp_path, compose_config):
    """Issue 4: `retrieval=ra` and `retrieval=none` both train; with ra every training sequence holds
    `retrieval.k` retrieved documents, and the checkpoint records the memory bank for generate.py."""
    import torch

    from cm3leon.retrieval.neighbours import RetrievalConfig, build_retrieval

    bank = tmp_path / "bank"  # the session's tiny_tokens folder stays as it is
    build_retrieval(
        RetrievalConfig.from_any({**compose_config("train", ["retrieval=ra"]).retrieval, "dir": str(bank)}),
        tiny_tokens,
        progress=False,
    )
    common = [
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "+callbacks.keys._target_=cm3leon.lit.callbacks.BatchKeysRecorder",
    ]
    for mode, extra, k in (("ra", [f"retrieval.dir={bank}", "retrieval.k=3"], 3), ("none", [], 0)):
        run = tmp_path / mode
        proc = run_train(small_run_args(tiny_tokens, run, f"retrieval={mode}", *extra, *common))
        assert proc.returncode == 0, proc.stderr[-3000:]
        recs = [json.loads(line) for line in (run / "batch_keys.jsonl").read_text().splitlines()]
        assert len(recs) == 2 and all(n == k for r in recs for n in r["n_retrieved"])
        meta = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"][
            "data_meta"
        ]
        assert (meta.get("retrieval") or {}).get("folder") == (str(bank.resolve()) if k else None)


def _run_id_in_process(folder: str, queue) -> None:
    from cm3leon.lit.loggers import wandb_run_id

    queue.put(wandb_run_id(folder))


def test_wandb_run_id_is_one_id_when_ranks_race(tmp_path):
    """Every rank of a fresh multi-node run asks for the run's W&B id at once: they all get one."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run_id_in_process, args=(str(tmp_path), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    ids = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(set(ids)) == 1 and (tmp_path / "wandb_run_id").read_text().strip() == ids[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wandb_run_id"]  # no temporary files left
