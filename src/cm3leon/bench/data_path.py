"""Data-path throughput on paper-shaped examples: can one DataLoader worker feed the GPUs?

One process builds training batches exactly as a DataLoader worker does (`CM3DataModule`'s train
stream + collate): token-shard read and decode, retrieval lookup (`NeighbourPool`: the sample's
pool, k documents from the token store), sequence layout, the CM3 transform and packing
(`data.packing`), at the paper's shapes (`cm3leon.data.paper_shaped`: 1,024 image tokens per
document, seq 4,096). A "sequence" is a batch row: one example without packing, one row of 4,096
inputs with it. The peer is what the paper's GPUs consume: `gpu_seq_per_s` sequences of 4,096
tokens per second per GPU (≈43 for 350M at 60% MFU, issue 15); `workers_per_gpu` is how many such
processes one GPU needs. Each configuration also reports its pad fraction (1 - real targets / input
positions, as `train/pad_fraction` logs it) and its row length (without packing a batch is padded
to its longest example, so rows vary).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from cm3leon.data.paper_shaped import SYNTHETIC_ENCODER, make_paper_data

PAPER_GPU_SEQ_PER_S = 43.0  # 350M at 60% MFU, sequences of 4,096 tokens per GPU (issue 15)


def _rate(tokens_dir: Path, k: int, n_seq: int, micro_batch: int, seq_len: int, packing: str = "none") -> dict:
    import torch

    from cm3leon.data.datamodule import CM3DataModule

    retrieval = (
        {"k": k, "encoder": {"model_name": SYNTHETIC_ENCODER["model_name"], "pretrained": "none"}} if k else None
    )
    dm = CM3DataModule(
        tokens_dir=str(tokens_dir),
        seq_len=seq_len,
        micro_batch_size=micro_batch,
        num_workers=0,
        retrieval=retrieval,
        embedded_world=False,
        pin_memory=False,
        packing=packing,
        vocab={"base_size": 65536, "n_sentinels": 514},
        objective={
            "transform": {"poisson_lambda": 1.0, "max_spans": 511, "allow_cross_break": False, "rotation_rate": 0.2}
        },
    )
    dm.prepare_data()
    dm.setup("fit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker core
    try:
        it = iter(dm.train_dataloader())
        next(it)  # warm-up: opens the shards and memory maps
        n, real, positions, t0 = 0, 0, 0, time.perf_counter()
        while n < n_seq:
            batch = next(it)
            n += batch["input_ids"].shape[0]
            real += batch["n_real"]
            positions += batch["input_ids"].numel()
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {
        "seq_per_s": round(n / dt, 1),
        "real_tokens_per_seq": round(real / n),
        "mean_row_len": round(positions / n),
        "pad_fraction": round(1 - real / positions, 4),
        "n": n,
    }


def bench_data_path(
    n_train: int = 2048,
    n_seq: int = 512,
    k: int = 2,
    seq_len: int = 4096,
    micro_batch: int = 8,
    gpu_seq_per_s: float = PAPER_GPU_SEQ_PER_S,
) -> dict:
    """Sequences (batch rows)/s one process builds at seq_len, and their pad fraction, with k
    retrieved documents and without retrieval, for each `data.packing` mode; the headline is the
    paper recipes' setting (k retrieved, packing split) and its ratio to what one GPU consumes."""
    with tempfile.TemporaryDirectory() as tmp:
        make_paper_data(tmp, n_train=n_train, n_val=64, seed=0, shard_size=512)
        table = {
            f"k{kk}_{mode}": _rate(Path(tmp), kk, n_seq, micro_batch, seq_len, mode)
            for kk in (k, 0)
            for mode in ("none", "whole", "split")
        }
    head = table[f"k{k}_split"]
    rate = head["seq_per_s"]
    return {
        "seq_len": seq_len,
        "k": k,
        "packing": "split",
        "seq_per_s_per_core": rate,
        "pad_fraction": head["pad_fraction"],
        "real_tokens_per_seq": head["real_tokens_per_seq"],
        "gpu_seq_per_s": gpu_seq_per_s,
        "ratio_to_gpu": round(rate / gpu_seq_per_s, 2),
        "workers_per_gpu": round(gpu_seq_per_s / rate, 2),
        "goal_seq_per_s": 200,
        "by_setting": table,
    }
