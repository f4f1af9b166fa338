"""Configuration that could only fail later stops (or warns) before the stage starts, in one line naming
the option: more DataLoader readers than shards, an endless stream without trainer.max_steps, the
embedded world's tiny CLIP on other data (`cm3leon.lit.checks`)."""

from __future__ import annotations

import json
import tarfile
from types import SimpleNamespace

import pytest

from cm3leon.data.datamodule import CM3DataModule
from cm3leon.data.token_shards import FORMAT_VERSION
from cm3leon.errors import UsageError
from cm3leon.lit.checks import WorldModelWarning, warn_eval_world_clip


def fake_tokens(root, n_train_shards: int):
    """A token folder with empty shards and a meta.json: enough for CM3DataModule.setup."""
    meta = {
        "format_version": FORMAT_VERSION,
        "image_tokenizer": {"sha256": "a"},
        "text_tokenizer": {"sha256": "b"},
        "vocab": {"text_size": 100, "n_image_codes": 16},
        "tokens_per_image": 16,
    }
    for split, n in (("train", n_train_shards), ("val", 1)):
        (root / split).mkdir(parents=True)
        (root / split / "meta.json").write_text(json.dumps(meta))
        for i in range(n):
            tarfile.open(root / split / f"{i:06d}.tar", "w").close()
    return root


@pytest.mark.parametrize(("world_size", "workers", "fix"), [(1, 4, "data.num_workers=3"), (4, 1, "fewer devices")])
def test_more_readers_than_shards_stops_in_setup(tmp_path, world_size, workers, fix):
    dm = CM3DataModule(str(fake_tokens(tmp_path, 3)), seq_len=64, num_workers=workers)
    dm.trainer = SimpleNamespace(world_size=world_size, max_steps=10)
    with pytest.raises(UsageError, match=f"3 training shards .* < {world_size * workers} readers.*{fix}"):
        dm.setup("fit")
    dm.num_workers = 0 if world_size > 1 else 3  # a reader per shard at most: fine
    dm.trainer = SimpleNamespace(world_size=min(world_size, 3), max_steps=10)
    dm.setup("fit")


def _compose(name, overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from project import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=["paths.output_dir=/tmp/unused", *overrides])


@pytest.mark.parametrize("script", ["train", "train_tokenizer"])
@pytest.mark.parametrize("max_steps", [-1, 0, "abc"])
def test_endless_stream_needs_max_steps(script, max_steps, monkeypatch):
    """Checked before anything is built: the instantiation below must not be reached."""
    import importlib

    import hydra

    def reached(*a, **k):
        raise AssertionError("the run started building with an endless stream")

    monkeypatch.setattr(hydra.utils, "instantiate", reached)
    cfg = _compose(script, [f"trainer.max_steps={max_steps}"])
    with pytest.raises(UsageError, match=rf"trainer.max_steps={max_steps}: the training stream is endless.*N > 0"):
        importlib.import_module(script).train(cfg)


def test_eval_with_the_world_clip_on_coco_warns_naming_the_options():
    cfg = _compose("eval_fid", ["eval=coco30k", "eval.rerank.model_name=world-tiny-clip"])
    with pytest.warns(
        WorldModelWarning, match=r"eval.rerank is the embedded world's tiny CLIP.*eval.rerank.model_name="
    ):
        assert warn_eval_world_clip(cfg.eval) == ["eval.rerank"]
    assert warn_eval_world_clip(_compose("eval_fid", ["eval=embedded"]).eval) == []  # the world's own eval


def test_memory_bank_built_with_the_world_clip_warns_on_real_data(tmp_path, monkeypatch):
    import cm3leon.retrieval.neighbours as neighbours

    tokens = fake_tokens(tmp_path, 3)
    (tokens / "retrieval").mkdir()
    (tokens / "retrieval" / "manifest.json").write_text(json.dumps({"encoder": {"model_name": "world-tiny-clip"}}))
    monkeypatch.setattr(neighbours, "ensure_retrieval", lambda cfg, token_dir, build_missing: tokens / "retrieval")
    dm = CM3DataModule(str(tokens), seq_len=64, retrieval={"name": "ra", "k": 2})
    with pytest.warns(WorldModelWarning, match=r"retrieval.encoder is the embedded world's tiny CLIP"):
        dm.prepare_data()


def test_generate_reranking_a_real_prompt_with_the_world_clip_warns(tmp_path):
    import generate

    (tmp_path / "x.ckpt").write_bytes(b"")
    base = [f"ckpt={tmp_path / 'x.ckpt'}", "rerank.enabled=true"]
    with pytest.warns(WorldModelWarning, match=r"rerank is the embedded world's tiny CLIP.*rerank.model_name=ViT-B-32"):
        generate.check_command_line(_compose("generate", [*base, "prompt=a photo of a dog on a beach"]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", WorldModelWarning)  # a world caption: the world's CLIP is right
        generate.check_command_line(
            _compose("generate", [*base, "prompt=a small red circle in the center on a white background"])
        )
