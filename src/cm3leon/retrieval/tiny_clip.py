"""A tiny open_clip model for the embedded world's 64x64 images, registered with open_clip by name.

    from cm3leon.retrieval.tiny_clip import TINY_CLIP, register_tiny_clip
    register_tiny_clip()                                   # idempotent; DocumentEncoder calls it
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained="data/shipped/world_clip.pt")
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)

Architecture (open_clip's own `CLIP` class, nothing custom): a 3-layer ViT on 64 px images with
16 px patches (a 4x4 grid; attention relates it to the world's 3x3 cells) and a 2-layer causal text
transformer, width 64; ~0.27M parameters, 64-d embeddings.

Text tokenizer: open_clip's `SimpleTokenizer` with a *reduced* merge table. CLIP's 49k-entry BPE
would make the token embedding 90% of the model (and the shipped file tens of MB); the reduced table
keeps only the CLIP merges that spell the world's words (`WORDS`), in CLIP's order, so every world
word is tokenized exactly as CLIP tokenizes it, and any other text falls back to CLIP's byte-level
tokens (nothing is unknown). Vocabulary: 512 byte tokens + the kept merges + 2 specials. The merge
file is derived from the BPE file shipped inside open_clip (deterministic) and written to a cache
folder on first use; `WORDS` is frozen here, so the tokenizer cannot drift from the shipped weights.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

TINY_CLIP = "world-tiny-clip"

# The embedded world's caption vocabulary (cm3leon.data.world), frozen: changing it changes the
# tokenizer and invalidates data/shipped/world_clip.pt. A test checks the world still fits.
WORDS = (
    "a", "an", "and", "on", "in", "at", "of", "with", "the", "background",
    "small", "large",
    "circle", "square", "triangle",
    "red", "green", "blue", "yellow", "purple", "cyan", "orange",
    "black", "white", "gray",
    "top", "bottom", "left", "right", "center", "middle", "corner",
)  # fmt: skip

CONTEXT_LENGTH = 28  # the longest world caption is 25 tokens with <start>/<end>
EMBED_DIM = 64
# Sized for training in minutes on 2 shared CPU cores (~1 s per batch of 256 pairs there).
VISION_CFG = {"image_size": 64, "patch_size": 16, "width": 64, "layers": 3, "head_width": 32, "mlp_ratio": 2.0}
TEXT_CFG = {"width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0}


def _clip_merges() -> list[tuple[str, str]]:
    """CLIP's merge list exactly as `SimpleTokenizer` reads it (same slice)."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    return [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]


def _applied_merges(word: str, ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """The merges CLIP's BPE applies to one word (SimpleTokenizer.bpe, recording each step)."""
    from open_clip.tokenizer import bytes_to_unicode

    enc = bytes_to_unicode()
    token = "".join(enc[b] for b in word.encode("utf-8"))
    parts = list(token[:-1]) + [token[-1] + "</w>"]
    used = set()
    while len(parts) > 1:
        pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.add(best)
        out, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                out.append(parts[i] + parts[i + 1])
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return used


def world_merges() -> list[tuple[str, str]]:
    """CLIP's merges needed for `WORDS`, in CLIP's rank order."""
    merges = _clip_merges()
    ranks = {m: i for i, m in enumerate(merges)}
    used = set().union(*(_applied_merges(w, ranks) for w in WORDS))
    return sorted(used, key=ranks.__getitem__)


def vocab_size(n_merges: int) -> int:
    """SimpleTokenizer's vocabulary: 256 bytes, 256 bytes + '</w>', the merges, <start>/<end>."""
    return 512 + n_merges + 2


def model_config(bpe_path: str, n_merges: int) -> dict:
    """The open_clip model config (the JSON open_clip's factory reads)."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": dict(VISION_CFG),
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "vocab_size": vocab_size(n_merges),
            **TEXT_CFG,
            "tokenizer_kwargs": {"bpe_path": bpe_path},
        },
    }


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _cache_dir() -> Path:
    d = Path(os.environ.get("CM3LEON_CACHE", Path(tempfile.gettempdir()) / "cm3leon-open-clip"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@lru_cache(maxsize=1)
def register_tiny_clip() -> str:
    """Write the merge file and model config (once per content) and register the config with
    open_clip (`open_clip.add_model_config`). Returns the model name, `TINY_CLIP`."""
    import open_clip

    merges = world_merges()
    # no trailing newline: SimpleTokenizer would read an empty last line as one more merge
    text = "#version: world-tiny-clip (subset of CLIP's bpe_simple_vocab_16e6)\n" + "\n".join(
        f"{a} {b}" for a, b in merges
    )
    data = gzip.compress(text.encode("utf-8"), mtime=0)
    digest = hashlib.sha256(data).hexdigest()[:12]
    folder = _cache_dir() / digest
    folder.mkdir(exist_ok=True)
    bpe = folder / "world_clip_bpe.txt.gz"
    if not bpe.is_file():
        _atomic_write(bpe, data)
    cfg_path = folder / f"{TINY_CLIP}.json"
    cfg = json.dumps(model_config(str(bpe), len(merges)), indent=2).encode()
    if not cfg_path.is_file() or cfg_path.read_bytes() != cfg:
        _atomic_write(cfg_path, cfg)
    open_clip.add_model_config(cfg_path)
    return TINY_CLIP
