"""Raw image-caption shards: the img2dataset layout, written and read with webdataset.

Layout: tar files `NNNNNN.tar` (6 digits); per sample three members sharing a key:

    KEY.png | KEY.jpg   the image, as encoded bytes
    KEY.txt             the caption, utf-8
    KEY.json            attributes: at least {"key", "caption"}; the world adds its scene

Output of img2dataset (`--output_format webdataset`, tar shards of jpg + txt + json) is already in
this layout: point any stage at those shards (a folder, a glob, or a brace pattern such as
`/data/{00000..00099}.tar`) without converting. For a folder of images with captions, or a CSV or
JSONL file, `python src/make_shards.py input=PATH out_dir=DIR` writes this layout
(`cm3leon.data.make_shards`).

Every later stage finds its shards with `list_shards` and reads them with
`cm3leon.data.checked_reader` (the one decoder: bad samples are skipped and counted by reason).
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

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
