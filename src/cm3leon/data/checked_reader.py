"""Read raw shards (img2dataset layout) sample by sample, checking each one and counting skips.

Used by preprocessing, where one bad sample among millions must be skipped and counted, never
crash the run or drop its neighbours. Reasons counted (keys of `SKIP_REASONS`):

    truncated        the tar ends inside this sample (the samples before it survive)
    missing_image    no .png/.jpg/.jpeg/.webp member
    missing_caption  no .txt member
    empty_caption    the caption is empty or whitespace
    bad_caption      the caption is not UTF-8
    bad_image        the image does not decode
    small_image      the image's short side is below `min_side`
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
SKIP_REASONS = (
    "truncated", "missing_image", "missing_caption", "empty_caption", "bad_caption", "bad_image", "small_image"
)


@dataclass
class CheckedSample:
    key: str
    image: Image.Image  # RGB or RGBA, fully loaded
    caption: str


def _split_name(name: str) -> tuple[str, str]:
    """'dir/KEY.ext.more' -> ('dir/KEY', 'ext.more'), webdataset's key convention."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def _iter_groups(path: str, skipped: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for consecutive members sharing a key; a read error ends the
    shard and counts the sample being read as truncated."""
    key, group = None, {}
    try:
        with tarfile.open(path, "r|*") as tf:
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
    except (tarfile.TarError, EOFError, OSError, ValueError):
        if key is not None:
            skipped["truncated"] += 1
        return
    if key is not None:
        yield key, group


def check_sample(key: str, group: dict[str, bytes], min_side: int) -> CheckedSample | str:
    """Return the decoded sample, or the reason (one of SKIP_REASONS) why it is skipped."""
    image_ext = next((e for e in IMAGE_EXTS if e in group), None)
    if image_ext is None:
        return "missing_image"
    if "txt" not in group:
        return "missing_caption"
    try:
        caption = group["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "bad_caption"
    if not caption:
        return "empty_caption"
    try:
        image = Image.open(io.BytesIO(group[image_ext]))
        image.load()
    except Exception:  # PIL raises many types for corrupt data
        return "bad_image"
    if min(image.size) < min_side:
        return "small_image"
    return CheckedSample(key=key.rsplit("/", 1)[-1], image=image, caption=caption)


def iter_checked_samples(path: str, skipped: Counter, min_side: int = 1) -> Iterator[CheckedSample]:
    """Good samples of one raw shard, in order; `skipped[reason]` counts the others."""
    for key, group in _iter_groups(path, skipped):
        result = check_sample(key, group, min_side)
        if isinstance(result, str):
            skipped[result] += 1
        else:
            yield result
