"""Loading torch files without running code from them, and the one way to convert a trusted file.

A torch file is a pickle: unpickling it can call any function it names. Every loader of the
project (training checkpoints, resume, tokenizers, CLIP and Inception weights) reads with
`torch.load(weights_only=True)`, which allows only tensors and plain containers, and refuses any
other file in one line naming `src/convert_checkpoint.py`. That script is the only place that
unpickles fully, and only for a file the user names and trusts; it writes tensors and plain
containers that load with weights_only=True. (Importing this module does not import Lightning.)
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cm3leon.errors import UsageError

_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def convert_hint(path: str | Path) -> str:
    return (
        f"if you trust the file, convert it once with `python src/convert_checkpoint.py src={path} dst=NEW` "
        "(tensors and plain containers only)"
    )


def refusal(path: str | Path, what: str, error: BaseException, fix: str | None = None) -> UsageError:
    """The one-line UsageError for a file that weights_only loading refused."""
    found = _GLOBAL.search(str(error))
    why = f"it references {found.group(1)}" if found else " ".join(str(error).split())[:160]
    return UsageError(
        f"{what} {path} is not loaded: it holds Python objects whose unpickling could run code ({why}), "
        f"and only torch.load(weights_only=True) files are read; {fix or convert_hint(path)}"
    )


def refuse_sharded(path: Path, what: str = "checkpoint") -> None:
    """A sharded checkpoint folder (trainer=fsdp2) where one file is needed: one line with the fix."""
    if (path / ".metadata").is_file():
        raise UsageError(
            f"{what} {path} is a sharded checkpoint folder (trainer=fsdp2): write full weights first with "
            f"python src/convert_checkpoint.py src={path} dst=FILE.ckpt"
        )


def load_weights_only(
    path: str | Path, what: str = "file", fix: str | None = None, map_location: Any = "cpu", mmap: bool = False
) -> Any:
    """`torch.load(path, weights_only=True)`; a file that needs more is refused (UsageError, one line)."""
    path = Path(path)
    refuse_sharded(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise refusal(path, what, e, fix) from None
    except (RuntimeError, EOFError) as e:  # truncated or not a torch file
        reason = " ".join(str(e).split())[:160]
        raise UsageError(f"{what} {path} is not a readable torch file ({reason})") from None


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """Tensors and plain containers only: OmegaConf nodes and dataclasses -> dicts/lists, numpy ->
    tensors/numbers, paths -> str, a whole nn.Module -> its state dict. Anything else is an error
    naming where it sits."""
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.Size)):
        return obj
    try:
        from omegaconf import Container, OmegaConf

        if isinstance(obj, Container):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:
        pass
    if isinstance(obj, torch.nn.Module):
        return to_plain(obj.state_dict(), where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj), where)
    if isinstance(obj, Mapping):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return str(obj)
    raise UsageError(f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}: no plain form is known")


def load_sharded_checkpoint(folder: Path) -> dict:
    """A sharded checkpoint folder (trainer=fsdp2: torch.distributed.checkpoint shards + Lightning's
    meta.pt) as one Lightning checkpoint dict with full tensors, on the CPU, in one process."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (folder / ".metadata").is_file():
        raise UsageError(f"src={folder} is a folder but not a sharded checkpoint (no .metadata): pass a checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, Path(tmp) / "full.pt")
        state = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
    checkpoint = (
        torch.load(folder / "meta.pt", map_location="cpu", weights_only=False) if (folder / "meta.pt").is_file() else {}
    )
    checkpoint["state_dict"] = state["state_dict"]
    checkpoint["optimizer_states"] = [state[k] for k in sorted(state) if k.startswith("optimizer_")]
    return checkpoint


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: str = "bfloat16") -> Path:
    """Re-save a TRUSTED torch file (fully unpickled: it may run code), or a sharded checkpoint
    folder (trainer=fsdp2) as one file of full weights, as tensors and plain containers, written
    atomically; the result is checked to load with weights_only=True. A `dst` ending in
    `.safetensors` gets the model's weights only, in `dtype` (`cm3leon.lm_weights`)."""
    from cm3leon.utils import atomic_path

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not (src.is_file() or src.is_dir()):
        raise UsageError(f"src={src} not found: pass the checkpoint to convert")
    if dst.resolve() == src.resolve():
        raise UsageError(f"dst={dst} is the source file: pass a new path")
    if dst.suffix == ".safetensors":
        from cm3leon.lm_weights import save_lm_weights

        if src.is_dir():
            raise UsageError(f"src={src} is a sharded folder: convert it to a .ckpt first, then to {dst.name}")
        return save_lm_weights(src, dst, dtype)
    if src.is_dir():
        checkpoint = load_sharded_checkpoint(src)
    else:
        checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    plain = to_plain(checkpoint, src.name)
    with atomic_path(dst) as tmp:
        torch.save(plain, tmp)
        load_weights_only(tmp, "converted file")  # the promise: it now loads without code
    return dst
