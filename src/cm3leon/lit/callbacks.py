"""Lightning callbacks of the main job: a data-order log, honest token accounting (real = non-pad
target tokens) and the batch measures `ThroughputMonitor` needs. (Sample grids and image metrics:
`cm3leon.eval.callback.SampleCallback`.)"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import lightning as L


def batch_size_fn(batch: dict) -> int:
    """Sequences in a batch (for ThroughputMonitor)."""
    return int(batch["input_ids"].shape[0])


IGNORE_INDEX = -100  # cm3leon.data.sequences.IGNORE_INDEX: targets without loss (padding)


def real_tokens(batch: dict):
    """Real tokens of a batch: its targets that carry loss (!= -100). The DataModule counts them on
    the CPU (`n_real`, an int); otherwise a 0-d tensor (no device sync until it is read)."""
    return batch["n_real"] if "n_real" in batch else (batch["targets"] != IGNORE_INDEX).sum()


def batch_tokens_fn(batch: dict) -> int:
    """Real (non-pad target) tokens in a batch, for ThroughputMonitor's length_fn: its items/s are real
    tokens/s. (Its MFU is the module's `flops_per_batch` per second, which must then refer to real
    tokens too: FLOPs/token x real tokens, not x B x T.)"""
    return int(real_tokens(batch))


class TokenAccounting(L.Callback):
    """Log, per optimizer step (all micro-batches of the accumulation, all ranks summed):
    `train/real_tokens` (non-pad targets), `train/pad_fraction` (1 - real / input positions, the
    positions being `input_ids`' B x T: what the GPUs computed) and `train/real_tokens_per_sec`
    (real tokens over the wall time since the previous step ended: data loading included)."""

    def __init__(self) -> None:
        self._real = None  # device tensor: no sync per micro-batch
        self._positions = 0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = real_tokens(batch)
        self._real = n if self._real is None else self._real + n
        self._positions += int(batch["input_ids"].numel())
        if (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)):
            return  # the optimizer step is not over
        import torch

        if torch.is_tensor(self._real) or trainer.world_size > 1:
            # a device count, or other ranks' counts: one reduction per optimizer step (a host sync)
            real = self._real.double() if torch.is_tensor(self._real) else torch.tensor(float(self._real))
            totals = torch.stack(
                [
                    real.to(pl_module.device),
                    torch.tensor(float(self._positions), dtype=torch.float64, device=pl_module.device),
                ]
            )
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
            real, positions = float(totals[0]), float(totals[1])
        else:  # the DataModule's CPU counts on one rank: no device work at all
            real, positions = float(self._real), float(self._positions)
        now = time.perf_counter()
        elapsed = max(now - (self._t0 or now), 1e-9)
        self._real, self._positions, self._t0 = None, 0, now
        pl_module.log_dict(
            {
                "train/real_tokens": real,
                "train/pad_fraction": 1.0 - real / max(positions, 1.0),
                "train/real_tokens_per_sec": real / elapsed,
            },
            on_step=True,
            on_epoch=False,
            batch_size=int(batch["input_ids"].shape[0]),
        )


class BatchKeysRecorder(L.Callback):
    """Append the sample keys of every training batch to `<run dir>/batch_keys.jsonl`
    (one JSON line per batch: step, rank, keys, `ids_sha1` of the input ids, and n_retrieved: the
    retrieved documents before each query): the data-order log that resume and retrieval tests read.
    (A debugging aid: hashing the ids copies them to the host every batch.)"""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = Path(trainer.default_root_dir) / "batch_keys.jsonl"
        ids_sha1 = hashlib.sha1(batch["input_ids"].detach().cpu().numpy().tobytes()).hexdigest()
        record = {"step": trainer.global_step, "rank": trainer.global_rank, "keys": batch["keys"], "ids_sha1": ids_sha1}
        if "n_retrieved" in batch:
            record["n_retrieved"] = [int(n) for n in batch["n_retrieved"]]
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
