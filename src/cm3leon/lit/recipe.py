"""The training recipe's arithmetic on a composed `conf/train.yaml`: processes (devices x nodes),
the gradient accumulation that reaches the global batch in tokens, the step count that spends the
token budget, and the dry run (the model's sizes and FLOPs built on the meta device: nothing
allocated, no data read but meta.json and, when present, a sample of one token shard).

    trainer = hydra.utils.instantiate(cfg.trainer, accumulate_grad_batches=accumulation(cfg),
                                      max_steps=max_steps(cfg), ...)
    print(json.dumps(dry_run(cfg)))         # python src/train.py experiment=paper_7b dry_run=true

Honest accounting: `tokens_per_step` is nominal (sequences x seq_len); the dry run also estimates the
real (non-pad target) tokens per step from the data (`expected_real_tokens`), and its GPU-hours
count real tokens at `estimate.mfu` of `estimate.peak_tflops`.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cm3leon.errors import UsageError


def world_size(trainer_cfg: DictConfig) -> int:
    """Training processes: trainer.devices (a count, a list of ids, or "auto") x trainer.num_nodes."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices == "auto":
        import torch

        devices = max(1, torch.cuda.device_count()) if trainer_cfg.accelerator == "gpu" else 1
    n = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)) else int(devices)
    return n * int(trainer_cfg.get("num_nodes", 1))


def accumulation(cfg: DictConfig) -> int:
    """trainer.accumulate_grad_batches that reaches `global_batch_tokens` (null: the trainer's value).

    tokens per optimizer step = processes x data.micro_batch_size x data.seq_len x accumulation.
    """
    if cfg.global_batch_tokens is None:
        return int(cfg.trainer.accumulate_grad_batches)
    per_step = world_size(cfg.trainer) * cfg.data.micro_batch_size * cfg.data.seq_len
    if cfg.global_batch_tokens % per_step:
        raise UsageError(
            f"global_batch_tokens={cfg.global_batch_tokens} is not a multiple of devices x nodes x "
            f"micro_batch_size x seq_len = {per_step}; change data.micro_batch_size or trainer.devices"
        )
    return cfg.global_batch_tokens // per_step


def max_steps(cfg: DictConfig) -> int | None:
    """The run's optimizer steps, decided here only: `trainer.max_steps` when set (an explicit
    override wins), else ceil(token_budget / global_batch_tokens), else trainer.max_steps as it is
    (None or -1: checks.check_max_steps then stops the run)."""
    steps = cfg.trainer.get("max_steps")
    if steps is not None and steps != -1:
        return steps  # as given: checks.check_max_steps judges it
    budget = cfg.get("token_budget")
    if budget is None:
        return steps  # None or Lightning's -1 ("unset"): checks.check_max_steps names it
    if not cfg.global_batch_tokens:
        raise UsageError(f"token_budget={budget} needs global_batch_tokens (tokens per step) to derive max_steps")
    return math.ceil(int(budget) / int(cfg.global_batch_tokens))


def _shard_documents(train_dir: Path, n: int) -> list | None:
    """Up to `n` documents (text ids, codes) of the first token shard(s), or None when none exist."""
    from cm3leon.data.sequences import Document
    from cm3leon.data.token_shards import decode_sample
    from cm3leon.data.token_stream import read_token_shard

    docs: list = []
    for shard in sorted(train_dir.glob("*.tar")):
        for raw in read_token_shard(str(shard)):
            s = decode_sample(raw)
            docs.append(Document(text_ids=s.text_ids, codes=s.codes))
            if len(docs) >= n:
                return docs
    return docs or None


def expected_real_tokens(cfg: DictConfig, vocab=None) -> dict:
    """Mean real (non-pad target) tokens per training sequence and per batch row, and the rows' pad
    fraction, for the composed run's `data.packing`.

    Sequences are laid out by `build_sequence` (the training layout and its over-length policy) with
    k = retrieval.k retrieved documents: from a sample of the training token shards when they exist
    (document i as the query, the next k as its retrieved documents: their lengths, not their
    relevance, matter here), else from the paper's shapes (1,024 image tokens, `estimate.caption_tokens`
    caption tokens). Real targets of a sequence = its length - 1 (inputs and targets are the shifted
    sequence); the CM3 transform's sentinel ids (+2 per masked span, ~Poisson(1) spans, cut at
    seq_len) are not counted. Without packing one sequence occupies one batch row of seq_len
    positions; with packing, rows are filled by the DataModule's own `RowPacker` (whole or split).
    """
    import numpy as np

    from cm3leon.data.packing import packing_mode, pad_fraction
    from cm3leon.data.sequences import Document, build_sequence
    from cm3leon.vocab import Vocab

    vocab = vocab or Vocab.paper()
    seq_len, k = int(cfg.data.seq_len), int(cfg.retrieval.get("k", 0) or 0)
    est = cfg.get("estimate") or {}
    train_dir = Path(cfg.data.tokens_dir) / "train"
    docs = _shard_documents(train_dir, int(est.get("sample", 512)) + k) if train_dir.is_dir() else None
    if docs and len(docs) > k:
        source = f"token shards ({len(docs)} documents of {train_dir})"
    else:
        cap = int(est.get("caption_tokens", 20))
        docs = [Document(text_ids=np.full(cap, 4, dtype=np.int64), codes=np.zeros(1024, dtype=np.int64))] * (k + 64)
        source = f"paper shapes (no token shards: 1,024 image tokens + {cap} caption tokens per document)"
    lengths, kept = [], []
    for i in range(len(docs) - k):
        try:
            ids, n_kept = build_sequence(docs[i + k], docs[i : i + k], vocab, seq_len)
        except ValueError as e:  # paper-shaped documents in a short context (the world's 512)
            from cm3leon.errors import UsageError

            raise UsageError(
                f"dry run: {source} do not fit data.seq_len={seq_len} ({e}); make the token shards first "
                "(`make data`, or one training run) so the estimate reads their real lengths"
            ) from None
        lengths.append(len(ids))
        kept.append(n_kept)
    mode = packing_mode(cfg.data.get("packing"))
    mean_len = float(np.mean(lengths))
    if mode == "none":
        pad = 1.0 - (mean_len - 1) / seq_len
    else:
        pad = pad_fraction(lengths, seq_len, split=mode == "split")
    return {
        "source": source,
        "retrieved_per_sequence": {"k": k, "kept_mean": float(np.mean(kept))},
        "tokens_per_sequence": mean_len,
        "real_tokens_per_sequence": mean_len - 1,
        "packing": mode,
        "pad_fraction": pad,
        "real_tokens_per_row": seq_len * (1.0 - pad),
    }


def dry_run(cfg: DictConfig) -> dict:
    """Model sizes, batch and FLOPs of the composed run, without allocating anything (meta device).

    The vocabulary is the token shards' when their meta.json exists, else the paper's table.
    """
    import torch

    from cm3leon.data.token_shards import load_token_vocab
    from cm3leon.model import CM3LeonLM, ModelConfig
    from cm3leon.vocab import Vocab

    tokens = Path(cfg.data.tokens_dir)
    try:
        vocab, _ = load_token_vocab(tokens / "train", tokens / "val", **cfg.data.get("vocab", {}))
        vocab_source = "token shards"
    except FileNotFoundError:
        vocab, vocab_source = Vocab.paper(), "paper (no token shards found)"
    with torch.device("meta"):
        model = CM3LeonLM(ModelConfig.from_dict(cfg.model, vocab_size=vocab.size))
    accum = accumulation(cfg)
    rows_per_step = world_size(cfg.trainer) * cfg.data.micro_batch_size * accum  # sequences or packed rows
    tokens_per_step = rows_per_step * cfg.data.seq_len
    fpt = model.flops_per_token(cfg.data.seq_len)
    steps = max_steps(cfg)
    real = expected_real_tokens(cfg, vocab if vocab_source == "token shards" else None)
    real_per_step = round(rows_per_step * real["real_tokens_per_row"])
    est = cfg.get("estimate") or {}
    mfu, peak = float(est.get("mfu", 0.45)), float(est.get("peak_tflops", 989))
    gpu_hours = None if steps is None else fpt * real_per_step * steps / (mfu * peak * 1e12) / 3600
    return {
        "model": cfg.model.name,
        "params": model.num_params(),
        "params_non_embedding": model.num_params(exclude_embeddings=True),
        "vocab_size": vocab.size,
        "vocab_source": vocab_source,
        "seq_len": cfg.data.seq_len,
        "world_size": world_size(cfg.trainer),
        "micro_batch_size": cfg.data.micro_batch_size,
        "accumulate_grad_batches": accum,
        "accumulation_rounding": "none: global_batch_tokens must be a multiple of devices x nodes x "
        "micro_batch_size x seq_len, else the run stops (UsageError)",
        "tokens_per_step": tokens_per_step,
        "tokens_per_step_note": "nominal: batch rows x seq_len, padding included",
        "real_tokens_per_step": real_per_step,
        "real_fraction": real_per_step / tokens_per_step,
        "real_tokens_source": real["source"],
        "real_tokens_per_sequence": real["real_tokens_per_sequence"],
        "retrieved_per_sequence": real["retrieved_per_sequence"],
        "packing": real["packing"],
        "pad_fraction": round(real["pad_fraction"], 4),
        "flops_per_token": fpt,
        "flops_per_step": fpt * tokens_per_step,
        "token_budget": cfg.get("token_budget"),
        "max_steps": steps,
        "max_steps_source": "token_budget / global_batch_tokens"
        if cfg.trainer.get("max_steps") in (None, -1) and steps is not None
        else "trainer.max_steps",
        "real_tokens_total": None if steps is None else real_per_step * steps,
        "mfu": mfu,
        "peak_tflops_per_gpu": peak,
        "gpu_hours": None if gpu_hours is None else round(gpu_hours),
        "gpu_hours_note": "FLOPs/token x real tokens / (mfu x peak): mfu counts real tokens only",
        "days_on_world_size": None if gpu_hours is None else round(gpu_hours / 24 / world_size(cfg.trainer), 1),
        "lr": cfg.optim.lr,
        "warmup_steps": cfg.optim.warmup_steps,
        "final_lr_ratio": cfg.optim.get("final_lr_ratio"),
    }
