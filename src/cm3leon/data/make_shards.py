"""Bring your own data: raw shards (img2dataset layout, `raw_shards.py`) from a folder, a CSV or a JSONL file.

    make_shards("my_images/", "data/mine/raw")                       # images + same-stem .txt captions
    make_shards("pairs.csv", "data/mine/raw", image_column="file", caption_column="text")

Images and captions are checked by the one raw-sample decoder (`checked_reader.py`): a pair that
would be skipped when read back is skipped here, counted under the same reason. `bad_row` counts
JSONL lines that do not parse (the only reason that is this input's own).

Sample keys follow the input, not the order of writing: `{prefix}{relative path}` for a folder
(`photos-3fa2c1_sub_001` for `photos/sub/001.jpg`), `{prefix}{row number}` for a CSV/JSONL, so
adding an image does not rename the others; two files that would share a key are refused by name.
The output folder is replaced only as a whole and only after the input was read and checked (see
`make_shards`); the manifest records a fingerprint of the inputs, so a rerun with the same inputs
writes nothing and a rerun after the input's files changed makes the shards again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from cm3leon.data.checked_reader import (
    IMAGE_EXTS,
    SkipCounter,
    SkippedSample,
    count_skip,
    decode_caption,
    decode_image,
    open_text_table,
)
from cm3leon.data.raw_shards import SHARD_PATTERN, TAR_MTIME, encode_png
from cm3leon.errors import UsageError
from cm3leon.utils import atomic_path, digest, file_sha256, file_stamp

KEPT_AS_IS = {"png": "png", "jpeg": "jpg"}  # PIL format -> member extension, stored without re-encoding


def default_key_prefix(input_path: Path) -> str:
    """`{name}-{hash}_`: the input's name (readable) and a hash of its absolute path, so that two
    inputs of the same name in different places (`x/images`, `y/images`) give different keys."""
    name = input_path.stem if input_path.is_file() else input_path.name
    where = hashlib.sha256(str(input_path.resolve()).encode()).hexdigest()[:6]
    return f"{_safe_key(name)}-{where}_"


def _safe_key(text: str) -> str:
    # webdataset splits keys at the first dot, so keep keys to [A-Za-z0-9_-].
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


def read_pairs(input: str | os.PathLike, image_column: str = "image", caption_column: str = "caption") -> list[dict]:
    """Read every row of a folder, a CSV or a JSONL file (no image is opened): a list of
    {'id': str, 'image': Path | None, 'caption': str | bytes | None, 'caption_file': Path | None,
    'extra': dict}, or {'id', 'error': reason} for a JSONL line that does not parse.

    `id` makes the sample key: in a folder the image's path relative to the folder without its
    extension (`sub/001`; stable when images are added), in a CSV/JSONL the row number. Folder:
    every image (any of IMAGE_EXTS, recursively, sorted) with a same-stem `.txt` caption beside it.
    CSV/JSONL: columns/keys `image_column` (path, relative to the file's folder or absolute) and
    `caption_column`; other columns are kept in 'extra'. Raises a one-line UsageError for a missing
    input or column: the whole input is read before anything is written.
    """
    path = Path(input)
    if path.is_dir():
        rows = []
        for img in sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS and p.is_file()):
            rel = img.relative_to(path)
            txt = img.with_suffix(".txt")
            rows.append(
                {
                    "id": rel.with_suffix("").as_posix(),
                    "image": img,
                    "caption": None,
                    "caption_file": txt if txt.is_file() else None,
                    "extra": {"source": rel.as_posix()},
                }
            )
        return rows
    if not path.is_file():
        raise UsageError(f"input={path} not found: give a folder (images + same-stem .txt), a .csv or a .jsonl file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open_text_table(path) as f:  # a row that is not UTF-8 is skipped, not the file
            reader = csv.DictReader(f)
            _check_columns(path, reader.fieldnames or [], image_column, caption_column)
            records = list(reader)
    elif suffix in (".jsonl", ".json"):
        records = []
        with open_text_table(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    row = {"__error__": f"line {line_no}: {e}"}
                records.append(row)
        if records and not any(image_column in r for r in records):
            _check_columns(path, sorted({k for r in records for k in r}), image_column, caption_column)
    else:
        raise UsageError(f"input={path} is neither a folder nor a .csv/.jsonl file")
    rows = []
    for i, row in enumerate(records):
        if "__error__" in row:
            rows.append({"id": f"{i:09d}", "error": row["__error__"]})
            continue
        img = str(row.get(image_column) or "")
        img_path = Path(img) if os.path.isabs(img) else path.parent / img
        extra = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
        extra["source"] = img
        rows.append(
            {
                "id": f"{i:09d}",  # the row number: one image may have several caption rows
                "image": img_path if img else None,
                "caption": row.get(caption_column),
                "caption_file": None,
                "extra": extra,
            }
        )
    return rows


def _check_columns(path: Path, found: Sequence[str], image_column: str, caption_column: str) -> None:
    missing = [c for c in (image_column, caption_column) if c not in found]
    if missing:
        raise UsageError(
            f"{path} has no column(s) {missing}; found {list(found)} (set image_column=... caption_column=...)"
        )


def _check_unique_keys(rows: list[dict], prefix: str) -> None:
    """Two rows with one key (`a.png` beside `a.jpg`, or `a b/1.png` and `a_b/1.png`) would shadow
    each other downstream: refuse, naming both sources."""
    seen: dict[str, dict] = {}
    for row in rows:
        key = prefix + _safe_key(row["id"])
        row["key"] = key
        if key in seen and "error" not in row:
            first, second = (r["extra"]["source"] for r in (seen[key], row))
            raise UsageError(
                f"input files {first} and {second} would both get sample key {key} (and share a caption file): "
                "rename one of them"
            )
        seen[key] = row


def _inputs_fingerprint(input_path: Path, rows: list[dict], settings: dict) -> str:
    """What the shards are made from: the settings, the input file's bytes (CSV/JSONL), and every
    image and caption file's size + mtime (a changed file changes the fingerprint)."""

    def stamp(p: Path | None):
        return file_stamp(p) if p is not None and p.is_file() else None

    listing = [
        [r["id"], str(r.get("image")), stamp(r.get("image")), stamp(r.get("caption_file"))]
        for r in rows
        if "error" not in r
    ]
    source = file_sha256(input_path) if input_path.is_file() else None
    return digest(
        {"settings": settings, "input_sha256": source, "files": listing, "bad_rows": len(rows) - len(listing)}
    )


def _existing_output(out: Path) -> dict | None:
    """The manifest of an earlier make_shards output in `out`; None when `out` is missing or empty.
    Raises UsageError when `out` holds files that make_shards did not write."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise UsageError(
            f"out_dir={out} is not empty and holds no make_shards manifest.json (it was not made by make_shards): "
            "choose a new or empty folder"
        )
    return manifest


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
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write raw shards `out_dir/NNNNNN.tar` + `out_dir/manifest.json` from a folder, CSV or JSONL.

    Keys are `{key_prefix}{id}` (`read_pairs`: the image's relative path in a folder, the row
    number in a CSV/JSONL; the prefix defaults to `default_key_prefix`). Order of work: read and
    check the whole input (missing path or column, two files with one key: UsageError, nothing
    touched); if `out_dir` holds shards made from the same inputs and settings, return their
    manifest (`"reused": True`); if it holds shards of another input or other settings, refuse
    unless `overwrite`; if only the same input's files changed, make them again (`"remade": True`).
    New shards are written in `out_dir.tmp` and renamed into place at the end. Returns the manifest
    (counts of written and skipped samples by reason).
    """
    if shard_size <= 0:
        raise UsageError(f"shard_size={shard_size} must be positive")
    input_path = Path(input)
    out = Path(out_dir)
    prefix = default_key_prefix(input_path) if key_prefix is None else key_prefix
    rows = read_pairs(input_path, image_column, caption_column)
    _check_unique_keys(rows, prefix)
    settings = {
        "input": str(input_path.resolve()),
        "shard_size": shard_size,
        "image_column": image_column,
        "caption_column": caption_column,
        "key_prefix": prefix,
    }
    fingerprint = _inputs_fingerprint(input_path, rows, settings)
    old = _existing_output(out)
    remade = False
    if old is not None:
        complete = all((out / s).is_file() for s in old["shards"])
        if old.get("inputs") == fingerprint and complete:
            return {**old, "reused": True}
        same_source = old.get("settings") == settings
        if not same_source and not overwrite:
            raise UsageError(
                f"out_dir={out} holds shards made from other inputs or settings (input={old.get('input')}): "
                "pass overwrite=true to replace them, or choose another out_dir"
            )
        remade = same_source  # the same input and settings, but its files changed (or a shard is missing)

    skipped = SkipCounter()  # by reason, and where the first ones were (the manifest names them)
    written, shards = 0, []
    bar = tqdm(total=len(rows), desc="make_shards", unit="pair", disable=not progress)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        writer = None
        for pair in rows:
            sample = None
            try:
                sample = _read_sample(pair)
            except SkippedSample as e:
                where = (
                    pair["extra"]["source"] if input_path.is_dir() else f"{input_path.name} row {int(pair['id']) + 1}"
                )
                count_skip(skipped, e.reason, where)
            except _BadRow:
                count_skip(skipped, "bad_row", f"{input_path.name} {pair['error']}")
            if sample is not None:
                if writer is None or written % shard_size == 0:
                    if writer is not None:
                        writer.close()
                    shards.append(SHARD_PATTERN % len(shards))
                    writer = wds.TarWriter(str(tmp / shards[-1]), mtime=TAR_MTIME)
                writer.write(sample)
                written += 1
            bar.update()
            bar.set_postfix(written=written, skipped=sum(skipped.values()), refresh=False)
        if writer is not None:
            writer.close()
        bar.set_postfix(written=written, skipped=sum(skipped.values()))
        bar.close()
        manifest = {
            "input": str(input_path),
            "inputs": fingerprint,
            "settings": settings,
            "counts": {
                "written": written,
                "skipped": sum(skipped.values()),
                **{f"skipped_{k}": v for k, v in sorted(skipped.items())},
            },
            "skipped_where": skipped.examples,
            "shards": shards,
            "reused": False,  # True only in what a rerun with the same inputs returns
            "remade": remade,
            "config": {
                "shard_size": shard_size,
                "image_column": image_column,
                "caption_column": caption_column,
                "key_prefix": prefix,
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class _BadRow(Exception):
    """A JSONL line that does not parse (counted as `bad_row`)."""


def _read_sample(pair: dict) -> dict:
    """One row -> a raw-shard sample; SkippedSample / _BadRow when it is skipped."""
    if "error" in pair:
        raise _BadRow(pair["error"])
    if pair["image"] is None or not pair["image"].is_file():
        raise SkippedSample("missing_image")
    # caption bytes go to the one decoder, which owns the UTF-8 policy
    caption = pair["caption_file"].read_bytes() if pair["caption_file"] is not None else pair["caption"]
    text = decode_caption(caption)
    ext, data = image_member(pair["image"].read_bytes())
    key = pair["key"]
    return {"__key__": key, ext: data, "txt": text, "json": {"key": key, "caption": text, **pair["extra"]}}
