"""Weights-only model files (`.safetensors`): what the project ships (`data/shipped/world_lm.safetensors`)
and what `python src/convert_checkpoint.py src=RUN/checkpoints/last.ckpt dst=FILE.safetensors` writes.

A training checkpoint carries the optimizer, the loops and the data position (~12 bytes per
parameter); generation needs the weights and what the LightningModule saved to rebuild them. The
file holds the model's tensors (`CM3LeonLM.state_dict()` names, in `dtype`) and, as safetensors
string metadata, `cm3leon` = JSON {format, hyper_parameters: {model, vocab, data_meta}, global_step}.
Tokenizer paths in data_meta are stored relative to the file's folder when they are files, so a
shipped model finds the shipped tokenizers in any clone. `generation.pipeline.load_lm` reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cm3leon.errors import UsageError

FORMAT = "cm3leon-lm-weights-1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_KEYS = ("image_tokenizer", "text_tokenizer")


def _relative_meta(meta: dict, folder: Path) -> dict:
    """data_meta with tokenizer file paths relative to `folder` (others as they are)."""
    out = dict(meta)
    for key in _TOKENIZER_KEYS:
        entry = dict(out.get(key) or {})
        if entry.get("path") and Path(entry["path"]).is_file():
            entry["path"] = os.path.relpath(Path(entry["path"]).resolve(), folder.resolve())
            out[key] = entry
    out.pop("retrieval", None)  # a memory bank of the training machine: pass retrieval.dir= to use one
    return out


def _absolute_meta(meta: dict, folder: Path) -> dict:
    out = dict(meta)
    for key in _TOKENIZER_KEYS:
        entry = dict(out.get(key) or {})
        if entry.get("path") and not Path(entry["path"]).is_absolute():
            entry["path"] = str((folder / entry["path"]).resolve())
            out[key] = entry
    return out


def save_lm_weights(ckpt: str | Path, dst: str | Path, dtype: str = "bfloat16") -> Path:
    """Write the model of training checkpoint `ckpt` as a weights-only safetensors file (atomically)."""
    from safetensors.torch import save_file

    from cm3leon.generation.pipeline import load_lm
    from cm3leon.safe_load import load_weights_only
    from cm3leon.utils import atomic_path

    if dtype not in DTYPES:
        raise UsageError(f"dtype={dtype}: use one of {sorted(DTYPES)}")
    dst = Path(dst).expanduser()
    model, vocab, meta = load_lm(ckpt)
    container = load_weights_only(ckpt, "checkpoint", mmap=True)
    hp = container.get("hyper_parameters") or {}
    header = {
        "format": FORMAT,
        "hyper_parameters": {
            "model": hp["model"],
            "vocab": vocab.to_dict(),
            "data_meta": _relative_meta(meta, dst.parent),
        },
        "global_step": int(container.get("global_step", 0)),
    }
    # tied tables are one tensor: safetensors refuses shared storage, and load_state_dict re-ties them
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not model.config.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight.to(DTYPES[dtype]).contiguous()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        save_file(state, str(tmp), metadata={"cm3leon": json.dumps(header)})
    return dst


def read_lm_weights(path: str | Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in fp32, {'model', 'vocab', 'data_meta', 'global_step'}) of a weights file;
    tensors=False reads the header only (the state dict is then empty). Tokenizer paths come back
    absolute (resolved against the file's folder)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("cm3leon", "{}"))
            state = {k: f.get_tensor(k).float() for k in f.keys()} if tensors else {}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # not a safetensors file, or truncated
        raise UsageError(f"weights file {path} is not readable ({' '.join(str(e).split())[:160]})") from None
    if header.get("format") != FORMAT:
        raise UsageError(
            f"weights file {path} is not a CM3Leon weights file (no '{FORMAT}' metadata): write one with "
            "python src/convert_checkpoint.py src=CKPT dst=FILE.safetensors"
        )
    hp = dict(header["hyper_parameters"])
    hp["data_meta"] = _absolute_meta(hp.get("data_meta") or {}, path.parent)
    hp["global_step"] = header.get("global_step")
    return state, hp
