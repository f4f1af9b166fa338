"""Raw image-caption shards: the img2dataset layout, written and read with webdataset.

Layout: tar files `NNNNNN.tar` (6 digits); per sample three members sharing a key:

    KEY.png | KEY.jpg   the image, as encoded bytes
    KEY.txt             the caption, utf-8
    KEY.json            attributes: at least {"key", "caption"}; the world adds its scene

Output of img2dataset (`--output_format webdataset`, tar shards of jpg + txt + json) is already in
this layout: point any stage at those shards (a folder, a glob, or a brace pattern such as
`/data/{00000..00099}.tar`) without converting. For a folder of images with captions, or a CSV or
JSONL file, `python src/make_shards.py input=PATH out_dir=DIR` writes this layout (`make_shards`).

Every later stage finds its shards with `list_shards`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
KEPT_AS_IS = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}  # stored without re-encoding
SHARD_PATTERN = "%06d.tar"
TAR_MTIME = 0.0  # fixed member mtime: the same samples give byte-identical shards


# ---- finding shards --------------------------------------------------------------------------
def list_shards(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard paths from a folder (its `*.tar`), a glob, a brace pattern, one file, or a list.

    `/data/{000000..000099}.tar` expands like webdataset does; remote specs (`pipe:...`, `s3://...`,
    `http://...`) are expanded and passed through unchecked. Raises a one-line FileNotFoundError
    naming the path when nothing matches or an expanded shard is missing.
    """
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in list_shards(item)]
    spec = os.fspath(spec)
    if spec.startswith("pipe:") or "://" in spec:
        return list(braceexpand(spec))
    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
        if not shards:
            nested = glob.glob(os.path.join(glob.escape(spec), "*", "*.tar"))
            subs = sorted({os.path.basename(os.path.dirname(p)) for p in nested})
            hint = f"its sub-folders {subs} hold shards: name one" if subs else "make them with src/make_shards.py"
            raise FileNotFoundError(f"no *.tar shards in folder {spec} ({hint})")
        return shards
    paths = list(braceexpand(spec))
    if any(glob.has_magic(p) for p in paths):
        shards = sorted({s for p in paths for s in glob.glob(p)})
        if not shards:
            raise FileNotFoundError(f"no shards match {spec}")
        return shards
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        if len(paths) == 1:
            raise FileNotFoundError(f"shard not found: {missing[0]}")
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards missing in {spec}, first: {missing[0]}")
    return paths


# ---- writing ---------------------------------------------------------------------------------
def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    """Write samples ({'__key__', 'png'|'jpg', 'txt', 'json'}) to one tar, atomically; returns the count.

    The tar is written under a temporary name and renamed at the end, so a shard that exists is
    complete.
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    n = 0
    with wds.TarWriter(tmp, mtime=TAR_MTIME) as sink:
        for sample in samples:
            sink.write(sample)
            n += 1
    os.replace(tmp, path)
    return n


# ---- reading ---------------------------------------------------------------------------------
def iter_raw_samples(shards: str | os.PathLike | Sequence[str]) -> Iterator[dict]:
    """Yield dict(key, image: PIL.Image (RGB), caption: str, json: dict) from raw shards, in order.

    Simple on purpose: a sample whose image does not decode, or a shard that does not read, is
    reported with a warning and skipped. `shards` is anything `list_shards` accepts.
    """
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list_shards(shards)),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
    )
    for raw in pipeline:
        key = raw["__key__"]
        try:
            ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in raw), None)
            if ext is None:
                raise ValueError("no png/jpg/jpeg/webp member")
            image = Image.open(io.BytesIO(raw[ext]))
            image.load()
            caption = raw["txt"].decode("utf-8") if "txt" in raw else ""
            meta = json.loads(raw["json"]) if "json" in raw else {}
        except Exception as e:  # one bad sample among many: report it, go on
            warnings.warn(f"skipping sample {key} from {raw.get('__url__')}: {type(e).__name__}: {e}")
            continue
        yield {"key": key, "image": image.convert("RGB"), "caption": caption, "json": meta}


# ---- bring your own data ---------------------------------------------------------------------
def _key_prefix(input_path: Path) -> str:
    # webdataset splits keys at the first dot, so keep keys to [A-Za-z0-9_-].
    return re.sub(r"[^A-Za-z0-9_-]+", "_", input_path.stem if input_path.is_file() else input_path.name) + "_"


def read_pairs(
    input: str | os.PathLike, image_column: str = "image", caption_column: str = "caption"
) -> Iterator[dict]:
    """Yield {'image': Path, 'caption': str, 'extra': dict} rows from a folder, a CSV or a JSONL file.

    Folder: every image (any of IMAGE_EXTS, recursively, sorted) with a same-stem `.txt` caption
    beside it (a missing .txt gives an empty caption, skipped later). CSV/JSONL: columns/keys
    `image_column` (path, relative to the file's folder or absolute) and `caption_column`; other
    columns are kept in 'extra'. A JSONL line that does not parse yields {'error': reason}.
    """
    path = Path(input)
    if path.is_dir():
        for img in sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS):
            txt = img.with_suffix(".txt")
            cap = txt.read_text(encoding="utf-8") if txt.is_file() else ""
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
        yield {"image": img_path if img else None, "caption": row.get(caption_column) or "", "extra": extra}


def _check_columns(path: Path, found: Sequence[str], image_column: str, caption_column: str) -> None:
    missing = [c for c in (image_column, caption_column) if c not in found]
    if missing:
        raise ValueError(
            f"{path} has no column(s) {missing}; found {list(found)} "
            f"(set image_column=... caption_column=...)"
        )


def _image_member(img_path: Path) -> tuple[str, bytes]:
    """(extension, bytes) for one image: png/jpg bytes as they are, anything else re-encoded to PNG."""
    data = img_path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:  # raises on files that are not images
        fmt = (im.format or "").lower()
        ext = KEPT_AS_IS.get(fmt)
        if ext is not None:
            im.verify()
            return ext, data
        im.load()
        rgb = im.convert("RGBA") if im.mode in ("P", "LA", "RGBA") else im.convert("RGB")
        if rgb.mode == "RGBA":  # blend transparency on white (as the paper's preprocessing does)
            white = Image.new("RGBA", rgb.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgb).convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
        return "png", buf.getvalue()


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
    differ). A sample with a missing/unreadable image or an empty caption is skipped and counted.
    Returns the manifest (counts of written and skipped samples by reason).
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size={shard_size} must be positive")
    input_path = Path(input)
    out = Path(out_dir)
    prefix = _key_prefix(input_path) if key_prefix is None else key_prefix
    pairs = read_pairs(input_path, image_column, caption_column)  # raises on a bad input path
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.tar")) + [out / "manifest.json"]:
        old.unlink(missing_ok=True)  # earlier output of this command
    skipped: Counter[str] = Counter()
    written, shards = 0, []
    writer = None
    for pair in pairs:
        if "error" in pair:
            skipped["bad_row"] += 1
            continue
        text = pair["caption"].strip()
        if not text:
            skipped["empty_caption"] += 1
            continue
        if pair["image"] is None or not pair["image"].is_file():
            skipped["missing_image"] += 1
            continue
        try:
            ext, data = _image_member(pair["image"])
        except Exception:
            skipped["bad_image"] += 1
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
