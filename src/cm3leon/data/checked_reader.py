"""The one reader of raw image-caption samples: decode each one, skip and count the bad ones by reason.

Every stage that reads raw pairs goes through here: `make_shards` (files named by a folder, CSV
or JSONL), preprocessing (raw shards -> token shards), the VQGAN DataModule, the BPE trainer,
CLIP training and retrieval. One bad sample among millions is skipped and counted, never crashes
a run or drops its neighbours. The reasons (`SKIP_REASONS`):

    truncated        the tar ends (or stops reading) inside this sample; the samples before it survive
    missing_image    no image member (any of IMAGE_EXTS), or the image file does not exist
    missing_caption  no .txt member
    bad_caption      the caption is not UTF-8
    empty_caption    the caption is empty or whitespace
    bad_image        the image does not decode
    small_image      the image's short side is below `min_side`
    bad_json         the .json member does not parse to an object

A good sample is a `RawSample`: its image decoded to RGB (transparency blended on white, as the
paper's preprocessing does), its caption stripped, its .json attributes ({} without one).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import webdataset as wds
from PIL import Image

from cm3leon.data.raw_shards import list_shards
from cm3leon.tokenizers.image_processing import to_rgb

log = logging.getLogger(__name__)

# What an image member (in a shard) or an image file (in a folder) may be; the first present wins.
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
SKIP_REASONS = (
    "truncated",
    "missing_image",
    "missing_caption",
    "bad_caption",
    "empty_caption",
    "bad_image",
    "small_image",
    "bad_json",
)


@dataclass
class RawSample:
    key: str
    image: Image.Image  # RGB, fully loaded
    caption: str  # stripped, non-empty
    meta: dict = field(default_factory=dict)  # the .json member's attributes


class SkippedSample(Exception):
    """A sample that is skipped; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(reason)
        self.reason = reason


# ---- one sample ------------------------------------------------------------------------------
def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> RGB PIL image (loaded; transparency blended on white)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(image)
    except Exception:  # PIL raises many types for corrupt data
        raise SkippedSample("bad_image") from None


def decode_caption(data: bytes | str | None) -> str:
    """Caption bytes (UTF-8) or text -> stripped, non-empty caption."""
    if data is None:
        raise SkippedSample("missing_caption")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SkippedSample("bad_caption") from None
    caption = data.strip()
    if not caption:
        raise SkippedSample("empty_caption")
    return caption


def decode_sample(key: str, members: Mapping[str, bytes], min_side: int = 1) -> RawSample:
    """One sample's members ({extension: bytes}, webdataset's grouping) -> RawSample, or SkippedSample."""
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        raise SkippedSample("missing_image")
    caption = decode_caption(members.get("txt"))
    image = decode_image(members[image_ext])
    if min(image.size) < min_side:
        raise SkippedSample("small_image")
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            raise SkippedSample("bad_json") from None
        if not isinstance(meta, dict):
            raise SkippedSample("bad_json")
    return RawSample(key=key.rsplit("/", 1)[-1], image=image, caption=caption, meta=meta)


# ---- one shard -------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str]:
    """'dir/KEY.ext.more' -> ('dir/KEY', 'ext.more'), webdataset's key convention."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def iter_members(url: str, skipped: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for consecutive members of one tar sharing a key.

    `url` is a path or anything webdataset opens (`pipe:...`, `s3://...`). A read error ends the
    shard: the sample being read is counted as `truncated`, the ones before it were yielded.
    """
    key, group = None, {}
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                data = tf.extractfile(member).read()
                if len(data) != member.size:
                    raise EOFError(f"member {member.name} is truncated")
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                group[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        log.warning("shard %s stops reading (%s: %s)", url, type(e).__name__, e)
        if key is not None:
            skipped["truncated"] += 1
        return
    if key is not None:
        yield key, group


def decode_or_count(key: str, members: Mapping[str, bytes], skipped: Counter, min_side: int = 1) -> RawSample | None:
    """`decode_sample`, with a skipped sample counted in `skipped[reason]` and returned as None."""
    try:
        return decode_sample(key, members, min_side)
    except SkippedSample as e:
        skipped[e.reason] += 1
        return None


# ---- many shards -----------------------------------------------------------------------------
def iter_raw_samples(
    shards: str | os.PathLike | Sequence[str], skipped: Counter | None = None, min_side: int = 1
) -> Iterator[RawSample]:
    """Good samples of raw shards (anything `list_shards` accepts), in order; `skipped[reason]`
    counts the others."""
    skipped = Counter() if skipped is None else skipped
    for url in list_shards(shards):
        for key, members in iter_members(url, skipped):
            sample = decode_or_count(key, members, skipped, min_side)
            if sample is not None:
                yield sample


def iter_raw_captions(shards: str | os.PathLike | Sequence[str], skipped: Counter | None = None) -> Iterator[str]:
    """Captions of raw shards under the same caption rule as `decode_sample`, without decoding the
    images (the BPE trainer needs text only); `skipped[reason]` counts the captions left out."""
    skipped = Counter() if skipped is None else skipped
    for url in list_shards(shards):
        for _, members in iter_members(url, skipped):
            try:
                yield decode_caption(members.get("txt"))
            except SkippedSample as e:
                skipped[e.reason] += 1
