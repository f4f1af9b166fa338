"""Builders of small embedded-world data sets for tests (imported by conftest.py fixtures)."""

from __future__ import annotations

from pathlib import Path

from cm3leon.data.preprocess import PreprocessConfig, preprocess_split
from cm3leon.data.world import ensure_world
from project import PROJECT_ROOT

SHIPPED = PROJECT_ROOT / "data" / "shipped"
SHIPPED_VQ = SHIPPED / "world_vqgan.ckpt"
SHIPPED_BPE = SHIPPED / "world_bpe.json"


def make_tiny_tokens(root: Path, n_train: int = 192, n_val: int = 64, shard_size: int = 32) -> Path:
    """A small world (raw shards + token shards made with the shipped tokenizers) under `root`."""
    raw = ensure_world(out_dir=str(root / "raw"), n_train=n_train, n_val=n_val, shard_size=shard_size, num_workers=1)
    cfg = PreprocessConfig(image_tokenizer=str(SHIPPED_VQ), text_tokenizer=str(SHIPPED_BPE), num_workers=1)
    for split in ("train", "val"):
        preprocess_split(str(raw / split), root / "tokens" / split, cfg, progress=False)
    return root / "tokens"
