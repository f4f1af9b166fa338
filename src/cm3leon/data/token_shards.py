"""Token shards: the training-ready WebDataset format written by `src/preprocess.py`.

One tar per raw input shard (same file name), one sample per image-caption pair:

    KEY.json        {"key": ..., "caption": ...}
    KEY.text.npy    uint16 [n_text]   BPE ids of the caption (no BOS/EOS)
    KEY.codes.npy   uint16 [h*w]      image codes in [0, n_image_codes) (no vocabulary offset)
    KEY.clip.npy    float16 [dim]     CLIP document embedding (only when retrieval preprocessing ran)

Beside the tars, `meta.json` records what made them (tokenizers and their hashes, the vocabulary
sizes, tokens per image) so that the training code can build the matching `Vocab` and refuse
shards made with a different tokenizer; `NNNNNN.stats.json` holds each shard's counts and
`report.json` the whole run's.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3leon.utils import write_json_atomic
from cm3leon.vocab import Vocab

FORMAT_VERSION = 1
META_FILE = "meta.json"
REPORT_FILE = "report.json"


@dataclass
class TokenSample:
    key: str
    caption: str
    text_ids: np.ndarray  # uint16 [n_text]
    codes: np.ndarray  # uint16 [h*w]
    clip: np.ndarray | None = None  # float16 [dim]


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def encode_sample(s: TokenSample) -> dict:
    """TokenSample -> a dict of raw bytes for `webdataset.TarWriter`."""
    if s.text_ids.max(initial=0) > np.iinfo(np.uint16).max or s.codes.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"{s.key}: ids do not fit uint16 (text vocabulary or codebook too large)")
    out = {
        "__key__": s.key,
        "json": json.dumps({"key": s.key, "caption": s.caption}).encode("utf-8"),
        "text.npy": _npy_bytes(np.asarray(s.text_ids, dtype=np.uint16)),
        "codes.npy": _npy_bytes(np.asarray(s.codes, dtype=np.uint16)),
    }
    if s.clip is not None:
        out["clip.npy"] = _npy_bytes(np.asarray(s.clip, dtype=np.float16))
    return out


def decode_sample(raw: dict) -> TokenSample:
    """A raw webdataset sample (bytes per member) -> TokenSample."""
    meta = json.loads(raw["json"])
    return TokenSample(
        key=meta["key"],
        caption=meta["caption"],
        text_ids=_npy_load(raw["text.npy"]),
        codes=_npy_load(raw["codes.npy"]),
        clip=_npy_load(raw["clip.npy"]) if "clip.npy" in raw else None,
    )


def write_meta(out_dir: str | Path, meta: dict) -> None:
    """Write `out_dir/meta.json` atomically (the folder is made when missing)."""
    write_json_atomic(Path(out_dir) / META_FILE, {"format_version": FORMAT_VERSION, **meta})


def read_meta(token_dir: str | Path) -> dict:
    """Read `meta.json` of a token-shard folder; one clear line when it is missing."""
    path = Path(token_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {token_dir} holds no token shards; make them with `python src/preprocess.py` "
            "(README: 'Bring your own data')"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: token-shard format {meta.get('format_version')} != {FORMAT_VERSION}; rerun preprocess"
        )
    return meta


def load_token_vocab(train_dir: str | Path, val_dir: str | Path, **vocab_overrides) -> tuple[Vocab, dict]:
    """The Vocab of a train/val pair of token-shard folders (from meta.json; no shard is opened).

    Raises FileNotFoundError naming a missing folder, ValueError when the two folders were made
    with different tokenizers. `vocab_overrides`: base_size, n_sentinels, pad_multiple.
    """
    for what, d in (("training", train_dir), ("validation", val_dir)):
        if not Path(d).is_dir():
            raise FileNotFoundError(
                f"{what} token shards {d} not found; make them with `python src/preprocess.py` "
                "(README: 'Bring your own data')"
            )
    meta, val_meta = read_meta(train_dir), read_meta(val_dir)
    for name in ("image_tokenizer", "text_tokenizer"):
        if val_meta[name]["sha256"] != meta[name]["sha256"]:
            raise ValueError(f"{train_dir} and {val_dir} were made with different {name}s; preprocess both again")
    return Vocab(**meta["vocab"], **vocab_overrides), meta
