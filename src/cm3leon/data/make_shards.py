"""Bring your own data: raw shards (img2dataset layout, `raw_shards.py`) from a folder, a CSV or a JSONL file.

    make_shards("my_images/", "data/mine/raw")                       # images + same-stem .txt captions
    make_shards("pairs.csv", "data/mine/raw", image_column="file", caption_column="text")

Images and captions are checked by the one raw-sample decoder (`checked_reader.py`): a pair that
would be skipped when read back is skipped here, counted under the same reason. `bad_row` counts
JSONL lines that do not parse (the only reason that is this input's own).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from cm3leon.data.checked_reader import IMAGE_EXTS, SkippedSample, decode_caption, decode_image
from cm3leon.data.raw_shards import SHARD_PATTERN, TAR_MTIME, encode_png

KEPT_AS_IS = {"png": "png", "jpeg": "jpg"}  # PIL format -> member extension, stored without re-encoding


def _key_prefix(input_path: Path) -> str:
    # webdataset splits keys at the first dot, so keep keys to [A-Za-z0-9_-].
    return re.sub(r"[^A-Za-z0-9_-]+", "_", input_path.stem if input_path.is_file() else input_path.name) + "_"


def read_pairs(
    input: str | os.PathLike, image_column: str = "image", caption_column: str = "caption"
) -> Iterator[dict]:
    """Yield {'image': Path | None, 'caption': str | None, 'extra': dict} rows from a folder, a CSV or a JSONL file.

    Folder: every image (any of IMAGE_EXTS, recursively, sorted) with a same-stem `.txt` caption
    beside it (None without one). CSV/JSONL: columns/keys `image_column` (path, relative to the
    file's folder or absolute) and `caption_column`; other columns are kept in 'extra'. A JSONL line
    that does not parse yields {'error': reason}.
    """
    path = Path(input)
    if path.is_dir():
        for img in sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS):
            txt = img.with_suffix(".txt")
            cap = txt.read_text(encoding="utf-8") if txt.is_file() else None
            yield {"image": img, "caption": cap, "extra": {"source": str(img.relative_to(path))}}
        return
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path} (expected a folder, a .csv or a .jsonl file)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            _check_columns(path, reader.fieldnames or [], image_column, caption_column)
            rows = list(reader)
    elif suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    rows.append({"__error__": f"line {line_no}: {e}"})
                    continue
                rows.append(row)
        if rows and not any(image_column in r for r in rows):
            _check_columns(path, sorted({k for r in rows for k in r}), image_column, caption_column)
    else:
        raise ValueError(f"input {path} is neither a folder nor a .csv/.jsonl file")
    for row in rows:
        if "__error__" in row:
            yield {"error": row["__error__"]}
            continue
        img = row.get(image_column) or ""
        img_path = Path(img) if os.path.isabs(img) else path.parent / img
        extra = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
        extra["source"] = str(img)
        yield {"image": img_path if img else None, "caption": row.get(caption_column), "extra": extra}


def _check_columns(path: Path, found: Sequence[str], image_column: str, caption_column: str) -> None:
    missing = [c for c in (image_column, caption_column) if c not in found]
    if missing:
        raise ValueError(
            f"{path} has no column(s) {missing}; found {list(found)} (set image_column=... caption_column=...)"
        )


def image_member(data: bytes) -> tuple[str, bytes]:
    """(extension, bytes) of one image file: png/jpg bytes as they are, anything else re-encoded to PNG.

    Raises SkippedSample('bad_image') for bytes the raw-sample decoder cannot read.
    """
    image = decode_image(data)  # RGB, transparency on white
    ext = KEPT_AS_IS.get((Image.open(io.BytesIO(data)).format or "").lower())
    return (ext, data) if ext else ("png", encode_png(np.asarray(image)))


def make_shards(
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    image_column: str = "image",
    caption_column: str = "caption",
    key_prefix: str | None = None,
) -> dict:
    """Write raw shards `out_dir/NNNNNN.tar` + `out_dir/manifest.json` from a folder, CSV or JSONL.

    Keys are `{key_prefix}{i:09d}` (prefix defaults to the input's name + '_', so keys from two inputs
    differ). Returns the manifest (counts of written and skipped samples by reason).
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size={shard_size} must be positive")
    input_path = Path(input)
    out = Path(out_dir)
    prefix = _key_prefix(input_path) if key_prefix is None else key_prefix
    pairs = read_pairs(input_path, image_column, caption_column)  # raises on a bad input path
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.tar"), out / "manifest.json"]:
        old.unlink(missing_ok=True)  # earlier output of this command
    skipped: Counter[str] = Counter()
    written, shards = 0, []
    writer = None
    for pair in pairs:
        if "error" in pair:
            skipped["bad_row"] += 1
            continue
        try:
            if pair["image"] is None or not pair["image"].is_file():
                raise SkippedSample("missing_image")
            text = decode_caption(pair["caption"])
            ext, data = image_member(pair["image"].read_bytes())
        except SkippedSample as e:
            skipped[e.reason] += 1
            continue
        if writer is None or written % shard_size == 0:
            if writer is not None:
                writer.close()
            shards.append(SHARD_PATTERN % len(shards))
            writer = wds.TarWriter(str(out / shards[-1]), mtime=TAR_MTIME)
        key = f"{prefix}{written:09d}"
        writer.write({"__key__": key, ext: data, "txt": text, "json": {"key": key, "caption": text, **pair["extra"]}})
        written += 1
    if writer is not None:
        writer.close()
    manifest = {
        "input": str(input_path),
        "counts": {
            "written": written,
            "skipped": sum(skipped.values()),
            **{f"skipped_{k}": v for k, v in sorted(skipped.items())},
        },
        "shards": shards,
        "config": {
            "shard_size": shard_size,
            "image_column": image_column,
            "caption_column": caption_column,
            "key_prefix": prefix,
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
