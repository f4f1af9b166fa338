"""Loggers that keep a run's history across resumes (conf/logger/*.yaml).

- `ResumableCSVLogger`: Lightning's CSVLogger deletes an existing metrics.csv when it starts; this
  one keeps its rows. Rows of steps the resumed run will redo (logged after the checkpoint it
  resumes from, before the interruption) are dropped when the first new row arrives, so every step
  appears once.
- `resumable_wandb_logger`: a WandbLogger whose run id is kept in `<save_dir>/wandb_run_id`, so a
  resumed run continues the same W&B run (`id=`, `resume="allow"`; offline runs sync as one).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from cm3leon.utils import atomic_path


class _KeepingWriter(ExperimentWriter):
    """ExperimentWriter that appends to an existing metrics.csv instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        self._trimmed = False
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if not self._trimmed and step is not None:
            self._trimmed = True
            self._drop_rows_from(step)
        super().log_metrics(metrics_dict, step)

    def _drop_rows_from(self, step: int) -> None:
        """Remove the rows of steps >= `step`: the resumed run logs them again."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if not r.get("step") or float(r["step"]) < step]
        if len(kept) < len(rows):
            with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv continues when the run is resumed (same arguments)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_run_id(save_dir: str | Path) -> str:
    """The run's W&B id: read from `<save_dir>/wandb_run_id`, made and stored on the first run."""
    path = Path(save_dir) / "wandb_run_id"
    if not path.is_file():
        from wandb.sdk.lib.runid import generate_id

        # every rank may get here on a fresh run: the first link wins, the others read its id
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".wandb_run_id.{os.getpid()}")
        tmp.write_text(generate_id() + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def resumable_wandb_logger(save_dir: str, id: str | None = None, **kwargs: Any):
    """`WandbLogger(save_dir=..., id=<the run folder's id>, resume="allow", **kwargs)`."""
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(save_dir=save_dir, id=id or wandb_run_id(save_dir), resume="allow", **kwargs)
