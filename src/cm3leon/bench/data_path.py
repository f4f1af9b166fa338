"""Data-path throughput on paper-shaped examples: can one DataLoader worker feed the GPUs?

One process builds training sequences exactly as a DataLoader worker does (`CM3DataModule`'s
train stream + collate): token-shard read and decode, retrieval lookup (`NeighbourPool`: the
sample's pool, k documents from the token store), sequence layout and the CM3 transform, at the
paper's shapes (`cm3leon.data.paper_shaped`: 1,024 image tokens per document, seq 4,096). The peer
is what the paper's GPUs consume: `gpu_seq_per_s` sequences of 4,096 tokens per second per GPU
(≈43 for 350M at 60% MFU, issue 15); `workers_per_gpu` is how many such processes one GPU needs.
Sequence packing is not part of the measured path (it is not in the DataModule yet).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from cm3leon.data.paper_shaped import SYNTHETIC_ENCODER, make_paper_data

PAPER_GPU_SEQ_PER_S = 43.0  # 350M at 60% MFU, sequences of 4,096 tokens per GPU (issue 15)


def _rate(tokens_dir: Path, k: int, n_seq: int, micro_batch: int, seq_len: int) -> dict:
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
        n, tokens, t0 = 0, 0, time.perf_counter()
        while n < n_seq:
            batch = next(it)
            n += batch["input_ids"].shape[0]
            tokens += int((batch["input_ids"] != 1).sum())
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"seq_per_s": round(n / dt, 1), "mean_tokens": round(tokens / n), "n": n}


def bench_data_path(
    n_train: int = 2048,
    n_seq: int = 512,
    k: int = 2,
    seq_len: int = 4096,
    micro_batch: int = 8,
    gpu_seq_per_s: float = PAPER_GPU_SEQ_PER_S,
) -> dict:
    """Sequences/s one process builds at seq_len with k retrieved documents (and without retrieval),
    and the ratio to what one GPU consumes."""
    with tempfile.TemporaryDirectory() as tmp:
        make_paper_data(tmp, n_train=n_train, n_val=64, seed=0, shard_size=512)
        with_retrieval = _rate(Path(tmp), k, n_seq, micro_batch, seq_len)
        without = _rate(Path(tmp), 0, n_seq, micro_batch, seq_len)
    rate = with_retrieval["seq_per_s"]
    return {
        "seq_len": seq_len,
        "k": k,
        "seq_per_s_per_core": rate,
        "mean_real_tokens": with_retrieval["mean_tokens"],
        "seq_per_s_no_retrieval": without["seq_per_s"],
        "mean_real_tokens_no_retrieval": without["mean_tokens"],
        "gpu_seq_per_s": gpu_seq_per_s,
        "ratio_to_gpu": round(rate / gpu_seq_per_s, 2),
        "workers_per_gpu": round(gpu_seq_per_s / rate, 2),
        "goal_seq_per_s": 200,
        "packing": "not measured (no packing in the data path yet)",
    }
