"""The caption policy of the one raw-sample decoder (`checked_reader.py`): strict UTF-8 (a leading BOM
dropped), anything else skipped as `bad_caption` with its file, row or key named, in every input
layout (tar shards, a folder, CSV, JSONL); one bad caption never stops a stage or turns into mojibake."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cm3leon.data.checked_reader import SkipCounter, SkippedSample, decode_caption, iter_raw_samples
from cm3leon.data.make_shards import make_shards
from cm3leon.data.raw_shards import write_shard

LATIN1 = "un café rouge".encode("latin-1")  # not UTF-8


def png(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_caption_policy():
    assert decode_caption("un café rouge ".encode()) == "un café rouge"
    assert decode_caption("\ufeffa red circle".encode()) == "a red circle"  # a Windows editor's BOM
    for bad in (LATIN1, b"\xff\xfe a", "caf\udce9", 5):  # "caf\udce9": undecodable bytes carried in a str
        with pytest.raises(SkippedSample, match="bad_caption"):
            decode_caption(bad)


def test_tar_shards_name_the_bad_caption(tmp_path):
    samples = [{"__key__": f"k{i}", "png": png(i), "txt": "a caption"} for i in range(3)]
    samples[1]["txt"] = LATIN1
    write_shard(tmp_path / "000000.tar", samples)
    skipped = SkipCounter()
    keys = [s.key for s in iter_raw_samples(tmp_path, skipped)]
    assert keys == ["k0", "k2"] and skipped == {"bad_caption": 1}
    assert skipped.examples["bad_caption"] == [f"{tmp_path / '000000.tar'}: k1"]


def _check_manifest(out, where: str):
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 2 and manifest["counts"]["skipped_bad_caption"] == 1
    assert manifest["skipped_where"] == {"bad_caption": [where]}
    captions = [s.caption for s in iter_raw_samples(out)]
    assert sorted(captions) == ["a blue square", "un café bleu"]


def test_folder_layout_skips_a_latin1_caption_file(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for i, cap in enumerate([b"a blue square", LATIN1, "un café bleu".encode("utf-8-sig")]):
        (src / f"{i}.png").write_bytes(png(i))
        (src / f"{i}.txt").write_bytes(cap)
    make_shards(src, tmp_path / "out")
    _check_manifest(tmp_path / "out", "1.png")


def test_csv_layout_skips_a_latin1_row(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(i))
    rows = [b"image,caption", b"0.png,a blue square", b"1.png," + LATIN1, "2.png,un café bleu".encode()]
    (tmp_path / "pairs.csv").write_bytes(b"\r\n".join(rows) + b"\r\n")
    make_shards(tmp_path / "pairs.csv", tmp_path / "out")
    _check_manifest(tmp_path / "out", "pairs.csv row 2")


def test_jsonl_layout_skips_a_latin1_line(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(i))
    lines = [
        b'{"image": "0.png", "caption": "a blue square"}',
        b'{"image": "1.png", "caption": "' + LATIN1 + b'"}',
        '{"image": "2.png", "caption": "un café bleu"}'.encode(),
    ]
    (tmp_path / "pairs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    make_shards(tmp_path / "pairs.jsonl", tmp_path / "out")
    _check_manifest(tmp_path / "out", "pairs.jsonl row 2")
