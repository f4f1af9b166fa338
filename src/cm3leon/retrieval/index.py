"""The memory bank's FAISS index (maximum inner product search) and its key map.

    index, stats = build_index(doc_vectors, IndexConfig(kind="auto"), "bank/index.faiss")
    index = load_index("bank/index.faiss", nprobe=32)         # memory-mapped
    scores, rows = index.search(queries_float32, k)           # rows index the bank (and its KeyMap)

Kinds (`IndexConfig.kind`; every one uses inner product on unit vectors):
    flat    exact search (IndexFlatIP); `auto` picks it up to `flat_max` vectors
    ivf     IVF{nlist},Flat: k-means cells, `nprobe` cells scanned per query; exact scores
    ivfpq   IVF{nlist},PQ{pq_m}np: codes of pq_m bytes per vector, for banks that do not fit as floats
    hnsw    HNSW{hnsw_m},Flat graph (CPU only)

Large banks: vectors are read in chunks of `add_batch` rows (a memory-mapped .npy never has to fit
in RAM), IVF quantizers are trained on a sample of `train_size` rows, and IVF banks above
`shard_rows` are built in shards (each its own index file, same trained quantizer) merged into one
on-disk index (`faiss.contrib.ondisk.merge_ondisk`: index.faiss + index.ivfdata). Loading uses
`faiss.IO_FLAG_MMAP` (IVF lists) and `IO_FLAG_MMAP_IFC` (flat codes): pages are read on demand.
With faiss' GPU build (`faiss.get_num_gpus() > 0`), training, adding and searching of flat/IVF
indexes run on the GPUs; the file written is always a CPU index.

Ids: the index holds rows 0..N-1 of the bank in order; `KeyMap` (saved beside the index) maps
rows <-> sample keys (sorted copy + binary search, memory-mapped, no Python dict of N strings).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from cm3leon.utils import atomic_path

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
MMAP_FLAGS = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC


@dataclass
class IndexConfig:
    kind: str = "auto"
    flat_max: int = 200_000  # auto: exact search up to this many vectors, IVF above
    nlist: int | None = None  # IVF cells; None: 4 sqrt(N), rounded to a power of two, <= 65536
    nprobe: int = 32  # IVF cells scanned per query
    pq_m: int = 32  # ivfpq: bytes per vector (sub-quantizers of 8 bits); must divide the dimension
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    train_size: int = 200_000  # rows sampled to train IVF/PQ
    add_batch: int = 100_000  # rows converted to float32 and added per call
    shard_rows: int = 5_000_000  # IVF banks above this are built in shards merged on disk
    gpu: bool = True  # use faiss' GPUs when present (flat/IVF)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind={self.kind!r} is not one of {KINDS}")


def resolve_kind(cfg: IndexConfig, n: int) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    return "flat" if n <= cfg.flat_max else "ivf"


def default_nlist(n: int) -> int:
    """~4 sqrt(N) cells as a power of two, at least 1 and with >= 39 training points per cell."""
    target = max(1, min(65536, 4 * math.sqrt(n), n // 39))
    return 2 ** round(math.log2(target))


def factory_string(kind: str, cfg: IndexConfig, n: int) -> str:
    nlist = cfg.nlist or default_nlist(n)
    return {
        "flat": "Flat",
        "ivf": f"IVF{nlist},Flat",
        "ivfpq": f"IVF{nlist},PQ{cfg.pq_m}np",  # np: no polysemous training (minutes, unused here)
        "hnsw": f"HNSW{cfg.hnsw_m},Flat",
    }[kind]


def _use_gpu(cfg: IndexConfig, kind: str) -> bool:
    return bool(cfg.gpu) and kind != "hnsw" and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def _chunks(vectors: np.ndarray, batch: int):
    for s in range(0, len(vectors), batch):
        yield s, np.ascontiguousarray(vectors[s : s + batch], dtype=np.float32)


def _train_sample(vectors: np.ndarray, cfg: IndexConfig) -> np.ndarray:
    n = len(vectors)
    if n <= cfg.train_size:
        return np.ascontiguousarray(vectors[:], dtype=np.float32)
    rows = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.train_size, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)  # sorted rows: sequential reads


def set_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """nprobe (IVF) / efSearch (HNSW) on a CPU or GPU index."""
    if nprobe is not None:
        try:
            faiss.extract_index_ivf(index).nprobe = nprobe
        except RuntimeError:  # not an IVF index (flat, HNSW), or a GPU IVF index
            if hasattr(index, "nprobe"):
                index.nprobe = nprobe
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search


def build_index(vectors: np.ndarray, cfg: IndexConfig, path: str | Path) -> tuple[faiss.Index, dict]:
    """Index unit vectors [N, D] (float16/32, may be a memmap) and write it to `path`.

    Returns (the index, ready to search; stats {kind, factory, n, dim, seconds, ...}). Rows keep
    their order: search results are row numbers of `vectors`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, d = vectors.shape
    if n == 0:
        raise ValueError("build_index: the memory bank is empty")
    kind = resolve_kind(cfg, n)
    factory = factory_string(kind, cfg, n)
    t0 = time.time()
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = cfg.ef_construction
    gpu = _use_gpu(cfg, kind)
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if kind in ("ivf", "ivfpq"):
        index.train(_train_sample(vectors, cfg))
    t_train = time.time() - t0
    sharded = kind in ("ivf", "ivfpq") and n > cfg.shard_rows
    if sharded:
        index = _build_sharded(vectors, index, gpu, cfg, path)
    else:
        for _, chunk in _chunks(vectors, cfg.add_batch):
            index.add(chunk)
        if gpu:
            index = faiss.index_gpu_to_cpu(index)
        set_search_params(index, cfg.nprobe, cfg.ef_search)  # saved with the index
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
    stats = {
        "kind": kind,
        "factory": factory,
        "n": int(n),
        "dim": int(d),
        "gpu": gpu,
        "shards": math.ceil(n / cfg.shard_rows) if sharded else 1,
        "train_seconds": round(t_train, 3),
        "seconds": round(time.time() - t0, 3),
        "config": asdict(cfg),
    }
    return index, stats


def _build_sharded(vectors: np.ndarray, trained: faiss.Index, gpu: bool, cfg: IndexConfig, path: Path) -> faiss.Index:
    """IVF in shards of `shard_rows`: each shard gets a copy of the trained empty index, is filled
    and written; the shards' inverted lists are merged into `path` + `path.ivfdata` on disk."""
    from faiss.contrib.ondisk import merge_ondisk

    if gpu:
        trained = faiss.index_gpu_to_cpu(trained)
    empty = faiss.serialize_index(trained)
    shard_files = []
    for j, s in enumerate(range(0, len(vectors), cfg.shard_rows)):
        shard = faiss.deserialize_index(empty)
        part = vectors[s : s + cfg.shard_rows]
        for off, chunk in _chunks(part, cfg.add_batch):
            shard.add_with_ids(chunk, np.arange(s + off, s + off + len(chunk), dtype=np.int64))
        shard_files.append(str(path.with_name(f"{path.name}.shard{j:04d}")))
        faiss.write_index(shard, shard_files[-1])
        del shard
    merged = faiss.deserialize_index(empty)
    ivfdata = path.with_name(path.stem + ".ivfdata")
    ivfdata.unlink(missing_ok=True)
    merge_ondisk(merged, shard_files, str(ivfdata))  # the index names this file: written in place
    set_search_params(merged, cfg.nprobe, cfg.ef_search)
    with atomic_path(path) as tmp:
        faiss.write_index(merged, str(tmp))
    for f in shard_files:
        os.unlink(f)
    return load_index(path, gpu=False)


def load_index(
    path: str | Path, nprobe: int | None = None, ef_search: int | None = None, mmap: bool = True, gpu: bool = True
) -> faiss.Index:
    """Read an index written by `build_index` (memory-mapped by default); one clear line when missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FAISS index {path} not found: build it with `python src/build_index.py`")
    on_disk = path.with_name(path.stem + ".ivfdata").is_file()
    if on_disk:  # a merged index memory-maps its .ivfdata itself; the flag finds it beside the index
        index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    elif not mmap:
        index = faiss.read_index(str(path))
    else:
        try:  # flat codes (flat, HNSW storage) and IVF lists mapped
            index = faiss.read_index(str(path), MMAP_FLAGS)
        except RuntimeError:  # faiss maps IVF lists only through its plain file reader
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    if gpu and not on_disk and not hasattr(index, "hnsw") and _use_gpu(IndexConfig(), "flat"):
        index = faiss.index_cpu_to_all_gpus(index)
    set_search_params(index, nprobe, ef_search)
    return index


# ---- key map -------------------------------------------------------------------------------
class KeyMap:
    """Row <-> key for N sample keys, stored as three .npy files beside each other:
    `PREFIX.npy` (keys in row order, bytes), `PREFIX.sorted.npy`, `PREFIX.order.npy` (row of each
    sorted key). Lookups are binary searches on memory-mapped arrays."""

    def __init__(self, keys: np.ndarray, sorted_keys: np.ndarray, order: np.ndarray):
        self.keys, self.sorted_keys, self.order = keys, sorted_keys, order

    @staticmethod
    def write(prefix: str | Path, keys: list[str]) -> None:
        arr = np.array([k.encode("utf-8") for k in keys], dtype=np.bytes_)
        if len(arr) == 0:
            arr = np.zeros(0, dtype="S1")
        order = np.argsort(arr, kind="stable").astype(np.int64)
        for suffix, a in ((".npy", arr), (".sorted.npy", arr[order]), (".order.npy", order)):
            with atomic_path(str(prefix) + suffix) as tmp, open(tmp, "wb") as f:
                np.save(f, a)  # a file object: np.save would append .npy to the temporary name

    @classmethod
    def load(cls, prefix: str | Path, mmap: bool = True) -> "KeyMap":
        prefix = str(prefix)
        if not os.path.isfile(prefix + ".npy"):
            raise FileNotFoundError(f"key map {prefix}.npy not found: build it with `python src/build_index.py`")
        mode = "r" if mmap else None
        return cls(*(np.load(prefix + s, mmap_mode=mode) for s in (".npy", ".sorted.npy", ".order.npy")))

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, row: int) -> str:
        return bytes(self.keys[row]).decode("utf-8")

    def row(self, key: str) -> int:
        """The row of `key`, or -1 when absent."""
        kb = key.encode("utf-8")
        i = int(np.searchsorted(self.sorted_keys, kb))
        if i < len(self.sorted_keys) and bytes(self.sorted_keys[i]) == kb:
            return int(self.order[i])
        return -1

    def rows(self, keys: list[str]) -> np.ndarray:
        return np.array([self.row(k) for k in keys], dtype=np.int64)
