"""Shared fixtures. Keep this file small; builders live in tests/world_fixtures.py."""

import os
from pathlib import Path

import pytest
from project import PROJECT_ROOT

from cm3leon.data.world import WorldConfig, generate_world

# the configs read the checkout's root from this variable (conf/paths/default.yaml); the entry
# scripts set it the same way (cm3leon.cli)
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small embedded world (64 train + 32 val pairs, 16 per shard); returns its raw folder.

    Layout: raw/train/00000{0..3}.tar, raw/val/00000{0,1}.tar, raw/manifest.json.
    """
    out = tmp_path_factory.mktemp("world") / "raw"
    generate_world(WorldConfig(out_dir=str(out), seed=0, n_train=64, n_val=32, shard_size=16, num_workers=1))
    return out


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory) -> Path:
    """Token shards of a small world made with the shipped tokenizers; returns the tokens folder
    (tokens/train, tokens/val). See world_fixtures.make_tiny_tokens."""
    from world_fixtures import make_tiny_tokens

    return make_tiny_tokens(tmp_path_factory.mktemp("tiny"))
