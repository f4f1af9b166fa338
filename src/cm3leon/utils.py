"""Small helpers used across the package (one copy each)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return (n + multiple - 1) // multiple * multiple


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    """Hex sha256 of a file's bytes (of its first `limit` bytes when given), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while chunk := f.read(1 << 20 if remaining is None else min(1 << 20, remaining)):
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()
