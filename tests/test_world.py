"""The embedded world: determinism, caption <-> scene round trip, clean geometry, generation."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from cm3leon.data.checked_reader import iter_raw_samples
from cm3leon.data.raw_shards import list_shards
from cm3leon.data.world import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    POSITIONS,
    SIZES,
    Scene,
    Shape,
    WorldConfig,
    caption,
    ensure_world,
    generate_world,
    parse_caption,
    render,
    scene_for,
    world_is_complete,
)
from cm3leon.errors import UsageError
from project import PROJECT_ROOT

SCENES = [scene_for(0, "train", i) for i in range(3000)]


def test_scene_for_is_deterministic_and_depends_on_every_argument():
    assert [scene_for(0, "train", i) for i in range(50)] == SCENES[:50]
    assert np.array_equal(render(scene_for(7, "val", 3)), render(scene_for(7, "val", 3)))
    for other in ([scene_for(1, "train", i) for i in range(50)], [scene_for(0, "val", i) for i in range(50)]):
        assert sum(a != b for a, b in zip(other, SCENES[:50])) > 40


def test_scene_distribution_covers_the_vocabulary():
    n_shapes = Counter(len(s.shapes) for s in SCENES)
    assert set(n_shapes) == {1, 2} and abs(n_shapes[1] / len(SCENES) - 0.5) < 0.05
    shapes = [sh for s in SCENES for sh in s.shapes]
    assert {sh.kind for sh in shapes} == set(KINDS)
    assert {sh.colour for sh in shapes} == set(COLOURS)
    assert {sh.size for sh in shapes} == set(SIZES)
    assert {sh.position for sh in shapes} == set(POSITIONS)
    assert {s.background for s in SCENES} == set(BACKGROUNDS)
    # shapes are listed in reading order of their cells, never two in one cell
    for s in SCENES:
        cells = [POSITIONS.index(sh.position) for sh in s.shapes]
        assert cells == sorted(set(cells))


def test_caption_parse_round_trip():
    for s in SCENES:
        text = caption(s)
        assert text == text.lower() and "  " not in text
        assert parse_caption(text) == s
    assert caption(SCENES[0]) == caption(scene_for(0, "train", 0))
    two = Scene("white", (Shape("circle", "red", "large", "top left"), Shape("square", "blue", "small", "right")))
    assert caption(two) == (
        "a large red circle in the top left and a small blue square on the right on a white background"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a large red circle in the top left",  # no background
        "a large pink circle in the top left on a white background",  # unknown colour
        "a large red circle in the top left on a white background.",  # trailing text
        "a large red circle in the top left and on a white background",
        "a large red circle in the center and a small blue square in the center on a gray background",  # same cell
    ],
)
def test_parse_caption_rejects_bad_text_naming_it(bad):
    with pytest.raises(ValueError, match="caption does not parse") as e:
        parse_caption(bad)
    assert repr(bad) in str(e.value)


def test_shape_and_scene_validate_their_fields():
    with pytest.raises(ValueError, match="colour"):
        Shape("circle", "pink", "large", "top")
    with pytest.raises(ValueError, match="background"):
        Scene("beige", ())
    with pytest.raises(ValueError, match="two shapes in one cell"):
        Scene("white", (Shape("circle", "red", "large", "top"), Shape("square", "red", "small", "top")))


def test_shapes_stay_inside_their_cell_and_use_exact_colours():
    """Every shape at every position: pixels only inside its own grid cell, flat palette colours."""
    edges = [round(k * 64 / 3) for k in range(4)]
    for kind in KINDS:
        for size in SIZES:
            for cell, pos in enumerate(POSITIONS):
                img = render(Scene("black", (Shape(kind, "red", size, pos),)))
                ys, xs = np.nonzero(img.any(-1))
                row, col = divmod(cell, 3)
                assert edges[row] <= ys.min() and ys.max() < edges[row + 1], (kind, size, pos)
                assert edges[col] <= xs.min() and xs.max() < edges[col + 1], (kind, size, pos)
                assert set(map(tuple, img.reshape(-1, 3))) == {(0, 0, 0), COLOURS["red"]}
    areas = {
        (k, sz): render(Scene("black", (Shape(k, "red", sz, "center"),))).any(-1).sum() for k in KINDS for sz in SIZES
    }
    for k in KINDS:  # large clearly larger; fill ratios square > circle > triangle
        assert areas[k, "large"] > 2 * areas[k, "small"]
    assert areas["square", "large"] > areas["circle", "large"] > areas["triangle", "large"]


def test_render_any_size_and_dtype():
    s = SCENES[1]
    for size in (32, 64, 256):
        img = render(s, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert tuple(render(s)[0, 0]) == BACKGROUNDS[s.background]


def test_generate_world_reads_back_and_matches_scenes(tiny_world):
    manifest = json.loads((tiny_world / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 64, "val": 32}
    assert len(list_shards(tiny_world / "train")) == 4 and len(list_shards(tiny_world / "val")) == 2
    samples = list(iter_raw_samples(list_shards(tiny_world / "train") + list_shards(tiny_world / "val")))
    assert len(samples) == 96 and len({s.key for s in samples}) == 96
    for s in samples[::7]:
        split, index = s.meta["split"], s.meta["index"]
        assert s.key == f"{split}_{index:09d}"
        scene = scene_for(0, split, index)
        assert s.caption == caption(scene) == s.meta["caption"]
        assert Scene.from_dict(s.meta) == scene
        assert np.array_equal(np.asarray(s.image), render(scene))


def test_generation_is_byte_identical_across_worker_counts(tmp_path):
    kw = dict(seed=3, n_train=24, n_val=8, shard_size=10)
    a = generate_world(WorldConfig(out_dir=str(tmp_path / "a"), num_workers=1, **kw))
    generate_world(WorldConfig(out_dir=str(tmp_path / "b"), num_workers=2, **kw))
    shards = [s for split in a["splits"].values() for s in split["shards"]]
    assert shards == ["train/000000.tar", "train/000001.tar", "train/000002.tar", "val/000000.tar"]
    for s in shards:
        assert (tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes()


def test_ensure_world_is_idempotent_and_repairs_partial_output(tmp_path, capsys):
    kw = dict(out_dir=str(tmp_path / "raw"), n_train=12, n_val=4, shard_size=5, num_workers=1)
    raw = ensure_world(**kw)
    assert "[world] generating" in capsys.readouterr().out
    shard = raw / "train" / "000001.tar"
    stamp = shard.stat().st_mtime_ns
    assert ensure_world(kw) == raw  # a dict config works too; complete: nothing printed, nothing rewritten
    assert capsys.readouterr().out == "" and shard.stat().st_mtime_ns == stamp
    shard.unlink()  # partial output -> regenerated
    assert not world_is_complete(WorldConfig(**kw))
    ensure_world(**kw)
    assert "[world] generating" in capsys.readouterr().out and shard.is_file()
    ensure_world(**{**kw, "n_train": 13})  # config differs from the manifest -> regenerated
    assert "[world] generating" in capsys.readouterr().out
    assert json.loads((raw / "manifest.json").read_text())["counts"]["train"] == 13


def test_the_library_needs_an_out_dir():
    with pytest.raises(UsageError, match="out_dir"):
        ensure_world(n_train=4)  # the library knows no checkout: the configs give the folder


def test_make_world_config_defaults_and_rerun(tmp_path, capsys, compose_config):
    import make_world

    default = compose_config("make_world", [])
    assert (default.seed, default.n_train, default.n_val, default.shard_size) == (0, 20000, 1000, 500)
    assert default.out_dir == str(PROJECT_ROOT / "data" / "world" / "raw")
    cfg = compose_config("make_world", [f"out_dir={tmp_path / 'raw'}", "n_train=30", "n_val=10", "shard_size=8"])
    make_world.run(cfg)
    assert '"train": 30' in capsys.readouterr().out and len(list_shards(tmp_path / "raw" / "train")) == 4
    make_world.run(cfg)
    assert "already complete" in capsys.readouterr().out


@pytest.mark.slow
def test_make_world_script_subprocess(tmp_path):
    out = tmp_path / "raw"
    cmd = [sys.executable, str(PROJECT_ROOT / "src" / "make_world.py"), f"out_dir={out}", "n_train=30", "n_val=10",
           "shard_size=8", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert '"train": 30' in first.stdout and len(list_shards(out / "train")) == 4
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout
