"""Shared fixtures. Keep this file small; builders live in tests/world_fixtures.py."""

import os
from pathlib import Path

import pytest

from cm3leon.config import register_configs
from cm3leon.data.world import WorldConfig, generate_world
from project import CONF_DIR, PROJECT_ROOT

# the configs read the checkout's root from this variable (conf/paths/default.yaml); the entry
# scripts set it the same way (cm3leon.cli)
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
# the typed schemas the configs build on (conf/model/*.yaml list `model_schema`), as cm3leon.cli does
register_configs()


@pytest.fixture(autouse=True)
def _no_shared_wandb_service(monkeypatch):
    """Tests that log to W&B in-process leave WANDB_SERVICE in os.environ; scripts started as
    subprocesses would then share that service, where a resumed run's id is still in use."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


@pytest.fixture
def compose_config():
    """`compose_config(name, overrides)`: a script's config (conf/<name>.yaml) as Hydra composes it
    for that command line, without running the script. `paths.output_dir` (Hydra's run folder,
    unknown outside a run) is set to an unused path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(name: str, overrides: list[str] = ()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(name, overrides=["paths.output_dir=/tmp/unused", *overrides])

    return _compose


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


@pytest.fixture(scope="session")
def tiny_bank(tiny_tokens, tmp_path_factory) -> Path:
    """A memory bank over the small world's train split (shipped tiny CLIP, exact index): a
    `build_index.py` folder, the retrieval.dir of retrieval=ra with k=2."""
    from cm3leon.retrieval.neighbours import build_retrieval
    from cm3leon.retrieval.tiny_clip import TINY_CLIP
    from project import SHIPPED_DIR

    bank = tmp_path_factory.mktemp("bank") / "retrieval"
    ra = {
        "k": 2,
        "dir": str(bank),
        "query_splits": ["train"],
        "index": {"kind": "flat"},
        "encoder": {"model_name": TINY_CLIP, "pretrained": str(SHIPPED_DIR / "world_clip.pt"), "device": "cpu"},
    }
    build_retrieval(ra, tiny_tokens, progress=False)
    return bank


@pytest.fixture(scope="session")
def tiny_eval_run(tmp_path_factory) -> dict:
    """{'ckpt', 'clip', 'vqgan', 'root'}: a random checkpoint and a random tiny CLIP on disk."""
    root = tmp_path_factory.mktemp("eval_run")
    from eval_builders import make_tiny_clip, make_tiny_lm, make_tiny_vqgan

    vq = make_tiny_vqgan(root / "vqgan.pt")
    return {
        "root": root,
        "vqgan": vq,
        "ckpt": make_tiny_lm(root / "lm.ckpt", vq),
        "clip": make_tiny_clip(root / "clip.pt"),
    }
