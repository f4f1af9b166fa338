"""`Preemption`: SIGTERM / SIGUSR1 save the current step to last.ckpt, then the run exits non-zero;
the final step of a run is always in last.ckpt.

Lightning, once it has seen SIGTERM, stops its loops at the next safe point (the end of the
current training step, or between two validation batches) by raising `SIGTERMException`, a
`SystemExit` that would end the process with code 0 and no checkpoint. This callback:

- makes SIGUSR1 (what SLURM sends before the time limit, `#SBATCH --signal=USR1@120`) stop the
  same way;
- saves `<checkpoint dir>/last.ckpt` when the loops stop (`on_exception`): every rank has finished
  the same step, so the checkpoint holds the step's weights, optimizer and data position; it is
  the ModelCheckpoint's own last, which the resumed run overwrites (not `last-v1.ckpt` beside it);
- under SLURM, after SIGUSR1, requeues the job (`scontrol requeue`, as Lightning's
  `SLURMEnvironment(auto_requeue=True)` does; Lightning's own handler, which saves at the moment
  the signal lands, mid-step, is not installed because this one is);
- at the end of a run saves last.ckpt unless a checkpoint of the final step was written (Lightning's
  ModelCheckpoint writes last.ckpt at the end only when it wrote nothing else during the run, so
  a run ending between two `every_n_train_steps` left last.ckpt behind the final step);
- `exit_code(trainer)` gives src/train.py the line to print and the code to exit with (128 + signal).

Resume: `python src/train.py hydra.run.dir=RUN ckpt_path=last` (the same command line works for
the first run: with no last.ckpt yet, Lightning starts from scratch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class Preemption(L.Callback):
    """Args:
    signals: names of the signals that preempt (default SIGTERM and SIGUSR1).
    requeue: under SLURM, requeue the job after SIGUSR1.
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1"), requeue: bool = True):
        self.signals = [signal.Signals[name] for name in signals]
        self.requeue = requeue
        self.signum: int | None = None
        self.saved: Path | None = None
        self.requeued = False
        self._trainer = None
        self._saved_step: int | None = None  # global step of the latest checkpoint written in this process

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        # installed before Lightning's own (it registers after the setup hooks and calls ours too)
        for sig in self.signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.signum = signum
        if self._trainer is not None:
            # the flag Lightning's loops check at their safe points (set for SIGTERM by Lightning too)
            self._trainer._signal_connector.received_sigterm = True

    def on_train_start(self, trainer, pl_module) -> None:
        if self.signum is not None:  # a signal before Lightning registered its handlers reset the flag
            trainer._signal_connector.received_sigterm = True
        callback = trainer.checkpoint_callback
        resumed = Path(trainer.ckpt_path or "")
        ours = resumed.name.startswith("last") and resumed.parent.resolve() == checkpoint_dir(trainer).resolve()
        if getattr(callback, "save_last", False) and ours:
            # resumed from our last: ModelCheckpoint's next last overwrites last.ckpt. Its state in the
            # checkpoint may not say so (another every_n_train_steps is another state key; older runs)
            callback.last_model_path = str(checkpoint_dir(trainer) / "last.ckpt")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        if self._saved_step == trainer.global_step:
            return  # a checkpoint of the final step exists
        save_last(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.signum = self.signum or signal.SIGTERM
        self.saved = save_last(trainer)  # every rank takes part (barrier, sharded state)
        slurm_job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        if self.requeue and self.signum == signal.SIGUSR1 and slurm_job and trainer.is_global_zero:
            if task := os.environ.get("SLURM_ARRAY_TASK_ID") if os.environ.get("SLURM_ARRAY_JOB_ID") else None:
                slurm_job = f"{slurm_job}_{task}"
            self.requeued = subprocess.call(["scontrol", "requeue", slurm_job]) == 0


def save_last(trainer) -> Path:
    """Save the current step to `<checkpoint dir>/last.ckpt` as the ModelCheckpoint's own last: in
    this process it then writes no second last at the end, and its later saves overwrite this file
    (one it did not write it would leave stale beside `last-v1.ckpt`; a resumed run: on_train_start)."""
    path = checkpoint_dir(trainer) / "last.ckpt"
    callback = trainer.checkpoint_callback
    if getattr(callback, "save_last", False):
        callback._last_checkpoint_saved = callback.last_model_path = str(path)
    trainer.save_checkpoint(path)
    return path


def checkpoint_dir(trainer) -> Path:
    """The ModelCheckpoint's folder (where last.ckpt lives), else <run>/checkpoints."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


def exit_code(trainer, script: str = "src/train.py") -> int:
    """After `trainer.fit` raised SIGTERMException: print one line saying what was saved and how
    to resume (rank 0), and return the exit code (128 + the signal, as a shell reports it)."""
    preemption = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
    signum = (preemption.signum if preemption else None) or signal.SIGTERM
    name = signal.Signals(signum).name
    if trainer.is_global_zero:
        run = Path(trainer.default_root_dir)
        if preemption is None or preemption.saved is None:
            what = "no checkpoint saved (add the callback cm3leon.lit.preemption.Preemption)"
        else:
            what = f"saved {preemption.saved}" + (" and requeued the job" if preemption.requeued else "")
        print(
            f"preempted by {name} at step {trainer.global_step}: {what}; "
            f"resume with `python {script} hydra.run.dir={run} ckpt_path=last` (same overrides)",
            file=sys.stderr,
        )
    return 128 + int(signum)


def fit(trainer, module, datamodule=None, ckpt_path=None, script: str = "src/train.py") -> None:
    """`trainer.fit`, where a preemption (Lightning's SystemExit(0) after SIGTERM/SIGUSR1) is not a
    success: the process exits with 128 + the signal after one line saying how to resume."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        sys.exit(exit_code(trainer, script))
