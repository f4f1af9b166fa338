"""Issue 16 item 4, multi-node and clusters: the SLURM launcher config (conf/hydra/launcher/slurm_8gpu.yaml)
and the sbatch script submitit makes from it; under SLURM, SIGUSR1 is requeued once, by Preemption; two
"nodes" started by torchrun train one model on disjoint shards; a sweep through submitit's local launcher
(conf/hydra/launcher/local.yaml)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from project import CONF_DIR, PROJECT_ROOT
from test_resume import n_lines, start_train, wait_for
from test_train import TRAIN, run_train, small_run_args

KEYS = "+callbacks.keys._target_=cm3leon.lit.callbacks.BatchKeysRecorder"


def compose_with_hydra(overrides: list[str]):
    """conf/train.yaml composed as `python src/train.py -m <overrides>` would, hydra node included."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def sbatch_script(cfg, monkeypatch) -> tuple[str, object]:
    """The sbatch script Hydra's submitit launcher would submit for `cfg` (nothing is submitted), and
    submitit's executor. The launcher is built as Hydra builds it (Plugins.instantiate_launcher)."""
    import submitit
    from hydra.core.plugins import Plugins
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is here"
    seen = {}

    class Submitted(Exception):
        pass

    def map_array(executor, fn, *args):  # where the launcher would submit: keep the script instead
        seen["executor"] = executor._executor
        seen["script"] = executor._executor._make_submission_file_text("python -u -m submitit.core._submit X", "0")
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher = Plugins.instance().instantiate_launcher(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["optim.lr=1e-3"]], initial_job_idx=0)
    return seen["script"], seen["executor"]


def test_slurm_launcher_config_follows_the_trainer(tmp_path, monkeypatch):
    """The allocation is read from the trainer (nodes x GPUs), so it cannot disagree with what
    Lightning's SLURMEnvironment checks; time limit, USR1 before it, requeue, partition left open."""
    sweep = tmp_path / "sweep"
    base = ["hydra/launcher=slurm_8gpu", "experiment=paper_350m", f"hydra.sweep.dir={sweep}"]
    cfg = compose_with_hydra(base)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert cfg.trainer.num_nodes == launcher.nodes == 32 and cfg.trainer.devices == 8  # the paper's 256 GPUs
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8  # one process per GPU
    assert launcher.timeout_min == 2880 and launcher.signal_delay_s == 120 and launcher.cpus_per_task == 12
    assert launcher.partition is None and launcher.account is None  # the cluster's to fill
    assert launcher.max_num_timeout == 0  # submitit's own requeue (USR2) is not the one in use

    # one override moves both: the launcher reads trainer.num_nodes / trainer.devices
    cfg = compose_with_hydra([*base, "trainer.num_nodes=4", "trainer.devices=4", "hydra.launcher.partition=gpu"])
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node) == (4, 4, 4)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (4, 4)

    script, executor = sbatch_script(cfg, monkeypatch)
    flags = {line.split("=")[0]: line.partition("=")[2] for line in script.splitlines() if line.startswith("#SBATCH")}
    assert flags["#SBATCH --nodes"] == "4" and flags["#SBATCH --ntasks-per-node"] == "4", script
    assert flags["#SBATCH --gpus-per-node"] == "4" and flags["#SBATCH --cpus-per-task"] == "12", script
    assert flags["#SBATCH --time"] == "2880" and flags["#SBATCH --partition"] == "gpu", script
    assert "#SBATCH --requeue" in flags, script
    # SLURM signals USR1 (Preemption's), not submitit's USR2, two minutes before the time limit
    assert flags["#SBATCH --signal"] == "USR1@120", script
    assert "#SBATCH --account" not in flags and "#SBATCH --qos" not in flags, script
    assert script.rstrip().endswith("python -u -m submitit.core._submit X") and "\nsrun " in script
    assert executor.max_num_timeout == 0
    assert str(executor.folder).startswith(str(sweep / ".submitit")), executor.folder  # logs and pickles

    # the callback that catches that signal saves and requeues (callbacks=default and minimal)
    import hydra

    from cm3leon.lit.preemption import Preemption

    for callbacks in ("default", "minimal"):
        composed = compose_with_hydra([*base, f"callbacks={callbacks}"])
        preemption = hydra.utils.instantiate(composed.callbacks.preemption)
        assert isinstance(preemption, Preemption) and preemption.requeue and signal.SIGUSR1 in preemption.signals

    # the local launcher: one process per job, no hour-long cap
    cfg = compose_with_hydra(["hydra/launcher=local"])
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
    assert cfg.hydra.launcher.timeout_min >= 24 * 60 and cfg.hydra.launcher.tasks_per_node == 1
    OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_entry_task_pickles_while_stderr_is_held(monkeypatch):
    """submitit pickles the task of `hydra_entry` (cloudpickle) while the process's stderr is held
    (sys.stderr is a buffer until the task starts); the hold travels empty: the job process keeps
    its own stderr. (A plain list holding the stream cannot be pickled.)"""
    import io

    import cloudpickle

    from cm3leon.cli import _HeldStderr

    held = _HeldStderr()
    held.append(sys.__stderr__)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # as hydra_entry's main() does while composing
    with pytest.raises(pickle.PicklingError):
        cloudpickle.dumps([sys.__stderr__])
    copy = pickle.loads(cloudpickle.dumps(held))
    assert isinstance(copy, _HeldStderr) and copy == [] and held == [sys.__stderr__]


class RecordSignalOwners(L.Callback):
    """Test helper (imported by the training subprocess): at the first training step, write the
    cluster environment Lightning chose and the handler that holds SIGUSR1 to `<run>/owners.json`."""

    def on_train_start(self, trainer, pl_module):
        env = trainer._accelerator_connector.cluster_environment
        handler = signal.getsignal(signal.SIGUSR1)
        record = {
            "environment": type(env).__name__,
            "auto_requeue": getattr(env, "auto_requeue", None),
            "sigusr1": getattr(handler, "__qualname__", repr(handler)),
        }
        (Path(trainer.default_root_dir) / "owners.json").write_text(json.dumps(record))


def test_sigusr1_under_slurm_saves_and_requeues_once(tiny_tokens, tmp_path):
    """Under SLURM (its environment variables, a recording `scontrol` on PATH), SIGUSR1 saves the
    current step, requeues the submitit array task exactly once and exits 128 + 10. Preemption holds
    SIGUSR1, so Lightning's SLURMEnvironment(auto_requeue=True) handler, which would save an
    hpc_ckpt mid-step and requeue a second time, is not installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {  # one task of a submitit array job (what sbatch --array and srun set)
        "SLURM_JOB_ID": "4243",
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    run = tmp_path / "run"
    args = small_run_args(
        tiny_tokens,
        run,
        "trainer.max_steps=100000",
        "ckpt_path=last",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
        "data.num_workers=0",
        KEYS,
        "+callbacks.owners._target_=test_multinode.RecordSignalOwners",
    )
    proc = start_train(args, env={**slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    try:
        wait_for(lambda: n_lines(run / "batch_keys.jsonl") >= 3, proc)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    owners = json.loads((run / "owners.json").read_text())
    assert owners == {"environment": "SLURMEnvironment", "auto_requeue": True, "sigusr1": "Preemption._on_signal"}
    assert calls.read_text().splitlines() == ["requeue 4242_1"], err[-3000:]  # once: the array task
    assert "and requeued the job" in err
    steps = n_lines(run / "batch_keys.jsonl")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == steps  # the step the signal interrupted was finished, then saved
    assert not list(run.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own SLURM handler did not run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_of_key(tokens: Path) -> dict[str, int]:
    """Sample key -> index of the training shard holding it."""
    out = {}
    for shard in sorted((tokens / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                out[name.split(".")[0]] = int(shard.stem)
    return out


def test_two_nodes_with_torchrun_read_disjoint_shards(tiny_tokens, tmp_path):
    """README "Clusters", torchrun: two nodes x one process (static rendezvous on 127.0.0.1, gloo).
    Each node gets its own run folder here, to see what each rank writes (on a cluster they share
    one folder on a shared filesystem, which resuming needs): rank 0 writes the checkpoint and the
    logs, rank 1 only its batch log."""
    port = free_port()
    steps = 3
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",  # = torchrun
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            str(TRAIN),
            *small_run_args(
                tiny_tokens,
                tmp_path / f"node{node}",
                "trainer=ddp",
                "trainer.accelerator=cpu",
                "trainer.devices=1",
                "trainer.num_nodes=2",
                "trainer.precision=32-true",
                "+trainer.strategy.process_group_backend=gloo",
                f"trainer.max_steps={steps}",
                "trainer.limit_val_batches=0",
                "trainer.log_every_n_steps=1",
                "data.num_workers=1",  # 2 nodes x 1 worker = 2 readers of the 6 shards
                KEYS,
            ),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=PROJECT_ROOT,
                start_new_session=True,  # its own process group: torchrun's worker goes with it
            )
        )
    outs = []
    try:
        deadline = time.time() + 300
        for proc in procs:
            outs.append(proc.communicate(timeout=max(1, deadline - time.time())))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    summaries = [[json.loads(x) for x in out.splitlines() if x.startswith("{")] for out, _ in outs]
    assert len(summaries[0]) == 1 and summaries[0][0]["global_step"] == steps, outs[0][0][-2000:]
    assert summaries[1] == []  # rank 1 prints no summary
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1][1] + (node1 / "train.log").read_text()

    # rank 0 alone writes checkpoints and logs
    ckpt = torch.load(node0 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == steps
    assert (node0 / "csv" / "metrics.csv").is_file()
    assert not (node1 / "checkpoints").exists() and not (node1 / "csv").exists()

    # each rank logged every step, and the two nodes read different shards (reader r: shards r, r+2, r+4)
    recs = [json.loads(x) for run in (node0, node1) for x in (run / "batch_keys.jsonl").read_text().splitlines()]
    assert sorted((r["rank"], r["step"]) for r in recs) == [(rank, s) for rank in (0, 1) for s in range(steps)]
    keys = {rank: [k for r in recs if r["rank"] == rank for k in r["keys"]] for rank in (0, 1)}
    assert all(len(keys[rank]) == steps * 4 for rank in (0, 1))  # data.micro_batch_size=4 per rank
    assert not set(keys[0]) & set(keys[1])
    shard = shard_of_key(tiny_tokens)
    shards = {rank: {shard[k] for k in keys[rank]} for rank in (0, 1)}
    assert all(s % 2 == rank for rank in (0, 1) for s in shards[rank]), shards


@pytest.mark.slow  # ~95 s on a busy 2-core CPU: two training processes start side by side
def test_submitit_local_sweep_runs_each_job_in_its_own_process(tiny_tokens, tmp_path):
    sweep = tmp_path / "sweep"
    args = small_run_args(tiny_tokens, tmp_path / "unused", "trainer.max_steps=2", "trainer.limit_val_batches=0")
    args = [a for a in args if not a.startswith("hydra.run.dir")]
    proc = run_train(
        ["-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", "data.num_workers=0", *args, "optim.lr=1e-3,2e-3"],
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, lr in zip(jobs, ("0.001", "0.002")):
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 2
        assert f"optim.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()
    # submitit ran each job in a process of its own: its logs and its result per job
    results = sorted((sweep / ".submitit").glob("*/*_0_result.pkl"))
    assert len(results) == 2, sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    for result in results:
        with open(result, "rb") as f:
            status, job_return = pickle.load(f)
        assert status == "success", job_return
        assert job_return.status.name == "COMPLETED"
        job_dir = result.parent
        out = (job_dir / f"{job_dir.name}_0_log.out").read_text()
        summary = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
        assert summary["global_step"] == 2 and Path(summary["run_dir"]).parent == sweep
        assert f"Starting with JobEnvironment(job_id={job_dir.name}," in out  # submitit's process ran it
