"""Issue 14 items 5-7: preemption is survived (SIGTERM/SIGUSR1 save the current step and exit
non-zero), checkpoints are atomic (a failing write keeps the previous one), and the slow
fault-injection test: SIGKILL and SIGTERM at random steps, across a validation pass and the data's
epoch boundary, then resume; the batches seen and the final weights equal an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from project import CONF_DIR, PROJECT_ROOT
from test_train import TRAIN, read_keys, run_train, small_run_args

KEYS = "+callbacks.keys._target_=cm3leon.lit.callbacks.BatchKeysRecorder"


class SlowValidation(L.Callback):
    """Test helper (imported by the training subprocess): each validation batch notes itself in
    `<run>/val_events.jsonl` and takes `seconds`, so a signal can be sent during a validation pass."""

    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        with open(Path(trainer.default_root_dir) / "val_events.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "batch": batch_idx}) + "\n")
        time.sleep(self.seconds)


def start_train(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """src/train.py in the background (its own process group); `env` adds to the environment."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(Path(__file__).parent),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, str(TRAIN), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        start_new_session=True,  # its own process group: SIGKILL takes its DataLoader workers too
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-3000:]}"
        assert time.time() - t0 < timeout, "timed out waiting for training"
        time.sleep(0.02)


def n_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def csv_rows(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [{k: r.get(k, "") for k in ("step", "train/loss", "val/loss")} for r in csv.DictReader(f)]


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# ---- item 5: SIGTERM / SIGUSR1 -----------------------------------------------------------------
# SIGUSR1 in the default suite: test_multinode.test_sigusr1_under_slurm_saves_and_requeues_once
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_signal_saves_the_current_step_exits_nonzero_and_resumes(sig, tiny_tokens, tmp_path):
    run = tmp_path / "run"
    common = [KEYS, "trainer.limit_val_batches=0"]
    no_regular = "callbacks.model_checkpoint.every_n_train_steps=1000"  # no regular checkpoint before the signal
    proc = start_train(
        small_run_args(tiny_tokens, run, "trainer.max_steps=100000", "ckpt_path=last", no_regular, *common)
    )
    wait_for(lambda: n_lines(run / "batch_keys.jsonl") >= 4, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("preempted by")]
    assert len(line) == 1 and "last.ckpt" in line[0] and "ckpt_path=last" in line[0], err[-3000:]
    steps = n_lines(run / "batch_keys.jsonl")  # every step started before the stop was finished
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == steps
    if sig == signal.SIGUSR1:
        return
    # the same command resumes; ModelCheckpoint's next last overwrites the preemption's last.ckpt
    # (it wrote last-v1.ckpt beside it, and `ckpt=RUN/checkpoints/last.ckpt` read the stale step)
    every = f"callbacks.model_checkpoint.every_n_train_steps={steps + 1}"
    proc = run_train(
        small_run_args(tiny_tokens, run, f"trainer.max_steps={steps + 2}", "ckpt_path=last", every, *common)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == steps + 2
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]
    keys = read_keys(run)
    assert sorted(keys) == list(range(steps + 2)) and n_lines(run / "batch_keys.jsonl") == steps + 2


def test_final_step_is_saved_whatever_the_interval(tiny_tokens, tmp_path):
    """Checkpoints every 3 steps, 5 steps: last.ckpt must hold step 5 (Lightning left step 3)."""
    run = tmp_path / "run"
    args = ["trainer.max_steps=5", "trainer.limit_val_batches=0", "callbacks.model_checkpoint.every_n_train_steps=3"]
    proc = run_train(small_run_args(tiny_tokens, run, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 5


# ---- item 6: atomic checkpoints ------------------------------------------------------------------
FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    import hydra, torch
    from hydra import compose, initialize_config_dir
    from cm3leon.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=" + sys.argv[2]])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    io = trainer.strategy.checkpoint_io
    path = sys.argv[2] + "/checkpoints/last.ckpt"
    io.save_checkpoint({"w": torch.zeros(400_000)}, path)
    # a full disk: writes past 200 kB fail (EFBIG instead of the SIGXFSZ signal)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        io.save_checkpoint({"w": torch.ones(400_000)}, path)
    except Exception as e:
        print(type(e).__name__ + ": " + str(e))
    """
)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(CONF_DIR), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PROJECT_ROOT": str(PROJECT_ROOT), "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("UsageError") and "last.ckpt" in out[0], proc.stdout
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.equal(torch.load(ckpt, weights_only=True)["w"], torch.zeros(400_000))  # the previous one, whole
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


# ---- acceptance: fault injection ------------------------------------------------------------------
@pytest.mark.slow
def test_kills_at_random_steps_resume_to_the_uninterrupted_result(tiny_tokens, tmp_path):
    """56 steps of 4 samples over 192 training samples: the stream's epoch boundary is at step 48;
    validation after steps 20 and 40 (each batch slowed to 0.4 s); a checkpoint every 7 steps.
    Faults: SIGKILL before the first validation, SIGTERM during the validation after step 20,
    SIGKILL just before the epoch boundary, SIGTERM just after it. Every run uses the same command
    (`ckpt_path=last`)."""
    total = 56
    common = [
        KEYS,
        "+callbacks.slow_val._target_=test_resume.SlowValidation",
        "+callbacks.slow_val.seconds=0.4",
        "data.num_workers=2",
        f"trainer.max_steps={total}",
        "trainer.val_check_interval=20",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=7",
        "ckpt_path=last",
    ]
    straight = tmp_path / "straight"
    proc = start_train(small_run_args(tiny_tokens, straight, *common))  # PYTHONPATH finds SlowValidation
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]

    rng = random.Random(int(os.environ.get("FAULT_SEED", "14")))
    run = tmp_path / "faulty"
    keys, vals = run / "batch_keys.jsonl", run / "val_events.jsonl"
    faults = [
        (signal.SIGKILL, lambda s=rng.randint(9, 18): n_lines(keys) >= s),
        (signal.SIGTERM, lambda: n_lines(vals) >= 1),  # inside the validation pass after step 20
        (signal.SIGKILL, lambda s=rng.randint(44, 47): n_lines(keys) >= s),
        (signal.SIGTERM, lambda s=rng.randint(49, 53): n_lines(keys) >= s),
    ]
    log = []
    for sig, ready in faults:
        proc = start_train(small_run_args(tiny_tokens, run, *common))
        wait_for(ready, proc)
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        saved = run / "checkpoints" / "last.ckpt"
        log.append((sig.name, n_lines(keys), proc.returncode, ckpt_step(saved) if saved.is_file() else None))
        assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), (log, err[-3000:])
    proc = start_train(small_run_args(tiny_tokens, run, *common))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (log, err[-3000:])
    print("faults (signal, batches started, exit code, last.ckpt step):", log)

    # every step's batch as the uninterrupted run had it (a step redone after SIGKILL saw the same batch)
    reference, seen = read_keys(straight), {}
    for line in keys.read_text().splitlines():
        rec = json.loads(line)
        assert seen.setdefault(rec["step"], rec["keys"]) == rec["keys"], rec["step"]
    assert sorted(seen) == list(range(total)) and seen == {s: k for s, k in reference.items()}
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == total
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    # the CSV log holds every step's training loss once, as the uninterrupted run logged it (rows from
    # before each interruption included); a validation pass cut by SIGTERM is not redone, so its row
    # is the one that may be missing
    ours, theirs = csv_rows(run), csv_rows(straight)
    assert [r for r in ours if r["train/loss"]] == [r for r in theirs if r["train/loss"]]
    val = [r for r in ours if r["val/loss"]]
    assert val and all(r in theirs for r in val)
    assert not [p for p in (run / "checkpoints").iterdir() if not p.name.endswith(".ckpt")]  # no temp files
