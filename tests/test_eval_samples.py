"""`eval_fid.py eval=embedded` extras on a small random checkpoint: every sample kept with its CLIP
scores (`keep_samples`), resumed prompt by prompt; the captioned grid; the offline W&B run.
Builders: tests/eval_builders.py; the `tiny_eval_run` fixture: conftest.py. The numbers mean
nothing, the files are what is tested."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval_builders import all_filled, compose_eval, embedded_overrides

torch.set_num_threads(2)

N_CAPTIONS = 3  # x eval.samples_per_caption=2 (embedded_overrides)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def overrides(run: dict, root: Path, *extra: str) -> list[str]:
    return embedded_overrides(run, root / "logs", n=N_CAPTIONS) + [f"out_dir={root / 'out'}", *extra]


@pytest.fixture(scope="module")
def kept_run(tiny_eval_run, tmp_path_factory):
    """One evaluation with keep_samples=true and W&B offline (the default): (overrides, result, out_dir)."""
    import eval_fid

    root = tmp_path_factory.mktemp("samples")
    args = overrides(tiny_eval_run, root, "keep_samples=true")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_MODE", raising=False)  # the configured mode (offline) applies
        result = eval_fid.run(compose_eval(args))
    return args, result, root / "out"


def test_keep_samples_writes_every_sample_and_its_record(kept_run):
    _args, result, out_dir = kept_run
    samples = out_dir / "samples"
    assert result["samples_dir"] == str(samples) and all_filled(result) == []
    for index in range(N_CAPTIONS):
        record = json.loads((samples / f"{index:06d}.json").read_text())
        assert set(record) == {"index", "caption", "clip_scores", "best"} and record["index"] == index
        scores = record["clip_scores"]
        assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
        assert record["best"] == int(np.argmax(scores))
        kept = [samples / f"{index:06d}_{j:02d}.png" for j in range(2)]
        assert all(p.is_file() for p in kept)
        # the image evaluated is the best kept sample
        assert np.array_equal(pixels(kept[record["best"]]), pixels(out_dir / "images" / f"{index:06d}.png"))
    assert not list(samples.glob(".*.tmp"))  # no temp file left behind


def test_world_grid_is_written_and_named_in_fid_json(kept_run):
    _args, result, out_dir = kept_run
    assert result["grid"] == str(out_dir / "grid.png")
    assert json.loads((out_dir / "fid.json").read_text())["grid"] == result["grid"]
    w, h = Image.open(out_dir / "grid.png").size
    assert w > 3 * 192 and h > 192  # three tiles of 192 px side by side, captions below


def test_offline_wandb_run_is_written_under_out_dir(kept_run):
    _args, _result, out_dir = kept_run
    runs = list((out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert (runs[0] / "files").is_dir() and list(runs[0].glob("run-*.wandb"))
    # the table's and the grid's media are saved with the run
    assert list((runs[0] / "files").rglob("sample_table*.table.json"))
    assert list((runs[0] / "files").rglob("grid*.png"))


def test_resume_regenerates_only_the_prompt_missing_its_record_and_disabled_wandb_writes_nothing(kept_run, monkeypatch):
    import eval_fid

    args, _result, out_dir = kept_run
    monkeypatch.delenv("WANDB_MODE", raising=False)
    samples = out_dir / "samples"
    (samples / "000001.json").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in samples.glob("*") if not p.name.startswith("000001")}
    wandb_before = sorted((out_dir / "wandb").iterdir())
    again = eval_fid.run(compose_eval(args + ["wandb.mode=disabled"]))
    assert again["generated_now"] == 1 and again["reused_images"] == N_CAPTIONS - 1
    assert (samples / "000001.json").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in samples.glob("*") if not p.name.startswith("000001")} == stamps
    assert sorted((out_dir / "wandb").iterdir()) == wandb_before  # disabled: no run, no file


def test_keep_samples_is_not_a_generation_setting_but_needs_the_records(tiny_eval_run, tmp_path):
    """The best image does not depend on keep_samples (same folder); a folder made without kept
    samples still lacks their records, so those prompts are pending when resumed with them."""
    import eval_fid
    from cm3leon.eval.prompts import pending_prompts, world_prompts

    prompts = world_prompts(2)
    plain = compose_eval(overrides(tiny_eval_run, tmp_path))
    kept = compose_eval(overrides(tiny_eval_run, tmp_path, "keep_samples=true"))
    ckpt = tiny_eval_run["ckpt"]
    assert eval_fid.generation_settings(plain, prompts, ckpt) == eval_fid.generation_settings(kept, prompts, ckpt)
    images = tmp_path / "out" / "images"
    images.mkdir(parents=True)
    for p in prompts:
        Image.new("RGB", (8, 8)).save(images / f"{p.index:06d}.png")
    assert pending_prompts(prompts, images) == []
    assert pending_prompts(prompts, images, require_samples=True) == prompts
    (tmp_path / "out" / "samples").mkdir()
    (tmp_path / "out" / "samples" / "000000.json").write_text("{}")
    assert pending_prompts(prompts, images, require_samples=True) == prompts[1:]


def test_one_sample_without_rerank_records_null_scores(tiny_eval_run, tmp_path):
    from cm3leon.eval.generation import generate_missing
    from cm3leon.eval.prompts import world_prompts

    kwargs = {"ckpt_path": tiny_eval_run["ckpt"], "samples_per_caption": 1, "keep_samples": True}
    trainer = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
    done, _ = generate_missing(kwargs, world_prompts(2), tmp_path / "images", trainer, captions_per_batch=2)
    assert done == 2
    for index in range(2):
        record = json.loads((tmp_path / "samples" / f"{index:06d}.json").read_text())
        assert record["clip_scores"] is None and record["best"] == 0
        kept = pixels(tmp_path / "samples" / f"{index:06d}_00.png")
        assert np.array_equal(kept, pixels(tmp_path / "images" / f"{index:06d}.png"))


def test_an_explicit_wandb_mode_variable_wins(monkeypatch):
    from cm3leon.eval.wandb_log import scalar_metrics, wandb_mode

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("offline") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="not offline"):
        wandb_mode("sometimes")
    assert scalar_metrics({"fid": 3, "kid_mean": None, "clip_score": 1.5, "n": 4}) == {"fid": 3.0, "clip_score": 1.5}
