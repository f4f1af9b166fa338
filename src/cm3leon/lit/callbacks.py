"""Lightning callbacks of the main job: a data-order log and the batch measures `ThroughputMonitor`
needs. (Sample grids and image metrics: `cm3leon.eval.callback.SampleCallback`.)"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


def batch_size_fn(batch: dict) -> int:
    """Sequences in a batch (for ThroughputMonitor)."""
    return int(batch["input_ids"].shape[0])


def batch_tokens_fn(batch: dict) -> int:
    """Token positions in a batch, padding included (for ThroughputMonitor: tokens/s)."""
    return int(batch["input_ids"].numel())


class BatchKeysRecorder(L.Callback):
    """Append the sample keys of every training batch to `<run dir>/batch_keys.jsonl`
    (one JSON line per batch: step, rank, keys, and n_retrieved: the retrieved documents before
    each query): the data-order log that resume and retrieval tests read."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = Path(trainer.default_root_dir) / "batch_keys.jsonl"
        record = {"step": trainer.global_step, "rank": trainer.global_rank, "keys": batch["keys"]}
        if "n_retrieved" in batch:
            record["n_retrieved"] = [int(n) for n in batch["n_retrieved"]]
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
