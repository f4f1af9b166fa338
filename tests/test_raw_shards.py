"""Raw shards: list_shards, bring-your-own-data (folder, CSV, JSONL), and the simple reader."""

import csv
import io
import json
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cm3leon.data.checked_reader import iter_raw_samples
from cm3leon.data.make_shards import default_key_prefix, make_shards
from cm3leon.data.raw_shards import list_shards, write_shard
from cm3leon.errors import UsageError
from project import CONF_DIR


def save(path, seed: int, fmt: str | None = None, **kw) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return arr


# ---- list_shards -----------------------------------------------------------------------------
@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(3):
        (d / f"{i:06d}.tar").write_bytes(b"")
    (d / "manifest.json").write_text("{}")
    return d


def test_list_shards_folder_glob_brace_file_list(shard_dir):
    want = [str(shard_dir / f"{i:06d}.tar") for i in range(3)]
    assert list_shards(shard_dir) == want
    assert list_shards(str(shard_dir)) == want
    assert list_shards(f"{shard_dir}/*.tar") == want
    assert list_shards(f"{shard_dir}/{{000000..000002}}.tar") == want
    assert list_shards(want[1]) == want[1:2]
    assert list_shards([want[0], f"{shard_dir}/{{000001..000002}}.tar"]) == want
    # remote specs are expanded and passed through unchecked (webdataset opens them)
    assert list_shards("pipe:cat /x/{0..1}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]


def test_list_shards_errors_name_the_path(shard_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        str(empty): str(empty),
        str(tmp_path / "nope"): str(tmp_path / "nope"),
        f"{tmp_path}/nope/*.tar": f"{tmp_path}/nope/*.tar",
        f"{shard_dir}/{{000000..000004}}.tar": str(shard_dir / "000003.tar"),  # 2 of 5 missing
    }
    for spec, named in cases.items():
        with pytest.raises(FileNotFoundError) as e:
            list_shards(spec)
        assert named in str(e.value) and "\n" not in str(e.value)


# ---- bring your own data ---------------------------------------------------------------------
def test_make_shards_from_folder(tmp_path):
    src = tmp_path / "my pics"
    a = save(src / "a.png", 0)
    save(src / "b.jpg", 1, quality=90)
    c = save(src / "c.webp", 2, lossless=True)  # not png/jpg: re-encoded to png
    save(src / "sub" / "f.png", 3)
    save(src / "d.png", 4)  # empty caption
    save(src / "e.png", 5)  # no caption file: missing_caption
    (src / "broken.png").write_bytes(b"not an image")
    for stem, text in {"a": "a cat", "b": "a dog", "c": "a bird ", "sub/f": "a fish", "d": "  ", "broken": "x"}.items():
        (src / f"{stem}.txt").write_text(text)

    manifest = make_shards(src, tmp_path / "out", shard_size=3)
    assert manifest["counts"] == {
        "written": 4, "skipped": 3, "skipped_bad_image": 1, "skipped_empty_caption": 1, "skipped_missing_caption": 1
    }  # fmt: skip
    assert manifest["shards"] == ["000000.tar", "000001.tar"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    samples = {s.meta["source"]: s for s in iter_raw_samples(tmp_path / "out")}
    assert sorted(samples) == ["a.png", "b.jpg", "c.webp", "sub/f.png"]
    prefix = default_key_prefix(src)  # "my_pics-{hash of the folder's path}_"
    assert prefix.startswith("my_pics-") and [s.key for s in samples.values()] == [
        prefix + k for k in ("a", "b", "c", "sub_f")
    ]
    assert samples["c.webp"].caption == "a bird"  # stripped
    assert np.array_equal(np.asarray(samples["a.png"].image), a)
    assert np.array_equal(np.asarray(samples["c.webp"].image), c)
    # png/jpg are stored byte for byte; anything else as png
    members = {}
    for raw in wds.DataPipeline(wds.SimpleShardList(list_shards(tmp_path / "out")), wds.tarfile_to_samples()):
        members[json.loads(raw["json"])["source"]] = raw
    assert members["a.png"]["png"] == (src / "a.png").read_bytes()
    assert members["b.jpg"]["jpg"] == (src / "b.jpg").read_bytes()
    assert "png" in members["c.webp"] and "webp" not in members["c.webp"]
    # another setting replaces the earlier shards when told (no stale 000001.tar)
    make_shards(src, tmp_path / "out", shard_size=100, overwrite=True)
    assert [p.name for p in sorted((tmp_path / "out").glob("*.tar"))] == ["000000.tar"]


def test_make_shards_from_csv_and_jsonl(tmp_path):
    data = tmp_path / "data"
    save(data / "img" / "0.png", 0)
    save(data / "img" / "1.jpg", 1)
    absolute = save(tmp_path / "elsewhere" / "2.png", 2)
    rows = [
        {"image": "img/0.png", "caption": "zero", "license": "cc0"},
        {"image": "img/1.jpg", "caption": "one", "license": "cc-by"},
        {"image": "img/missing.png", "caption": "gone", "license": ""},
        {"image": "img/0.png", "caption": "", "license": ""},
        {"image": str(tmp_path / "elsewhere" / "2.png"), "caption": "two", "license": ""},
    ]
    with (data / "pairs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "license"])
        writer.writeheader()
        writer.writerows(rows)
    m = make_shards(data / "pairs.csv", tmp_path / "csv_out", shard_size=2, key_prefix="mine_")
    assert m["counts"] == {"written": 3, "skipped": 2, "skipped_empty_caption": 1, "skipped_missing_image": 1}
    got = list(iter_raw_samples(tmp_path / "csv_out"))
    assert [(s.key, s.caption) for s in got] == [
        ("mine_000000000", "zero"), ("mine_000000001", "one"), ("mine_000000004", "two")
    ]  # fmt: skip
    assert got[1].meta["license"] == "cc-by" and np.array_equal(np.asarray(got[2].image), absolute)

    # JSONL with other key names and one line that is not JSON
    lines = [json.dumps({"file": r["image"], "text": r["caption"]}) for r in rows] + ["{not json"]
    (data / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    m = make_shards(data / "pairs.jsonl", tmp_path / "jsonl_out", image_column="file", caption_column="text")
    assert m["counts"] == {
        "written": 3, "skipped": 3, "skipped_bad_row": 1, "skipped_empty_caption": 1, "skipped_missing_image": 1
    }  # fmt: skip
    assert next(iter_raw_samples(tmp_path / "jsonl_out")).key == default_key_prefix(data / "pairs.jsonl") + "000000000"

    with pytest.raises(UsageError, match=r"no column\(s\) \['file'\]"):
        make_shards(data / "pairs.csv", tmp_path / "x", image_column="file")
    with pytest.raises(UsageError, match=r"nothing\.csv"):
        make_shards(data / "nothing.csv", tmp_path / "x")


def test_make_shards_script_config(tmp_path, capsys):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import make_shards as script

    save(tmp_path / "in" / "a.png", 0)
    (tmp_path / "in" / "a.txt").write_text("a caption")
    save(tmp_path / "in" / "b.png", 1)  # no caption
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("make_shards", overrides=[f"input={tmp_path / 'in'}", f"out_dir={tmp_path / 'out'}"])
    script.run(cfg)
    out = capsys.readouterr().out
    assert "wrote 1 pairs in 1 shards" in out and "skipped 1 (missing_caption: 1)" in out
    assert len(list(iter_raw_samples(tmp_path / "out"))) == 1


# ---- reader ----------------------------------------------------------------------------------
def test_iter_raw_samples_skips_and_counts_by_reason(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA").save(buf, format="PNG")  # fully transparent
    good = {"__key__": "k_0", "png": buf.getvalue(), "txt": " ok ", "json": {"key": "k_0"}}
    bad = [
        {"__key__": "k_1", "png": b"garbage", "txt": "bad"},
        {"__key__": "k_2", "png": buf.getvalue(), "txt": b"\xff\xfe"},
        {"__key__": "k_3", "png": buf.getvalue(), "txt": "x", "json": b"[1]"},
        {"__key__": "k_4", "txt": "no image"},
    ]
    write_shard(tmp_path / "000000.tar", [good, *bad, {**good, "__key__": "k_5"}])
    skipped = Counter()
    got = list(iter_raw_samples(tmp_path, skipped))
    assert [s.key for s in got] == ["k_0", "k_5"]
    assert skipped == {"bad_image": 1, "bad_caption": 1, "bad_json": 1, "missing_image": 1}
    assert got[0].caption == "ok" and got[0].meta == {"key": "k_0"} and got[0].image.mode == "RGB"
    assert np.asarray(got[0].image).min() == 255  # transparency blended on white
    assert list(iter_raw_samples(tmp_path, Counter(), min_side=5)) == []  # 4 px images: small_image
