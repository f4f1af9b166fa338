"""One prepared GPU check (issue 16): every GPU path of the project, measured against its peer in
one run, written as one JSON file and one Markdown table.

    python src/gpu_check.py --out logs/gpu_check          # on one H100/H200: about 8 minutes
    python src/gpu_check.py --out DIR --tiny              # the same code paths on CPU, tiny shapes (tests)

Sections (each guarded: an error is recorded and the next section runs):

- `train_step_350m`: one training step (forward, loss, backward) of the 350M shape at seq 4096,
  batch 8, bf16: ours (blocks compiled, fused chunked loss) vs Hugging Face `OPTForCausalLM` of the
  same dims (`cm3leon.bench.train_step`); tokens/s and MFU of both.
- `train_stack_350m`: the real stack, `src/train.py experiment=paper_350m` on one GPU (the
  LightningModule, the Trainer, the DataModule on paper-shaped data with retrieval k=2 and split
  packing, compile, bf16, fused AdamW, DataLoader workers): real tokens/s and MFU over the timed
  steps (`StepTimer`), with the data path and optimizer included.
- `train_7b_proxy`: a 7B-width model (d 4096, 32 heads, the 7B vocabulary) with 4 of its 32 layers,
  activation checkpointing, compiled blocks, fused AdamW step included: MFU (one GPU cannot hold
  the 32-layer 7B with its optimizer state; FSDP2 across GPUs is `trainer=fsdp2`).
- `flex`: packed rows (split packing of ~1-3k-token examples) through 4 layers of the 350M shape:
  FlexAttention vs SDPA with a dense block-diagonal mask vs plain causal flash SDPA (the upper
  bound): max logit difference and forward+backward ms.
- `generate_350m`, `generate_350m_batch`, `generate_7b`: s/image at batch 1 with CFG (eager and
  CUDA graph) vs HF `generate`, images/s at batch 256, 7B s/image (`cm3leon.bench.generate`).
- `retrieval`: `cm3leon.bench.retrieval.bench_retrieval` (encoder embeddings/s, index build and
  search, GPU FAISS when installed).

MFU: 6N + 12 L d T FLOPs per real token over 989 TFLOP/s (dense bf16 H100/H200).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

PEAK_FLOPS = 989e12
ROOT = Path(__file__).resolve().parents[3]
CONF = ROOT / "conf"
GOALS = {  # issue 16
    "train_step_350m": "ours >= 60% MFU and >= 1.4x HF",
    "train_stack_350m": ">= 60% MFU",
    "train_7b_proxy": ">= 45% MFU",
    "generate_350m": "<= 1.5 s/image (batch 1, CFG)",
    "generate_350m_batch": ">= 25 images/s",
    "generate_7b": "<= 6 s/image (batch 1, CFG)",
}


class StepTimer(L.Callback):
    """Times training steps `warmup`..end (device-synchronised at both ends) and writes
    `<run dir>/step_timer.json`: steps, seconds, real tokens (the DataModule's CPU counts), real
    tokens/s, MFU and peak memory. For benchmarks: the synchronisations are only at the ends."""

    def __init__(self, warmup: int = 3, peak_flops: float = PEAK_FLOPS):
        self.warmup, self.peak_flops = warmup, peak_flops
        self._t0: float | None = None
        self._real = self._steps = 0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self._t0 is None:
            self._sync(pl_module)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is not None:
            self._real += int(batch["n_real"])
            self._steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._t0 is None or not self._steps:
            return
        self._sync(pl_module)
        seconds = time.perf_counter() - self._t0
        T = int(trainer.datamodule.seq_len)
        tokens_per_s = self._real / seconds
        out = {
            "timed_batches": self._steps,
            "seconds": seconds,
            "real_tokens": self._real,
            "real_tokens_per_s": tokens_per_s,
            "mfu": pl_module.model.flops_per_token(T) * tokens_per_s / self.peak_flops,
            "params": pl_module.model.num_params(),
        }
        if pl_module.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        Path(trainer.default_root_dir, "step_timer.json").write_text(json.dumps(out))


def _guarded(fn) -> dict:
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # one section failing must not lose the others' numbers
        out = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def train_stack(tiny: bool, work: Path) -> dict:
    """`src/train.py experiment=paper_350m` on one device for a few steps, timed by StepTimer."""
    from cm3leon.data.paper_shaped import make_paper_data, train_overrides

    data = work / "paper_data"
    make_paper_data(data, n_train=32 if tiny else 4096, n_val=16, seed=0, shard_size=32 if tiny else 512)
    steps, warmup = (2, 1) if tiny else (12, 4)
    args = [
        "experiment=paper_350m",
        *train_overrides(data),
        f"hydra.run.dir={work / 'train_stack'}",
        "trainer.devices=1",
        "++trainer.num_nodes=1",
        "++trainer.strategy=auto",  # one GPU: no sharding
        f"trainer.max_steps={steps + warmup}",
        "global_batch_tokens=null",
        "+trainer.limit_val_batches=0",
        "logger=csv",
        "callbacks=minimal",
        "+callbacks.timer._target_=cm3leon.bench.gpu_check.StepTimer",
        f"+callbacks.timer.warmup={warmup}",
        "trainer.enable_progress_bar=false",
        "model.activation_checkpointing=false",  # 350M at 8 x 4096 fits without recompute
    ]
    if tiny:
        args += [
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            "data.seq_len=1100",  # one paper-shaped document (1,024 image tokens) and a little more
            "data.micro_batch_size=1",
            "data.num_workers=0",
            "model.n_layer=2",
            "model.d_model=64",
            "model.n_head=2",
        ]
    else:
        args += ["data.micro_batch_size=8", "data.num_workers=4", "compile=true"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *args], capture_output=True, text=True, env=env, timeout=900
    )
    if proc.returncode:
        raise RuntimeError(f"train.py exited {proc.returncode}: {proc.stderr[-600:]}")
    return {
        "command": "src/train.py " + " ".join(args),
        **json.loads((work / "train_stack" / "step_timer.json").read_text()),
    }


def train_7b_proxy(tiny: bool, steps: int = 5, warmup: int = 3) -> dict:
    """7B width, 4 layers, B x 4096, bf16, activation checkpointing, compiled blocks, fused AdamW."""
    from cm3leon.bench.train_step import _make_step, _time_steps
    from cm3leon.config import load_model_config
    from cm3leon.model import CM3LeonLM

    device = "cpu" if tiny else "cuda"
    over = dict(n_layer=2, d_model=64, n_head=2, max_seq_len=128, vocab_size=512) if tiny else dict(n_layer=4)
    cfg = load_model_config(CONF, "7b", activation_checkpointing=True, **over)
    B, T = (2, 128) if tiny else (4, 4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = CM3LeonLM(cfg).train()
        data = torch.randint(4, cfg.vocab_size, (B, T + 1))
    if not tiny:
        for block in model.blocks:
            block.compile()
        torch.cuda.reset_peak_memory_stats()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda" or None)
    step = _make_step(model, data[:, :-1], data[:, 1:], cfg.vocab_size, device, hf=False, optimizer=opt)
    ms = _time_steps(step, device, steps if not tiny else 1, warmup if not tiny else 1)
    tokens_per_s = B * T / (ms / 1e3)
    out = dict(
        proxy="7B width (d 4096, 32 heads, 7B vocabulary), 4 of 32 layers" if not tiny else "tiny",
        params=model.num_params(),
        batch_size=B,
        seq_len=T,
        step_ms=ms,
        tokens_per_s=tokens_per_s,
        mfu=model.flops_per_token(T) * tokens_per_s / PEAK_FLOPS,
    )
    if device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def flex_vs_dense(tiny: bool, steps: int = 5, warmup: int = 2) -> dict:
    """Packed rows through 4 layers of the 350M shape: flex vs dense-mask SDPA vs causal flash."""
    import numpy as np

    from cm3leon.bench.train_step import _time_steps
    from cm3leon.config import load_model_config
    from cm3leon.data.packing import RowPacker, stack_rows
    from cm3leon.model import CM3LeonLM

    device = "cpu" if tiny else "cuda"
    B, T = (2, 96) if tiny else (4, 4096)
    over = dict(n_layer=2, d_model=64, n_head=2, max_seq_len=T, vocab_size=512) if tiny else dict(n_layer=4)
    rng = np.random.default_rng(0)
    lengths = rng.integers(T // 4, 3 * T // 4, 4 * B)
    vocab = 512 if tiny else load_model_config(CONF, "350m").vocab_size
    rows = list(RowPacker(T, 1, split=True).rows({"ids": rng.integers(4, vocab, n)} for n in lengths))[:B]
    packed = stack_rows(rows)
    ids, pos, docs = (torch.from_numpy(a.copy()).to(device) for a in packed.inputs)
    out = {"batch_size": B, "seq_len": T, "examples_per_row": round(sum(len(r.pieces) for r in rows) / B, 2)}
    logits = {}
    for impl in ("sdpa", "flex"):
        torch.manual_seed(0)
        with torch.device(device):
            model = CM3LeonLM(load_model_config(CONF, "350m", attn_impl=impl, zero_init_residual_out=False, **over))
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), amp:
            logits[impl] = model(ids, pos, doc_ids=docs).float()
        if tiny:
            continue  # CPU flex has no backward (torch 2.14): the logits are the check

        def step(model=model, amp=amp):
            model.zero_grad(set_to_none=True)
            with amp:
                loss = model(ids, pos, doc_ids=docs, targets=ids)[0]
            loss.backward()

        out[f"{impl}_dense_mask_ms" if impl == "sdpa" else "flex_ms"] = _time_steps(step, device, steps, warmup)
        if impl == "sdpa":  # the upper bound: the same rows as one causal sequence each (flash)

            def causal(model=model, amp=amp):
                model.zero_grad(set_to_none=True)
                with amp:
                    loss = model(ids, targets=ids)[0]
                loss.backward()

            out["causal_flash_ms"] = _time_steps(causal, device, steps, warmup)
    out["max_logit_diff"] = float((logits["sdpa"] - logits["flex"]).abs().max())
    if "flex_ms" in out:
        out["flex_speedup_vs_dense"] = out["sdpa_dense_mask_ms"] / out["flex_ms"]
    return out


def generation(tiny: bool) -> dict[str, dict]:
    from cm3leon.bench import generate as g

    if tiny:
        return {
            "generate_tiny": _guarded(
                lambda: g.bench_generate("cpu", conf_dir=CONF, vocab_size=512, new_tokens=8, repeats=1)
            )
        }
    return {
        "generate_350m": _guarded(lambda: g.bench_350m_image(CONF)),
        "generate_350m_batch": _guarded(lambda: g.bench_350m_batch(CONF, n_images=256)),
        "generate_7b": _guarded(lambda: g.bench_7b_image(CONF)),
    }


def retrieval(tiny: bool) -> dict:
    from cm3leon.bench.retrieval import bench_retrieval

    if tiny:
        return bench_retrieval("cpu", n=4_000, n_queries=50, stats_n=4_000)
    return bench_retrieval("cuda")  # the open_clip encoder in fp16, batch 1024; GPU FAISS when installed


def run_check(out_dir: str | Path, tiny: bool = False, sections: list[str] | None = None) -> dict:
    """Run the sections (all by default), write `gpu_check.json` and `gpu_check.md` in out_dir."""
    from cm3leon.bench.train_step import bench_train_step

    if not tiny and not torch.cuda.is_available():
        raise RuntimeError("gpu_check needs a CUDA device (or --tiny for the CPU check of its code paths)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    want = lambda name: sections is None or name in sections  # noqa: E731
    result: dict = {
        "device": torch.cuda.get_device_name() if not tiny else "cpu (tiny mode)",
        "torch": torch.__version__,
        "tiny": tiny,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if want("train_step_350m"):
            kw = (
                dict(size="tiny", batch_size=1, seq_len=32, vocab_size=512, steps=1, warmup=1)
                if tiny
                else dict(size="350m", batch_size=8, seq_len=4096, compile=True)
            )
            result["train_step_350m"] = _guarded(
                lambda: bench_train_step("cpu" if tiny else "cuda", conf_dir=CONF, with_350m=False, **kw)
            )
        if want("train_stack_350m"):
            result["train_stack_350m"] = _guarded(lambda: train_stack(tiny, work))
        if want("train_7b_proxy"):
            result["train_7b_proxy"] = _guarded(lambda: train_7b_proxy(tiny))
        if want("flex"):
            result["flex"] = _guarded(lambda: flex_vs_dense(tiny))
        if want("generate"):
            result.update(generation(tiny))
        if want("retrieval"):
            result["retrieval"] = _guarded(lambda: retrieval(tiny))
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "gpu_check.md").write_text(markdown_table(result))
    return result


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown_table(result: dict) -> str:
    """One row per measurement: ours, peer, ratio, MFU, memory, goal."""
    rows = ["| check | ours | peer | ratio | MFU | peak GiB | goal |", "|---|---|---|---|---|---|---|"]

    def row(name, ours, peer=None, ratio=None, mfu=None, mem=None):
        mfu_s = "-" if mfu is None else f"{100 * mfu:.1f}%"
        rows.append(
            f"| {name} | {ours} | {peer or '-'} | {_fmt(ratio)} | {mfu_s} | {_fmt(mem)} | {GOALS.get(name.split(' ')[0], '')} |"
        )

    for name, r in result.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            row(name, f"error: {r['error'][:120]}")
        elif name == "train_step_350m":
            row(
                name,
                f"{_fmt(r['ours_tokens_per_s'], ',.0f')} tok/s",
                f"HF OPT {_fmt(r['hf_tokens_per_s'], ',.0f')} tok/s",
                r["speedup"],
                r.get("ours_mfu"),
            )
        elif name == "train_stack_350m":
            row(name, f"{_fmt(r['real_tokens_per_s'], ',.0f')} real tok/s", None, None, r["mfu"], r.get("peak_mem_gib"))
        elif name == "train_7b_proxy":
            row(name, f"{_fmt(r['tokens_per_s'], ',.0f')} tok/s", None, None, r["mfu"], r.get("peak_mem_gib"))
        elif name == "flex":
            peer = f"dense-mask SDPA {_fmt(r.get('sdpa_dense_mask_ms'))} ms" if "flex_ms" in r else None
            row(
                name,
                f"{_fmt(r.get('flex_ms'))} ms, max diff {_fmt(r['max_logit_diff'])}",
                peer,
                r.get("flex_speedup_vs_dense"),
            )
        elif name == "generate_350m":
            hf = r.get("hf_s_per_image_extrapolated")
            row(
                name,
                f"{_fmt(r['cuda_graph_s_per_image'])} s/image (eager {_fmt(r['eager_s_per_image'])})",
                f"HF {_fmt(hf)} s/image (no CFG)",
                None if hf is None else hf / r["cuda_graph_s_per_image"],
            )
        elif name == "generate_350m_batch":
            row(name, f"{_fmt(r['images_per_s'])} images/s", None, None, None, r.get("peak_mem_gib"))
        elif name == "generate_7b":
            row(
                name,
                f"{_fmt(r['cuda_graph_s_per_image'])} s/image",
                "paper 11.8 s (A100)",
                11.8 / r["cuda_graph_s_per_image"],
                None,
                r.get("peak_mem_gib"),
            )
        elif name == "generate_tiny":
            row(name, f"{_fmt(r['ours_tok_s'])} tok/s", f"HF {_fmt(r['hf_tok_s'])} tok/s", r["speedup"])
        elif name == "retrieval":
            row(name, json.dumps({k: v for k, v in r.items() if not isinstance(v, (dict, list))})[:200])
    return "\n".join(rows) + "\n"
