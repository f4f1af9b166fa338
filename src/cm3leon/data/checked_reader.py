"""The one reader of raw image-caption samples: decode each one, skip and count the bad ones by reason.

Every stage that reads raw pairs goes through here: `make_shards` (files named by a folder, CSV
or JSONL), preprocessing (raw shards -> token shards), the VQGAN DataModule, the BPE trainer,
CLIP training and retrieval. One bad sample among millions is skipped and counted, never crashes
a run or drops its neighbours. The reasons (`SKIP_REASONS`):

    truncated        the tar ends (or stops reading) inside this sample; the samples before it survive
    missing_image    no image member (any of IMAGE_EXTS), or the image file does not exist
    missing_caption  no .txt member
    bad_caption      the caption is not UTF-8 (or not text at all, e.g. a number in a JSONL row)
    empty_caption    the caption is empty or whitespace
    bad_image        the image does not decode
    unsupported_mode the image decodes, but its mode has no known 8-bit scale (`I` outside 0..65535,
                     `F` outside [0, 1], LAB, ...; `image_processing.to_rgb`)
    small_image      the image's short side is below `min_side`
    bad_json         the .json member does not parse to an object

Caption policy: strict UTF-8, a leading byte-order mark dropped; nothing is guessed (a Latin-1 file
decoded as UTF-8 with replacement, or as Latin-1, would train on mojibake), so any other caption is
skipped as `bad_caption`. CSV and JSONL inputs are read with `open_text_table`, which keeps a bad row's
bytes undecoded (as lone surrogates) so that the row, not the whole file, is skipped.

A good sample is a `RawSample`: its image decoded to 8-bit RGB by `to_rgb` (16-bit scaled, transparency
blended on white, as the paper's preprocessing does), its caption stripped, its .json attributes ({}
without one). A `SkipCounter` counts skipped samples by reason and keeps where the first ones were
(shard and key, file, row), for the stage's report.
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
from cm3leon.tokenizers.image_processing import UnsupportedImageMode, to_rgb

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
    "unsupported_mode",
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


class SkipCounter(Counter):
    """Skipped samples by reason (a Counter), plus `examples[reason]`: where the first MAX_EXAMPLES
    of each reason were ("shard.tar: key", "photos/1.png", "pairs.csv row 7"), for the report."""

    MAX_EXAMPLES = 10

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.examples: dict[str, list[str]] = {}


def count_skip(skipped: Counter, reason: str, where: str) -> None:
    """Count one skipped sample; a SkipCounter also remembers where it was."""
    skipped[reason] += 1
    if isinstance(skipped, SkipCounter):
        places = skipped.examples.setdefault(reason, [])
        if len(places) < skipped.MAX_EXAMPLES:
            places.append(where)
    log.debug("skipped %s: %s", where, reason)


def merge_skips(stats: list[dict]) -> tuple[Counter, dict[str, list[str]]]:
    """Skip counts and example places of several shards' stats (their `skipped` and
    `skipped_where`), the places capped at SkipCounter.MAX_EXAMPLES per reason, for one report."""
    skipped, where = Counter(), {}
    for s in stats:
        skipped.update(s["skipped"])
        for reason, places in s.get("skipped_where", {}).items():
            where.setdefault(reason, []).extend(places[: SkipCounter.MAX_EXAMPLES - len(where.get(reason, []))])
    return skipped, where


def open_text_table(path: str | os.PathLike):
    """Open a CSV or JSONL file as text without failing on bytes that are not UTF-8: they are kept as
    lone surrogates (`surrogateescape`), so `decode_caption` skips the rows that hold them and the
    other rows are read. A leading byte-order mark (Excel's CSVs) is dropped."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


# ---- one sample ------------------------------------------------------------------------------
def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB PIL image (loaded; `to_rgb`: 16-bit scaled, transparency on white)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # PIL raises many types for corrupt data
        raise SkippedSample("bad_image") from None
    try:
        return to_rgb(image)
    except UnsupportedImageMode:
        raise SkippedSample("unsupported_mode") from None
    except Exception:  # a decoder that fails only when the pixels are converted
        raise SkippedSample("bad_image") from None


def decode_caption(data: bytes | str | None) -> str:
    """Caption bytes or text -> stripped, non-empty caption (the policy: strict UTF-8, BOM dropped)."""
    if data is None:
        raise SkippedSample("missing_caption")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SkippedSample("bad_caption") from None
    elif isinstance(data, str):
        try:
            data.encode("utf-8")  # lone surrogates: undecodable bytes kept by open_text_table
        except UnicodeEncodeError:
            raise SkippedSample("bad_caption") from None
    else:  # a number, list or dict in a JSONL caption field
        raise SkippedSample("bad_caption")
    caption = data.removeprefix("\ufeff").strip()
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
            count_skip(skipped, "truncated", f"{url}: {key}")
        return
    if key is not None:
        yield key, group


def decode_or_count(
    key: str, members: Mapping[str, bytes], skipped: Counter, min_side: int = 1, where: str | None = None
) -> RawSample | None:
    """`decode_sample`, with a skipped sample counted in `skipped[reason]` (at `where`, default the
    key) and returned as None."""
    try:
        return decode_sample(key, members, min_side)
    except SkippedSample as e:
        count_skip(skipped, e.reason, where or key)
        return None


# ---- many shards -----------------------------------------------------------------------------
def iter_raw_samples(
    shards: str | os.PathLike | Sequence[str], skipped: Counter | None = None, min_side: int = 1
) -> Iterator[RawSample]:
    """Good samples of raw shards (anything `list_shards` accepts), in order; `skipped[reason]`
    counts the others (a SkipCounter also names them: "shard: key")."""
    skipped = SkipCounter() if skipped is None else skipped
    for url in list_shards(shards):
        for key, members in iter_members(url, skipped):
            sample = decode_or_count(key, members, skipped, min_side, where=f"{url}: {key}")
            if sample is not None:
                yield sample


def iter_raw_captions(shards: str | os.PathLike | Sequence[str], skipped: Counter | None = None) -> Iterator[str]:
    """Captions of raw shards under the same caption rule as `decode_sample`, without decoding the
    images (the BPE trainer needs text only); `skipped[reason]` counts the captions left out."""
    skipped = SkipCounter() if skipped is None else skipped
    for url in list_shards(shards):
        for key, members in iter_members(url, skipped):
            try:
                yield decode_caption(members.get("txt"))
            except SkippedSample as e:
                count_skip(skipped, e.reason, f"{url}: {key}")
