"""`eval_fid.py eval=embedded` end to end on a small random checkpoint: fid.json with every field
filled, and a second run that reuses the generated images and the cached features; a deleted image
is regenerated alone. Builders: tests/eval_builders.py; the `tiny_eval_run` fixture: conftest.py.

Everything is random-initialised and saved to a temp dir (LM through CM3LeonLitModule, the tiny
VQGAN config, the tiny CLIP); the numbers mean nothing, the pipeline is what is tested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval_builders import all_filled, compose_eval, embedded_overrides
from project import PROJECT_ROOT

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def first_run(tiny_eval_run, tmp_path_factory):
    import eval_fid

    log_dir = tmp_path_factory.mktemp("logs")
    cfg = compose_eval(embedded_overrides(tiny_eval_run, log_dir))
    result = eval_fid.run(cfg)
    return cfg, result, log_dir


def test_embedded_eval_writes_fid_json_with_every_field_filled(first_run, tiny_eval_run):
    cfg, result, log_dir = first_run
    out_dir = Path(result["images_dir"]).parent
    assert out_dir.parent == log_dir / "eval_fid" / "embedded"  # out_dir=null: a deterministic folder
    on_disk = json.loads((out_dir / "fid.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert all_filled(on_disk) == []
    for key in (
        "fd_tiny_clip",
        "kd_tiny_clip_mean",
        "clip_score",
        "caption_accuracy",
        "n",
        "evaluator",
        "evaluator_version",
        "feature_extractor",
        "feature_extractor_weights_sha256",
        "resize",
        "reference_set",
        "reference_set_hash",
        "decoding",
        "samples_per_caption",
        "rerank",
        "checkpoint_sha256",
    ):
        assert key in on_disk, key
    assert "fid" not in on_disk  # not an Inception FID: named for its feature space
    assert on_disk["n"] == 4 and on_disk["generated_now"] == 4 and on_disk["reused_images"] == 0
    assert on_disk["checkpoint_sha256"] in out_dir.name or out_dir.name.startswith(on_disk["checkpoint_sha256"][:12])
    assert on_disk["decoding"]["guidance_scale"] == cfg.decoding.guidance_scale
    assert 0.0 <= on_disk["caption_accuracy"] <= 1.0 and on_disk["fd_tiny_clip"] >= 0
    images = sorted((out_dir / "images").glob("*.png"))
    assert [p.name for p in images] == [f"{i:06d}.png" for i in range(4)]
    assert len((out_dir / "prompts.jsonl").read_text().splitlines()) == 4


def test_second_run_reuses_images_and_cached_features(first_run, tiny_eval_run, monkeypatch):
    import eval_fid
    from cm3leon.eval import generation
    from cm3leon.eval.frechet import ClipImageSpace

    _cfg, result, log_dir = first_run
    images_dir = Path(result["images_dir"])
    stamps = {p.name: p.stat().st_mtime_ns for p in images_dir.glob("*.png")}

    def refuse(*args, **kwargs):
        raise AssertionError("should not run again")

    monkeypatch.setattr(generation.GenerationModule, "__init__", refuse)
    monkeypatch.setattr(ClipImageSpace, "features", refuse)
    again = eval_fid.run(compose_eval(embedded_overrides(tiny_eval_run, log_dir)))
    assert again["images_dir"] == result["images_dir"]
    assert again["generated_now"] == 0 and again["reused_images"] == 4
    assert again["reference_cached"] and again["generated_cached"]
    assert again["fd_tiny_clip"] == pytest.approx(result["fd_tiny_clip"], rel=1e-9)
    assert {p.name: p.stat().st_mtime_ns for p in images_dir.glob("*.png")} == stamps


def test_a_deleted_image_is_regenerated_alone(first_run, tiny_eval_run):
    import eval_fid

    _cfg, result, log_dir = first_run
    images_dir = Path(result["images_dir"])
    (images_dir / "000002.png").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in images_dir.glob("*.png")}
    again = eval_fid.run(compose_eval(embedded_overrides(tiny_eval_run, log_dir)))
    assert again["generated_now"] == 1 and again["reused_images"] == 3
    assert (images_dir / "000002.png").is_file()
    assert {
        n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in images_dir.glob("*.png")) if n in stamps
    } == stamps
    assert not list(images_dir.glob(".*.tmp"))  # no temp file left behind


def test_other_decoding_settings_get_their_own_folder(first_run, tiny_eval_run):
    import eval_fid
    from cm3leon.eval.generation import world_prompts

    cfg, result, log_dir = first_run
    other = compose_eval(embedded_overrides(tiny_eval_run, log_dir) + ["decoding.guidance_scale=1.5"])
    s1 = eval_fid.generation_settings(cfg, world_prompts(4), tiny_eval_run["ckpt"])
    s2 = eval_fid.generation_settings(other, world_prompts(4), tiny_eval_run["ckpt"])
    assert eval_fid.settings_hash(s1) != eval_fid.settings_hash(s2)
    # resuming into a folder made with other settings would mix samples: refused in one line
    out_dir = Path(result["images_dir"]).parent
    clash = compose_eval(
        embedded_overrides(tiny_eval_run, log_dir) + ["decoding.guidance_scale=1.5", f"out_dir={out_dir}"]
    )
    with pytest.raises(eval_fid.UsageError, match="other settings .*decoding"):
        eval_fid.run(clash)


@pytest.mark.slow
def test_generation_spread_over_two_cpu_processes(tiny_eval_run, tmp_path):
    """`trainer.devices=2 trainer.strategy=ddp` (gloo on CPU) through the real script: Lightning's
    launcher re-runs it per rank; each rank writes its share, rank 0 alone writes fid.json."""
    import os
    import subprocess
    import sys

    args = embedded_overrides(tiny_eval_run, tmp_path / "logs", n=8) + [
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "captions_per_batch=2",
        f"out_dir={tmp_path / 'out'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "src" / "eval_fid.py"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    assert len(results) == 1 and results[0]["generated_now"] == 8  # one report, from rank 0
    assert sorted(p.name for p in (tmp_path / "out" / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(8)]
    assert all_filled(json.loads((tmp_path / "out" / "fid.json").read_text())) == []
