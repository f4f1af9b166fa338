"""Prepare the embedded world for training on first use: raw shards, then token shards made
with the shipped tokenizers (data/shipped). Each step is skipped when its output is up to date.

These folders are the project's own cache, so they follow their inputs without asking: token
shards made with other tokenizer files than the shipped ones (an older checkout's VQGAN, say), or
from raw shards that were generated again, are made again (`preprocess_split(overwrite=True)`),
and the retrieval files built from them are then stale and rebuilt by `ensure_retrieval`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cm3leon.data.preprocess import PreprocessConfig, plan_split, preprocess_split, summary_line, tokenizer_files
from cm3leon.data.world import WorldConfig, ensure_world


def ensure_embedded_tokens(
    world: Mapping | WorldConfig, tokens_dir: str | Path, shipped_dir: str | Path, num_workers: int = 2
) -> Path:
    """Make the world's raw shards (`world`: WorldConfig fields, out_dir required; tests make small
    worlds with n_train=..., n_val=...) and `tokens_dir/{train,val}` when missing or stale, with the
    tokenizers in `shipped_dir`; return `tokens_dir`."""
    raw = ensure_world(world, num_workers=num_workers)
    tokens, shipped_dir = Path(tokens_dir), Path(shipped_dir)
    cfg = PreprocessConfig(
        image_tokenizer=str(shipped_dir / "world_vqgan.ckpt"),
        text_tokenizer=str(shipped_dir / "world_bpe.json"),
        num_workers=num_workers,
    )
    files = tokenizer_files(cfg)  # hashed once for both splits
    for split in ("train", "val"):
        plan = plan_split(str(raw / split), tokens / split, files)
        if plan.up_to_date and (tokens / split / "report.json").is_file():
            continue
        if not (tokens / split).is_dir():
            why = "first use"
        elif plan.other_tokenizer:
            why = f"it was made with other tokenizers than {shipped_dir}"
        elif plan.remade:
            why = f"{len(plan.remade)} of its raw shards changed"
        else:
            why = "incomplete"
        print(f"[world] tokenizing the embedded world's {split} split ({why}) into {tokens / split}", flush=True)
        print(summary_line(preprocess_split(str(raw / split), tokens / split, cfg, overwrite=True)), flush=True)
    return tokens
