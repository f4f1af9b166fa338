"""Small helpers used across the package (one copy each)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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


def file_stamp(path: str | Path) -> list[int]:
    """[size, mtime_ns] of a file: the cheap identity of an input too large to hash on every rerun."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def digest(obj) -> str:
    """Short sha256 of a JSON-able object (sorted keys): one string to compare inputs by."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Write `dest` (a file or a folder) under a temporary name beside it, renamed into place on success.

        with atomic_path(out / "index.faiss") as tmp:
            faiss.write_index(index, str(tmp))

    The temporary `DEST.tmp` lives in the destination's folder (same filesystem, so the rename is
    atomic); it is removed when the block raises (Ctrl-C included) and, as the leftover of a killed
    run, when the next run starts. A folder replaces an existing `dest` by two renames (the old one
    is moved to `DEST.old` and deleted after), so readers see the old or the new folder, never a mix.
    The caller decides whether replacing `dest` is allowed (`refuse_overwrite`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and dest.exists():
        old = dest.with_name(dest.name + ".old")
        _remove(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        _remove(old)
    else:
        os.replace(tmp, dest)


def write_json_atomic(path: str | Path, obj, indent: int | None = 2) -> None:
    """`json.dumps(obj)` to `path`, atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


def cpu_training_precision(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """Lightning precision for training on this machine's CPU: bf16-mixed where the CPU has native
    bf16 (avx512_bf16 / amx_bf16), else 32-true (emulated bf16 autocast measured ~18x slower than
    fp32 on a 2-core EPYC without avx512_bf16)."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return "32-true"
    return "bf16-mixed" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "32-true"


def child_env() -> dict:
    """os.environ for a child process (a training or evaluation script), without WANDB_SERVICE: a
    W&B service started in this process must not be shared with children, or a resumed run's id is
    still registered there ("run ID ... is in use")."""
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
