"""VQGAN encode throughput (images/s) for the tiny and paper256 architectures, random weights.

    from cm3leon.bench.vq import bench_vq
    bench_vq("cpu")   # {'device': 'cpu', 'tiny': {'images_per_s': ..., 'batch': 16, ...}, 'paper256': {...}}

Each number is the median over `iters` timed calls of `ImageTokenizer.encode` (images already in
[-1, 1], so preprocessing is not timed) after one warm-up call. On CUDA, paper256 runs in bf16
autocast as well as fp32.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch

from cm3leon.tokenizers.image_tokenizer import ImageTokenizer


def _encode_rate(name: str, device: str, batch: int, iters: int, bf16: bool = False) -> dict:
    tok = ImageTokenizer.from_config(name, device=device)
    x = torch.rand(batch, 3, tok.resolution, tok.resolution, device=device) * 2 - 1
    ctx = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext()
    times = []
    with ctx:
        for i in range(iters + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tok.encode(x)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up (allocator, kernels)
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "images_per_s": round(batch / med, 2),
        "ms_per_batch": round(med * 1e3, 2),
        "batch": batch,
        "resolution": tok.resolution,
        "tokens_per_image": tok.tokens_per_image,
        "dtype": "bf16-autocast" if bf16 else "fp32",
    }


def bench_vq(device: str | torch.device = "cpu", iters: int = 3) -> dict:
    """Encode images/s of the tiny (64 px) and paper256 (256 px) VQGANs with random weights."""
    device = torch.device(device).type
    gpu = device == "cuda"
    out: dict = {"device": device}
    out["tiny"] = _encode_rate("tiny", device, batch=256 if gpu else 32, iters=iters)
    # paper256 is ~50 GMAC per 256 px image: keep the CPU run to a few images
    out["paper256"] = _encode_rate("paper256", device, batch=32 if gpu else 1, iters=iters if gpu else min(iters, 2))
    if gpu:
        out["paper256_bf16"] = _encode_rate("paper256", device, batch=32, iters=iters, bf16=True)
    return out
