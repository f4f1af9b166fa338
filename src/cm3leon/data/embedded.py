"""Prepare the embedded world for training on first use: raw shards, then token shards made
with the shipped tokenizers (data/shipped). Each step is skipped when its output is complete.

Token shards made with other tokenizer files than the shipped ones (an older checkout's VQGAN, say)
are stale: the token folder, and the retrieval files built from it, are removed and made again."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from cm3leon.data.preprocess import PreprocessConfig, other_tokenizer, preprocess_split, summary_line, tokenizer_files
from cm3leon.data.token_shards import META_FILE, REPORT_FILE
from cm3leon.data.world import WorldConfig, ensure_world


def _tokens_complete(split_dir: Path, raw_split: Path) -> bool:
    report = split_dir / REPORT_FILE
    if not (split_dir / META_FILE).is_file() or not report.is_file():
        return False
    return json.loads(report.read_text())["shards"] == len(list(raw_split.glob("*.tar")))


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
    if any(other_tokenizer(tokens / split, files) for split in ("train", "val")):
        print(
            f"[world] {tokens} was made with other tokenizers than {shipped_dir}: removing it to tokenize again",
            flush=True,
        )
        shutil.rmtree(tokens)
    for split in ("train", "val"):
        if not _tokens_complete(tokens / split, raw / split):
            print(
                f"[world] tokenizing the embedded world's {split} split (first use) into {tokens / split}", flush=True
            )
            print(summary_line(preprocess_split(str(raw / split), tokens / split, cfg)), flush=True)
    return tokens
