"""RA-CM3 neighbours (PAPER.md section 4): the selection rule, the offline build of the retrieval
files, and the neighbour source that puts retrieved documents before each training query.

Offline (`build_retrieval`; `python src/build_index.py`), for token shards `<tokens>/{train,val}`:

1. embed every pair with the frozen CLIP (`DocumentEncoder`): its caption (from the token shard),
   its image (from the raw shard the token shard was made from: meta.json `source`, same shard
   name, same key) and its caption with `query_dropout` (20%) of the CLIP tokens dropped;
2. the memory bank is the `bank_split` (train): document vectors normalize(text + image), a FAISS
   index over them (`index.py`), and a token store of their tokens (`token_store.py`);
3. per pair of every query split, `per_query` (2) documents with its image as the query and
   `per_query` with its dropped-out caption (`select_neighbours`): a pool of up to 4 bank rows.

Selection rule (`select_neighbours`), walking each query's candidates best first:
skip the pair itself (same key), candidates with relevance > `max_relevance` (0.9: near-
duplicates of the query), candidates that duplicate the query document or an already picked
document (document inner product >= `duplicate_threshold`; the same row found by both queries
counts once). Fewer than `per_query` survivors among `search_k` candidates leave the pool short.

Files, `<tokens>/retrieval/` (or `retrieval.dir`):

    manifest.json                 encoder, rules, index stats, per-split counts and tokenizer hashes
    SPLIT/keys*.npy               KeyMap: row <-> sample key, rows in token-shard order
    SPLIT/image.npy text.npy query_text.npy    float16 [n, dim] unit vectors
    SPLIT/neighbours.npy          int32 [n, pool] bank rows (-1: empty slot), best first per query
    SPLIT/scores.npy              float16 [n, pool] their relevance to the query that found them
    bank/doc.npy                  float16 [N, dim] bank document vectors; bank/index.faiss
    store/                        the bank's tokens by row (TokenStore)

Training (`NeighbourPool`, the training `DocumentSource`): per example, the pool of the sample's key
is shuffled with the example's own generator and the first `k` documents are returned (so a resumed
stream yields the same documents); the DataModule lays them out before the query. The DataModule
makes the files when missing (`ensure_retrieval`, in its prepare_data) and opens them
(`NeighbourPool.from_config`, in its setup).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cm3leon.data.checked_reader import iter_raw_samples
from cm3leon.data.raw_shards import list_shards
from cm3leon.data.sequences import Document
from cm3leon.data.token_shards import decode_sample, read_meta
from cm3leon.data.token_stream import read_token_shard, shard_sample_count
from cm3leon.errors import UsageError
from cm3leon.retrieval.index import IndexConfig, KeyMap, build_index
from cm3leon.retrieval.protocol import RetrievalQuery
from cm3leon.retrieval.token_store import TokenStore, write_token_store
from cm3leon.utils import atomic_path

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class RetrievalConfig:
    """`conf/retrieval/ra.yaml` as a dataclass (unknown keys such as `name` are ignored)."""

    k: int = 2  # documents per training example, sampled from the pool (metaseq 2; the paper 3)
    per_query: int = 2  # pool: per_query for the image query + per_query for the text query
    max_relevance: float = 0.9
    duplicate_threshold: float = 0.98
    search_k: int = 128
    query_dropout: float = 0.2
    seed: int = 0
    bank_split: str = "train"
    query_splits: tuple[str, ...] = ("train", "val")
    query_batch: int = 512
    dir: str | None = None  # default: <token dir>/retrieval
    raw_dir: str | None = None  # raw shards per split; default: each split's meta.json `source`
    encoder: dict = field(default_factory=lambda: {"model_name": "ViT-B-32", "pretrained": None})
    index: dict = field(default_factory=dict)

    @classmethod
    def from_any(cls, cfg) -> "RetrievalConfig":
        if isinstance(cfg, RetrievalConfig):
            return cfg
        if not isinstance(cfg, Mapping):  # an OmegaConf DictConfig
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        fields = cls.__dataclass_fields__
        values = {k: v for k, v in dict(cfg).items() if k in fields}
        if "query_splits" in values:
            values["query_splits"] = tuple(values["query_splits"])
        return cls(**values)

    def folder(self, token_dir: str | Path) -> Path:
        return Path(self.dir) if self.dir else Path(token_dir) / "retrieval"

    def rules(self) -> dict:
        keys = ("per_query", "max_relevance", "duplicate_threshold", "search_k", "query_dropout", "seed")
        return {k: getattr(self, k) for k in keys}


def build_command(token_dir: str | Path) -> str:
    return f"`python src/build_index.py tokens_dir={token_dir} embedded_world=false`"


# ---- the selection rule ----------------------------------------------------------------------
def select_neighbours(
    candidates: list[tuple[np.ndarray, np.ndarray]],
    bank_docs: np.ndarray,
    per_query: int,
    max_relevance: float = 0.9,
    duplicate_threshold: float = 0.98,
    self_rows: np.ndarray | None = None,
    query_docs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick up to `per_query` documents per query kind for B query pairs.

    Args:
        candidates: per query kind (image, text, ...): (scores float [B, K], bank rows int [B, K])
            as returned by FAISS, best first; row -1 = no candidate.
        bank_docs: unit document vectors of the bank [N, D] (a memmap is fine).
        self_rows: [B] each query pair's own bank row (-1: not in the bank).
        query_docs: [B, D] each query pair's document vector: its duplicates are skipped.
    Returns:
        rows int64 [B, per_query * kinds] (-1 padded), scores float32 [B, same]: for each query kind
        its picks in order, kinds one after the other.
    """
    scores = np.concatenate([c[0] for c in candidates], 1).astype(np.float32)
    rows = np.concatenate([c[1] for c in candidates], 1).astype(np.int64)
    B, QK = rows.shape
    kind = np.repeat(np.arange(len(candidates)), [c[1].shape[1] for c in candidates])
    valid = (rows >= 0) & (scores <= max_relevance)
    if self_rows is not None:
        valid &= rows != np.asarray(self_rows)[:, None]
    vec = np.asarray(bank_docs[np.clip(rows, 0, None).ravel()], dtype=np.float32).reshape(B, QK, -1)
    if query_docs is not None:
        valid &= np.einsum("bkd,bd->bk", vec, np.asarray(query_docs, np.float32)) < duplicate_threshold
    sim = np.einsum("bkd,bjd->bkj", vec, vec)  # candidate x candidate document similarity
    picked = np.zeros((B, QK), bool)
    count = np.zeros((B, len(candidates)), np.int64)
    for j in range(QK):
        dup = (picked & ((sim[:, j, :] >= duplicate_threshold) | (rows == rows[:, j : j + 1]))).any(1)
        take = valid[:, j] & ~dup & (count[:, kind[j]] < per_query)
        picked[:, j] = take
        count[take, kind[j]] += 1
    width = per_query * len(candidates)
    out_rows = np.full((B, width), -1, np.int64)
    out_scores = np.full((B, width), np.nan, np.float32)
    for b in range(B):
        sel = np.flatnonzero(picked[b])
        out_rows[b, : len(sel)] = rows[b, sel]
        out_scores[b, : len(sel)] = scores[b, sel]
    return out_rows, out_scores


# ---- offline build -----------------------------------------------------------------------------
def _raw_shard_map(source: str, split: str, cfg: RetrievalConfig) -> dict[str, str]:
    spec = f"{cfg.raw_dir}/{split}" if cfg.raw_dir else source
    try:
        shards = list_shards(spec)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"raw shards of split {split} (images to embed) not found: {e}; pass raw_dir=..."
        ) from None
    return {Path(s).name: s for s in shards}


def embed_split(
    encoder, split_dir: Path, out: Path, cfg: RetrievalConfig, split: str, raw: dict[str, str] | None = None
) -> dict:
    """Embed every pair of one token-shard split into `out/{image,text,query_text}.npy` + keys
    (`raw`: raw shard name -> path, `_raw_shard_map`)."""
    from numpy.lib.format import open_memmap

    if raw is None:
        raw = _raw_shard_map(read_meta(split_dir).get("source", ""), split, cfg)
    shards = list_shards(split_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = [shard_sample_count(s) for s in shards]
    if None in counts:  # no stats sidecar: count by reading
        counts = [len(read_token_shard(s)) for s in shards]
    n = sum(counts)
    arrays = {
        name: open_memmap(out / f"{name}.npy", mode="w+", dtype=np.float16, shape=(n, encoder.dim))
        for name in ("image", "text", "query_text")
    }
    keys: list[str] = []
    row = 0
    for j, shard in enumerate(shards):
        samples = [decode_sample(r) for r in read_token_shard(shard)]
        name = Path(shard).name
        if name not in raw:
            raise FileNotFoundError(f"raw shard {name} (the images of token shard {shard}) not found; pass raw_dir=...")
        wanted = {s.key for s in samples}
        images = {s.key: s.image for s in iter_raw_samples(raw[name]) if s.key in wanted}
        missing = wanted - images.keys()
        if missing:
            raise ValueError(
                f"raw shard {raw[name]} lacks {len(missing)} samples of {shard} (e.g. {min(missing)}); preprocess again"
            )
        captions = [s.caption for s in samples]
        # query dropout: one generator per shard, so the drop does not depend on batching
        rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode()), j])
        sl = slice(row, row + len(samples))
        arrays["text"][sl] = encoder.encode_texts(captions)
        arrays["query_text"][sl] = encoder.encode_texts(captions, drop_rate=cfg.query_dropout, rng=rng)
        arrays["image"][sl] = encoder.encode_images([images[s.key] for s in samples])
        keys += [s.key for s in samples]
        row += len(samples)
    if row != n:
        raise ValueError(
            f"{split_dir}: the stats sidecars count {n} samples but the shards hold {row}; preprocess again"
        )
    for a in arrays.values():
        a.flush()
    KeyMap.write(out / "keys", keys)
    return {"n": n, "shards": len(shards), "token_meta": _token_fingerprint(split_dir)}


def _token_fingerprint(split_dir: Path) -> dict:
    """What identifies a token split: its tokenizers, and its shard files (name, size, mtime), so
    that regenerated shards (e.g. a new world version) make the retrieval files stale."""
    meta = read_meta(split_dir)
    files = hashlib.sha256()
    for s in list_shards(split_dir):
        st = os.stat(s)
        files.update(f"{Path(s).name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return {
        "image_tokenizer": meta["image_tokenizer"]["sha256"],
        "text_tokenizer": meta["text_tokenizer"]["sha256"],
        "shards": files.hexdigest(),
    }


def _load_f32(path: Path, rows: slice | None = None) -> np.ndarray:
    a = np.load(path, mmap_mode="r")
    return np.asarray(a if rows is None else a[rows], dtype=np.float32)


def _existing_build(folder: Path, cfg: RetrievalConfig, token_dir: Path) -> tuple[dict | None, str | None]:
    """(manifest, why it differs) of the build in `folder`: (None, None) when there is none,
    (manifest, None) when it matches the token shards and the config. Raises UsageError when the
    folder holds files that build_index did not write."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return None, None
    if not (folder / MANIFEST).is_file():
        raise UsageError(
            f"retrieval dir {folder} is not empty and holds no {MANIFEST} (it was not made by build_index): "
            "choose a new or empty folder (retrieval.dir=...)"
        )
    try:
        manifest = read_manifest(folder, token_dir)
    except UsageError:  # an older format: other inputs as far as reuse goes
        return {}, "an older format"
    reason = stale_reason(cfg, token_dir)
    if reason is None and manifest["index"].get("config") != asdict(IndexConfig(**cfg.index)):
        reason = "the index settings differ"
    return manifest, reason


def build_retrieval(retrieval_cfg, token_dir: str | Path, progress: bool = True, overwrite: bool = False) -> dict:
    """Embed, index, select neighbours and write the token store for `<token_dir>/{splits}`.

    Returns (and writes) the manifest. `retrieval_cfg`: `conf/retrieval/ra.yaml` (dict, DictConfig
    or RetrievalConfig). Inputs are checked first (token shards, raw shards, the encoder's weights);
    a finished build of the same inputs and config is returned as it is (`"reused": True`); a build
    of other inputs is replaced only with `overwrite`. The files are written in `<folder>.tmp` and
    renamed into place at the end, so an interrupted build leaves the old one whole.
    """
    from cm3leon.retrieval.clip_encoder import DocumentEncoder

    cfg = RetrievalConfig.from_any(retrieval_cfg)
    token_dir = Path(token_dir)
    folder = cfg.folder(token_dir)
    splits = list(dict.fromkeys([cfg.bank_split, *cfg.query_splits]))
    raw_maps = {}
    for split in splits:  # one clear line when a split has no token or raw shards
        raw_maps[split] = _raw_shard_map(read_meta(token_dir / split).get("source", ""), split, cfg)
    IndexConfig(**cfg.index)  # a bad index kind: one line now, not after embedding
    old, reason = _existing_build(folder, cfg, token_dir)
    if old is not None and reason is None:
        return {**old, "reused": True}
    if old is not None and not overwrite:
        raise UsageError(
            f"{folder} holds retrieval files of other inputs or settings ({reason}): "
            f"pass overwrite=true to rebuild them, or choose another retrieval.dir"
        )
    t0 = time.time()
    say = print if progress else (lambda *a, **k: None)
    encoder = DocumentEncoder(**cfg.encoder)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        manifest = _build_into(tmp, cfg, token_dir, splits, raw_maps, encoder, say, t0)
    return manifest


def _build_into(folder: Path, cfg: RetrievalConfig, token_dir: Path, splits, raw_maps, encoder, say, t0) -> dict:
    """The build itself, into a fresh `folder` (the temporary one)."""
    from numpy.lib.format import open_memmap

    from cm3leon.retrieval.clip_encoder import document_vectors

    split_info = {}
    for split in splits:
        split_info[split] = embed_split(encoder, token_dir / split, folder / split, cfg, split, raw_maps[split])
        say(f"[retrieval] embedded {split_info[split]['n']} {split} pairs ({time.time() - t0:.0f} s)", flush=True)
    key_maps = {s: KeyMap.load(folder / s / "keys", mmap=False) for s in splits}
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            common = np.intersect1d(key_maps[a].sorted_keys, key_maps[b].sorted_keys)
            if len(common):
                raise ValueError(
                    f"sample keys must be unique across splits: {a} and {b} share {len(common)} (e.g. {common[0]!r})"
                )

    # the memory bank
    bank = folder / cfg.bank_split
    n_bank = split_info[cfg.bank_split]["n"]
    (folder / "bank").mkdir(exist_ok=True)
    docs = open_memmap(folder / "bank" / "doc.npy", mode="w+", dtype=np.float16, shape=(n_bank, encoder.dim))
    for s in range(0, n_bank, 100_000):
        sl = slice(s, s + 100_000)
        docs[sl] = document_vectors(_load_f32(bank / "text.npy", sl), _load_f32(bank / "image.npy", sl))
    docs.flush()
    index_cfg = IndexConfig(**cfg.index)
    index, index_stats = build_index(docs, index_cfg, folder / "bank" / "index.faiss")
    say(
        f"[retrieval] indexed {n_bank} bank documents: {index_stats['factory']} ({index_stats['seconds']} s)",
        flush=True,
    )
    store_info = write_token_store(list_shards(token_dir / cfg.bank_split), folder / "store")
    if store_info["n"] != n_bank:
        raise RuntimeError(f"token store has {store_info['n']} rows but the bank {n_bank}")

    # neighbours of every query split
    bank_docs = np.load(folder / "bank" / "doc.npy", mmap_mode="r")
    stats = {}
    for split in cfg.query_splits:
        d = folder / split
        n = split_info[split]["n"]
        width = 2 * cfg.per_query
        nb = open_memmap(d / "neighbours.npy", mode="w+", dtype=np.int32, shape=(n, width))
        sc = open_memmap(d / "scores.npy", mode="w+", dtype=np.float16, shape=(n, width))
        keys = key_maps[split]
        self_rows = (
            np.arange(n) if split == cfg.bank_split else key_maps[cfg.bank_split].rows([keys.key(r) for r in range(n)])
        )
        for s in range(0, n, cfg.query_batch):
            sl = slice(s, min(n, s + cfg.query_batch))
            img, txt, qtxt = (_load_f32(d / f"{x}.npy", sl) for x in ("image", "text", "query_text"))
            cands = [index.search(img, cfg.search_k), index.search(qtxt, cfg.search_k)]
            rows, scores = select_neighbours(
                cands,
                bank_docs,
                cfg.per_query,
                cfg.max_relevance,
                cfg.duplicate_threshold,
                self_rows=self_rows[sl],
                query_docs=document_vectors(txt, img),
            )
            nb[sl], sc[sl] = rows, scores
        nb.flush()
        sc.flush()
        filled = (np.asarray(nb) >= 0).sum(1)
        stats[split] = {
            "pool_mean": round(float(filled.mean()), 3),
            "pool_full": round(float((filled == width).mean()), 4),
            "max_score": float(np.nanmax(np.asarray(sc, np.float32))) if filled.any() else None,
        }
        say(f"[retrieval] neighbours of {n} {split} pairs: {json.dumps(stats[split])}", flush=True)

    manifest = {
        "format_version": FORMAT_VERSION,
        "encoder": encoder.describe(),
        "rules": cfg.rules(),
        "bank_split": cfg.bank_split,
        "query_splits": list(cfg.query_splits),
        "splits": split_info,
        "index": index_stats,
        "store": store_info,
        "neighbours": stats,
        "seconds": round(time.time() - t0, 1),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence = complete
    return {**manifest, "reused": False}


# ---- checks and first-use build ----------------------------------------------------------------
def read_manifest(folder: Path, token_dir: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"retrieval files {path} not found: build them with {build_command(token_dir)}")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UsageError(
            f"{path}: retrieval format {manifest.get('format_version')} != {FORMAT_VERSION}; rebuild with {build_command(token_dir)}"
        )
    return manifest


def check_bank_tokenizers(
    folder: str | Path, tokenizers: Mapping[str, str | None], user: str, manifest: Mapping | None = None
) -> None:
    """Refuse (one line) a memory bank whose documents were tokenized with other tokenizers than
    `tokenizers` ({'image_tokenizer', 'text_tokenizer'}: sha256), the ones `user` reads tokens with:
    its image codes would be another codebook's, silently. `manifest`: the folder's, when already read."""
    manifest = manifest or read_manifest(Path(folder), Path(folder).parent)
    bank = manifest["splits"][manifest["bank_split"]]["token_meta"]
    for key in ("image_tokenizer", "text_tokenizer"):
        if bank[key] != tokenizers.get(key):
            raise UsageError(
                f"memory bank {folder} was made with another {key} than {user}: pass retrieval.dir= a bank "
                "built from token shards of the model's own tokenizers (`python src/build_index.py`)"
            )


def stale_reason(retrieval_cfg, token_dir: str | Path) -> str | None:
    """Why the retrieval files do not match the token shards and config (None: they do)."""
    cfg = RetrievalConfig.from_any(retrieval_cfg)
    folder = cfg.folder(token_dir)
    manifest = read_manifest(folder, token_dir)
    for split in dict.fromkeys([cfg.bank_split, *cfg.query_splits]):
        if split not in manifest["splits"]:
            return f"split {split} was not embedded"
        if manifest["splits"][split]["token_meta"] != _token_fingerprint(Path(token_dir) / split):
            return f"the {split} token shards changed since the retrieval files were built"
    if manifest["rules"] != cfg.rules():
        return "the selection rules in the config differ from the ones the files were built with"
    enc, want = manifest["encoder"], cfg.encoder
    pretrained = str(want.get("pretrained"))
    if Path(pretrained).is_file():
        from cm3leon.utils import file_sha256

        same = enc["pretrained_sha256"] == file_sha256(pretrained)
    else:
        same = enc["pretrained"] == pretrained
    if enc["model_name"] != want.get("model_name") or not same:
        return "the configured encoder differs from the one that embedded the bank"
    return None


def ensure_retrieval(retrieval_cfg, token_dir: str | Path, build_missing: bool = False) -> Path:
    """The retrieval folder, checked against the token shards; built when `build_missing` (the
    embedded world), else a missing or stale build is one clear error line."""
    cfg = RetrievalConfig.from_any(retrieval_cfg)
    folder = cfg.folder(token_dir)
    try:
        reason = stale_reason(cfg, token_dir)
    except FileNotFoundError:
        if not build_missing:
            raise
        reason = "first use"
    if reason is None:
        return folder
    if not build_missing:
        raise UsageError(f"retrieval files in {folder} are stale ({reason}); rebuild with {build_command(token_dir)}")
    print(f"[retrieval] building the retrieval files ({reason}) into {folder}", flush=True)
    build_retrieval(cfg, token_dir, overwrite=True)  # the embedded world's own files follow its token shards
    return folder


# ---- the training-time source ----------------------------------------------------------------
class NeighbourPool:
    """The training document source (`cm3leon.retrieval.protocol.DocumentSource`): a query's
    `key` -> k documents of that sample's offline pool, drawn with the caller's generator.

    Opens its memory-mapped files on first use, so it pickles small into DataLoader workers.
    """

    def __init__(self, folder: str | Path, splits: list[str]):
        self.folder, self.splits = Path(folder), list(splits)
        self.store = TokenStore(self.folder / "store")
        for s in self.splits:
            for f in (self.folder / s / "neighbours.npy", self.folder / s / "keys.npy"):
                if not f.is_file():
                    raise FileNotFoundError(f"neighbour file {f} not found: build it with `python src/build_index.py`")
        self._maps = None

    @classmethod
    def from_config(cls, retrieval_cfg, token_dir: str | Path) -> "NeighbourPool":
        """The pool of `conf/retrieval/*.yaml`'s files for the token splits `<token_dir>/{train,val}`
        (made by `ensure_retrieval` or `python src/build_index.py`; not checked for staleness here)."""
        cfg = RetrievalConfig.from_any(retrieval_cfg)
        return cls(cfg.folder(token_dir), list(cfg.query_splits))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def _open(self):
        if self._maps is None:
            self._maps = [
                (KeyMap.load(self.folder / s / "keys"), np.load(self.folder / s / "neighbours.npy", mmap_mode="r"))
                for s in self.splits
            ]
        return self._maps

    def pool(self, key: str) -> np.ndarray:
        """Bank rows of the sample's neighbours (the filled slots, in stored order)."""
        for keys, nb in self._open():
            row = keys.row(key)
            if row >= 0:
                p = np.asarray(nb[row])
                return p[p >= 0]
        raise KeyError(
            f"sample {key} has no neighbours in {self.folder}: the retrieval files are older than the token "
            "shards; rebuild them with `python src/build_index.py`"
        )

    def documents(
        self, queries: Sequence[RetrievalQuery], k: int, rng: np.random.Generator | None = None
    ) -> list[list[Document]]:
        """Per query (by `key`), k documents of its pool: the pool shuffled by `rng` (the example's
        own generator, so that a resumed stream draws the same documents), or in stored order (best
        first per query kind) without one. Fewer when the pool is shorter."""
        out = []
        for q in queries:
            if q.key is None:
                raise ValueError(
                    "NeighbourPool answers training queries by sample key (RetrievalQuery.key); "
                    "retrieval by prompt text is the Retriever's"
                )
            pool = self.pool(q.key)
            if k <= 0 or len(pool) == 0:
                out.append([])
                continue
            picked = rng.permutation(pool)[:k] if rng is not None else pool[:k]
            out.append(self.store.documents(picked))
        return out
