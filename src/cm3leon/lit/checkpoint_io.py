"""`AtomicCheckpointIO`: the trainer's checkpoint reader and writer (conf/trainer/cpu.yaml `plugins`).

Writing: the checkpoint goes to a temporary file in the destination folder (same filesystem),
flushed to disk, then renamed over the old one (`cm3leon.utils.atomic_path`), so a crash, a kill or
a full disk mid-write leaves the previous `last.ckpt` whole. A failed write stops the run with one
line (UsageError) and leaves no temporary file behind.

Reading (resume, `ckpt_path=`): torch.load(weights_only=True) only. The project's checkpoints hold
tensors and plain containers, so resuming never needs to unpickle code; a file that would is refused
in one line naming `src/convert_checkpoint.py`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cm3leon.errors import UsageError
from cm3leon.safe_load import load_weights_only
from cm3leon.utils import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with atomic writes and weights_only reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
            reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:120]
            free = shutil.disk_usage(path.parent).free / 1e9
            raise UsageError(
                f"could not write checkpoint {path} ({reason}; {free:.1f} GB free there): the previous checkpoint "
                f"is kept; free space in {path.parent} (or set hydra.run.dir= on a larger disk) and resume with "
                "ckpt_path=last"
            ) from None

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if not Path(path).is_file():
            raise UsageError(f"checkpoint {path} not found: pass ckpt_path= an existing .ckpt (or ckpt_path=last)")
        return load_weights_only(path, "checkpoint", map_location=map_location or "cpu")
