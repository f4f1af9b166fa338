"""One training step (forward + backward) of our model vs Hugging Face `OPTForCausalLM`, same dims.

    from cm3leon.bench.train_step import bench_train_step
    bench_train_step("cpu")   # {'ours_ms': ..., 'hf_ms': ..., 'speedup': hf_ms / ours_ms, ...}

The reference is OPT configured as the paper's architecture: no biases, no dropout, LayerNorm
without affine parameters, ReLU, pre-LN, tied embeddings, SDPA attention. Both models see the same
batch and the same precision (fp32 on CPU, bf16 autocast on CUDA); each computes the loss its own
way: HF as its users do (logits, then fp32 cross-entropy), ours as training does (the fused chunked
head + cross-entropy of `cm3leon/loss.py`, no [B, T, V] logits; `compile=True` also compiles our
blocks, as `compile=true` in training). Timed in the same process: each model's number is the median of `steps`
steps after `warmup` steps, measured twice in alternation (ours, HF, ours, HF), the better kept. On CUDA the result also holds the 350M model at sequence length 4096 in bf16:
tokens/s and MFU against the H100 dense bf16 peak (989 TFLOP/s), FLOPs from `flops_per_token`.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from cm3leon.config import load_model_config
from cm3leon.model import CM3LeonLM, ModelConfig
from cm3leon.vocab import Vocab

H100_BF16_PEAK_FLOPS = 989e12  # dense bf16, SXM


def hf_opt_reference(cfg: ModelConfig):
    """`OPTForCausalLM` with the dims and the architecture choices of `cfg` (random init): the
    export's config (`cm3leon.export_hf.opt_config`), SDPA attention, no cache."""
    from transformers import OPTForCausalLM

    from cm3leon.export_hf import opt_config

    hf_cfg = opt_config(cfg)
    hf_cfg.use_cache = False
    hf_cfg._attn_implementation = "sdpa"
    return OPTForCausalLM(hf_cfg)


def _time_steps(step, device: str, steps: int, warmup: int) -> float:
    """Median wall time of step() in milliseconds."""
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _make_step(model, x, y, vocab_size: int, device: str, hf: bool, optimizer=None):
    """One training step: forward, loss, backward (and `optimizer.step()` when given)."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()

    def step():
        model.zero_grad(set_to_none=True)
        with amp:
            if hf:
                logits = model(input_ids=x, use_cache=False).logits  # [B, T, V]
                loss = F.cross_entropy(logits.float().view(-1, vocab_size), y.reshape(-1))
            else:
                loss = model(x, targets=y)[0] / y.numel()
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    return step


def bench_train_step(
    device: str = "cpu",
    *,
    conf_dir: str | Path,
    size: str = "tiny",
    batch_size: int | None = None,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    steps: int = 5,
    warmup: int = 2,
    seed: int = 0,
    with_350m: bool = True,
    compile: bool = False,
) -> dict:
    """Time one forward+backward step of `size` (conf_dir/model/<size>.yaml) for our model and HF
    OPT; on CUDA add 350M numbers.

    Defaults: CPU batch 4 x seq 256, vocab 16,384 (a small world's table); CUDA batch 8 x the size's
    max_seq_len with the paper's vocabulary. Returns a dict of milliseconds, the speed-up
    (hf_ms / ours_ms, > 1 means ours is faster) and, on CUDA, `gpu_350m` with tokens/s and MFU.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_train_step(device='cuda') but no CUDA device is visible; use device='cpu'")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: use 'cpu' or 'cuda'")
    on_gpu = device == "cuda"
    vocab_size = vocab_size or (Vocab.paper().size if on_gpu else 16_384)
    cfg = load_model_config(conf_dir, size, vocab_size=vocab_size)
    B = batch_size or (8 if on_gpu else 4)
    T = seq_len or (cfg.max_seq_len if on_gpu else 256)

    torch.manual_seed(seed)
    data = torch.randint(4, vocab_size, (B, T + 1), device=device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    ours = CM3LeonLM(cfg).to(device).train()
    if compile:
        for block in ours.blocks:
            block.compile()
    theirs = hf_opt_reference(cfg).to(device).train()
    result = dict(
        device=device,
        size=size,
        batch_size=B,
        seq_len=T,
        vocab_size=vocab_size,
        params_ours=ours.num_params(),
        params_hf=sum(p.numel() for p in theirs.parameters()),
        torch_threads=torch.get_num_threads(),
        compile=compile,
    )
    # alternate the two so that a noisy neighbour on the machine hits both alike
    t_ours, t_hf = [], []
    for _ in range(2):
        t_ours.append(_time_steps(_make_step(ours, x, y, vocab_size, device, False), device, steps, warmup))
        t_hf.append(_time_steps(_make_step(theirs, x, y, vocab_size, device, True), device, steps, warmup))
    result.update(ours_ms=min(t_ours), hf_ms=min(t_hf))
    result["speedup"] = result["hf_ms"] / result["ours_ms"]
    flops = ours.flops_per_token(T)
    for who in ("ours", "hf"):
        tokens_per_s = B * T / (result[f"{who}_ms"] / 1e3)
        result[f"{who}_tokens_per_s"] = tokens_per_s
        result[f"{who}_mfu"] = flops * tokens_per_s / H100_BF16_PEAK_FLOPS if on_gpu else None
    del ours, theirs
    if on_gpu and with_350m:
        result["gpu_350m"] = bench_350m_gpu(conf_dir, seed=seed)
    return result


def bench_350m_gpu(
    conf_dir: str | Path, batch_size: int = 4, seq_len: int = 4096, steps: int = 5, warmup: int = 2, seed: int = 0
) -> dict:
    """350M at seq 4096, bf16 autocast, forward+backward: tokens/s and MFU vs 989 TFLOP/s."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_350m_gpu needs a CUDA device")
    torch.manual_seed(seed)
    torch.cuda.reset_peak_memory_stats()
    cfg = load_model_config(conf_dir, "350m", max_seq_len=seq_len)
    model = CM3LeonLM(cfg).cuda().train()
    data = torch.randint(4, cfg.vocab_size, (batch_size, seq_len + 1), device="cuda")
    step = _make_step(model, data[:, :-1].contiguous(), data[:, 1:].contiguous(), cfg.vocab_size, "cuda", False)
    ms = _time_steps(step, "cuda", steps, warmup)
    tokens_per_s = batch_size * seq_len / (ms / 1e3)
    flops = model.flops_per_token(seq_len)
    return dict(
        batch_size=batch_size,
        seq_len=seq_len,
        step_ms=ms,
        tokens_per_s=tokens_per_s,
        flops_per_token=flops,
        mfu=flops * tokens_per_s / H100_BF16_PEAK_FLOPS,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
        gpu=torch.cuda.get_device_name(),
    )
