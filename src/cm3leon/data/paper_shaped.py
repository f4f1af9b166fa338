"""Paper-shaped token shards without paper data: synthetic samples with the paper's shapes.

The paper's runs (PAPER.md sections 1 and 4) see per pair 1,024 image codes from an 8,192-entry
codebook (256 px, f=8 VQGAN) and a caption in a 56,320-entry BPE vocabulary, with retrieved
documents drawn from a memory bank over the training set. This module writes such data with random
contents so that the paper recipes (sequence lengths, retrieval, packing, CM3 masking, the data
path's speed) can be exercised end to end where the licensed data is not available:

    <out_dir>/{train,val}/NNNNNN.tar (+ .stats.json), meta.json, report.json   (`token_shards.py`)
    <out_dir>/retrieval/   manifest.json, {train,val}/keys*.npy + neighbours.npy + scores.npy,
                           store/ (`token_store.write_token_store` over the train split)

Contents: image codes uniform in [0, 8192) (uint16); caption lengths log-normal around 20 tokens,
clipped to [5, 77] (the CLIP context); text ids uniform over the BPE ids above its four specials.
Keys are unique across splits (`{split}-{index:09d}`). Everything is a function of the seed.

The memory bank is honest about being random: each query's pool holds `2 * per_query` distinct
bank rows drawn uniformly (never the query itself), the manifest says so (`"synthetic"`), and its
encoder is `SYNTHETIC_ENCODER` (no CLIP embedded anything): training on these files takes
`retrieval.encoder.model_name=synthetic-random retrieval.encoder.pretrained=none`, so the
staleness check (`neighbours.stale_reason`) accepts them and a real bank cannot be mistaken for
them. There is no FAISS index (inference-time retrieval by text needs a real bank).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import webdataset as wds

from cm3leon.data.raw_shards import list_shards
from cm3leon.data.token_shards import REPORT_FILE, TokenSample, encode_sample, write_meta
from cm3leon.retrieval.index import IndexConfig, KeyMap
from cm3leon.retrieval.neighbours import FORMAT_VERSION, MANIFEST, RetrievalConfig, _token_fingerprint
from cm3leon.retrieval.token_store import write_token_store
from cm3leon.utils import atomic_path, write_json_atomic
from cm3leon.vocab import PAPER_IMAGE_CODES, PAPER_TEXT_SIZE, UNK_ID

TOKENS_PER_IMAGE = 1024  # 32 x 32 codes per 256 px image
IMAGE_RESOLUTION = 256
CAPTION_MEDIAN = 20
CAPTION_SIGMA = 0.45  # log-normal spread: ~90% of captions within 10-40 tokens
CAPTION_MIN, CAPTION_MAX = 5, 77
SYNTHETIC_ENCODER = {"model_name": "synthetic-random", "pretrained": "none", "pretrained_sha256": None}
SPLITS = ("train", "val")


def _tokenizer_entry(kind: str, **sizes) -> dict:
    """A meta.json tokenizer entry that names itself synthetic (no file made these ids)."""
    tag = f"synthetic-paper-shaped-{kind}"
    return {"path": f"<{tag}>", "sha256": tag, "synthetic": True, **sizes}


def paper_meta(seed: int) -> dict:
    """meta.json of paper-shaped shards: the paper's vocabulary sizes and tokens per image."""
    return {
        "vocab": {"text_size": PAPER_TEXT_SIZE, "n_image_codes": PAPER_IMAGE_CODES},
        "tokens_per_image": TOKENS_PER_IMAGE,
        "image_resolution": IMAGE_RESOLUTION,
        "image_tokenizer": _tokenizer_entry("vqgan", n_codes=PAPER_IMAGE_CODES),
        "text_tokenizer": _tokenizer_entry("bpe", vocab_size=PAPER_TEXT_SIZE),
        "source": f"synthetic: cm3leon.data.paper_shaped (seed {seed})",
        "synthetic": True,
    }


def caption_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """n caption lengths: log-normal with median CAPTION_MEDIAN, clipped to [CAPTION_MIN, CAPTION_MAX]."""
    lengths = np.rint(CAPTION_MEDIAN * np.exp(CAPTION_SIGMA * rng.standard_normal(n)))
    return np.clip(lengths, CAPTION_MIN, CAPTION_MAX).astype(np.int64)


def make_samples(split: str, start: int, n: int, seed: int, split_index: int) -> list[TokenSample]:
    """Samples `start..start+n` of a split (one generator per shard: shard contents depend only on
    the seed, the split and the shard's first index)."""
    rng = np.random.default_rng([seed, split_index, start])
    lengths = caption_lengths(rng, n)
    codes = rng.integers(0, PAPER_IMAGE_CODES, size=(n, TOKENS_PER_IMAGE), dtype=np.uint16)
    out = []
    for i in range(n):
        text = rng.integers(UNK_ID + 1, PAPER_TEXT_SIZE, size=int(lengths[i]), dtype=np.uint16)
        key = f"{split}-{start + i:09d}"
        out.append(TokenSample(key, f"<synthetic caption of {int(lengths[i])} tokens>", text, codes[i]))
    return out


def write_split(out_dir: Path, split: str, n: int, seed: int, shard_size: int) -> dict:
    """Write one split's tars, stats sidecars, meta.json and report.json; return the report."""
    t0 = time.time()
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    write_meta(split_dir, paper_meta(seed))
    split_index = SPLITS.index(split) if split in SPLITS else len(SPLITS)
    n_shards = 0
    for j, start in enumerate(range(0, n, shard_size)):
        samples = make_samples(split, start, min(shard_size, n - start), seed, split_index)
        path = split_dir / f"{j:06d}.tar"
        with atomic_path(path) as tmp, wds.TarWriter(str(tmp)) as sink:
            for s in samples:
                sink.write(encode_sample(s))
        keys = [s.key for s in samples]
        stats = {"shard": path.name, "raw": None, "written": len(keys), "skipped": {}, "made_from": {}, "keys": keys}
        write_json_atomic(path.with_name(f"{j:06d}.stats.json"), stats, indent=None)
        n_shards += 1
    report = {
        "raw": None,
        "out_dir": str(split_dir),
        "shards": n_shards,
        "written": n,
        "skipped": {},
        "synthetic": True,
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(split_dir / REPORT_FILE, report)
    return report


def random_pools(rng: np.random.Generator, n: int, n_bank: int, width: int, self_rows: np.ndarray | None) -> np.ndarray:
    """int32 [n, width]: per query `width` distinct bank rows drawn uniformly, never its own row
    (-1 padded when the bank is too small)."""
    width_ok = min(width, n_bank - (1 if self_rows is not None else 0))
    out = np.full((n, width), -1, np.int32)
    if width_ok <= 0:
        return out
    for i in range(n):
        own = -1 if self_rows is None else int(self_rows[i])
        picks = rng.choice(n_bank - (own >= 0), size=width_ok, replace=False)
        if own >= 0:
            picks = picks + (picks >= own)  # skip the query's own row
        out[i, :width_ok] = picks
    return out


def write_random_bank(token_dir: Path, retrieval_cfg=None, seed: int = 0) -> dict:
    """Retrieval files over `token_dir/{train,val}` in the layout `NeighbourPool` reads, with pools
    drawn at random from the train split (the bank). Returns the manifest."""
    cfg = RetrievalConfig.from_any(retrieval_cfg or {})
    folder = cfg.folder(token_dir)
    t0 = time.time()
    splits = list(dict.fromkeys([cfg.bank_split, *cfg.query_splits]))
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        store_info = write_token_store(list_shards(token_dir / cfg.bank_split), tmp / "store")
        n_bank = store_info["n"]
        width = 2 * cfg.per_query
        split_info, stats = {}, {}
        for si, split in enumerate(splits):
            keys = [
                k
                for s in list_shards(token_dir / split)
                for k in json.loads(Path(s[:-4] + ".stats.json").read_text())["keys"]
            ]
            (tmp / split).mkdir()
            KeyMap.write(tmp / split / "keys", keys)
            split_info[split] = {
                "n": len(keys),
                "shards": len(list_shards(token_dir / split)),
                "token_meta": _token_fingerprint(token_dir / split),
            }
            if split not in cfg.query_splits:
                continue
            self_rows = np.arange(len(keys)) if split == cfg.bank_split else None
            rng = np.random.default_rng([seed, 1000 + si])
            nb = random_pools(rng, len(keys), n_bank, width, self_rows)
            np.save(tmp / split / "neighbours.npy", nb)
            np.save(tmp / split / "scores.npy", np.zeros(nb.shape, np.float16))
            filled = (nb >= 0).sum(1)
            stats[split] = {
                "pool_mean": round(float(filled.mean()), 3),
                "pool_full": round(float((filled == width).mean()), 4),
            }
        manifest = {
            "format_version": FORMAT_VERSION,
            "synthetic": "neighbour pools drawn uniformly at random from the bank (no encoder, no index)",
            "encoder": dict(SYNTHETIC_ENCODER),
            "rules": cfg.rules(),
            "bank_split": cfg.bank_split,
            "query_splits": list(cfg.query_splits),
            "splits": split_info,
            "index": {"n": n_bank, "factory": "none (synthetic)", "config": asdict(IndexConfig(**cfg.index))},
            "store": store_info,
            "neighbours": stats,
            "seconds": round(time.time() - t0, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def make_paper_data(
    out_dir: str | Path, n_train: int, n_val: int, seed: int = 0, shard_size: int = 1000, retrieval=None
) -> dict:
    """Write paper-shaped train/val token shards and their random memory bank under `out_dir`
    (replacing what a previous run wrote there). Returns {'train': report, 'val': report, 'retrieval': manifest}."""
    if min(n_train, n_val) < 1 or shard_size < 1:
        raise ValueError(f"n_train={n_train}, n_val={n_val} and shard_size={shard_size} must be >= 1")
    out_dir = Path(out_dir)
    for split in SPLITS:  # a rerun with other sizes must not leave shards of the last one behind
        for old in (out_dir / split).glob("*.tar"):
            old.unlink()
            old.with_name(old.name[:-4] + ".stats.json").unlink(missing_ok=True)
    reports = {split: write_split(out_dir, split, n, seed, shard_size) for split, n in zip(SPLITS, (n_train, n_val))}
    reports["retrieval"] = write_random_bank(out_dir, retrieval, seed)
    return reports


def train_overrides(out_dir: str | Path) -> list[str]:
    """The `src/train.py` overrides that train on paper-shaped data at `out_dir` with retrieval."""
    return [
        "data=shutterstock",
        "data.embedded_world=false",
        f"data.tokens_dir={out_dir}",
        "retrieval=ra",
        f"retrieval.encoder.model_name={SYNTHETIC_ENCODER['model_name']}",
        f"retrieval.encoder.pretrained={SYNTHETIC_ENCODER['pretrained']}",
    ]
