"""Prepare the embedded world for training on first use: raw shards, then token shards made
with the shipped tokenizers (data/shipped). Each step is skipped when its output is complete."""

from __future__ import annotations

import json
from pathlib import Path

from cm3leon.data.preprocess import PreprocessConfig, preprocess_split, summary_line
from cm3leon.data.token_shards import META_FILE, REPORT_FILE
from cm3leon.data.world import ensure_world


def _tokens_complete(split_dir: Path, raw_split: Path) -> bool:
    report = split_dir / REPORT_FILE
    if not (split_dir / META_FILE).is_file() or not report.is_file():
        return False
    return json.loads(report.read_text())["shards"] == len(list(raw_split.glob("*.tar")))


def ensure_embedded_tokens(world_dir: str | Path, shipped_dir: str | Path, num_workers: int = 2) -> Path:
    """Make `world_dir/raw` and `world_dir/tokens/{train,val}` when missing; return the tokens folder."""
    world_dir, shipped_dir = Path(world_dir), Path(shipped_dir)
    raw = ensure_world(out_dir=str(world_dir / "raw"), num_workers=num_workers)
    tokens = world_dir / "tokens"
    cfg = PreprocessConfig(
        image_tokenizer=str(shipped_dir / "world_vqgan.ckpt"),
        text_tokenizer=str(shipped_dir / "world_bpe.json"),
        num_workers=num_workers,
    )
    for split in ("train", "val"):
        if not _tokens_complete(tokens / split, raw / split):
            print(f"[world] tokenizing the embedded world's {split} split (first use) into {tokens / split}", flush=True)
            print(summary_line(preprocess_split(str(raw / split), tokens / split, cfg)), flush=True)
    return tokens
