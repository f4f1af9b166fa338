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
GPUs (`IndexConfig.gpu`: auto/true | require | false): with faiss' GPU build
(`pip install -r requirements-gpu.txt`) and a visible GPU, flat/IVF/IVF-PQ indexes are trained,
filled and searched on the GPU (`faiss.index_cpu_to_all_gpus`), `build_index` returns the GPU index
and writes a CPU copy (`index_gpu_to_cpu`), so the file is portable; `load_index` puts a loaded
index on the GPUs again (not HNSW, which faiss runs on the CPU only, nor a merged on-disk index,
whose lists stay memory-mapped). faiss-cpu, no visible GPU, or an index type the GPU code refuses:
the CPU, with the reason in the build stats (`gpu_note`); `gpu: require` fails instead.

Ids: the index holds rows 0..N-1 of the bank in order; `KeyMap` (saved beside the index) maps
rows <-> sample keys (sorted copy + binary search, memory-mapped, no Python dict of N strings).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from cm3leon.utils import atomic_path

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
GPU_MODES = ("auto", "require", "false")  # and the booleans: true = auto, false = off
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
    gpu: bool | str = True  # true/auto: faiss' GPUs when present (flat/IVF/IVF-PQ); require; false
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind={self.kind!r} is not one of {KINDS}")
        gpu_mode(self.gpu)  # a bad value: one line now


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


def gpu_mode(gpu: bool | str | None) -> str:
    """`IndexConfig.gpu` as one of auto | require | false (true and null are auto)."""
    if gpu is None or isinstance(gpu, bool):
        return "false" if gpu is False else "auto"
    mode = str(gpu).strip().lower()
    mode = {"true": "auto", "off": "false", "no": "false"}.get(mode, mode)
    if mode not in GPU_MODES:
        raise ValueError(f"index gpu={gpu!r} is not one of auto | true | require | false")
    return mode


def faiss_gpus() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (its get_num_gpus is 0) or when none is visible."""
    try:
        return int(faiss.get_num_gpus())
    except (AttributeError, RuntimeError):
        return 0


def gpu_plan(gpu: bool | str, kind: str) -> tuple[bool, str | None]:
    """(run this index kind on faiss' GPUs?, why not, when GPUs are there but not used)."""
    mode = gpu_mode(gpu)
    if mode == "false":
        return False, None
    n = faiss_gpus()
    if kind == "hnsw":
        if mode == "require":
            raise ValueError("index gpu=require: faiss has no GPU HNSW; use kind=ivf/ivfpq/flat or gpu=auto")
        return False, ("HNSW is CPU-only in faiss: built and searched on the CPU" if n else None)
    if n == 0:
        if mode == "require":
            raise RuntimeError(
                "index gpu=require but faiss sees no GPU (faiss-cpu installed, or no visible device): "
                "pip install -r requirements-gpu.txt on a CUDA 12 machine, or gpu=auto"
            )
        return False, None
    return True, None


def to_gpu(
    index: faiss.Index, kind: str, all_gpus: bool = True, required: bool = False
) -> tuple[faiss.Index, str | None]:
    """(the index on faiss' GPUs, None), or (the CPU index unchanged, why) when the GPU code refuses it.

    all_gpus: replicas on every GPU (searching); False: the first GPU only (building).
    IVF-PQ gets float16 lookup tables (needed by the GPU code for many sub-quantizers)."""
    co = None
    if kind == "ivfpq" and hasattr(faiss, "GpuMultipleClonerOptions"):
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True
    try:
        return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=-1 if all_gpus else 1), None
    except (RuntimeError, AttributeError, TypeError) as e:  # e.g. a PQ size the GPU code does not support
        if required:
            raise
        note = f"faiss could not put this {kind} index on the GPU ({str(e).splitlines()[0][:160]}): CPU"
        log.warning(note)
        return index, note


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (what is written to disk)."""
    return faiss.index_gpu_to_cpu(index)


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
    """nprobe (IVF) / efSearch (HNSW) on a CPU or GPU index (GPU replicas included)."""
    if nprobe is not None:
        try:
            faiss.extract_index_ivf(index).nprobe = nprobe
        except RuntimeError:  # not an IVF index (flat, HNSW), or a GPU IVF index
            if not _set_gpu_parameter(index, "nprobe", nprobe) and hasattr(index, "nprobe"):
                index.nprobe = nprobe
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search


def _set_gpu_parameter(index: faiss.Index, name: str, value) -> bool:
    """Set a search parameter through faiss' GpuParameterSpace (GPU indexes and their replicas)."""
    if not hasattr(faiss, "GpuParameterSpace") or not _is_gpu_index(index):
        return False
    try:
        faiss.GpuParameterSpace().set_index_parameter(index, name, value)
        return True
    except RuntimeError:
        return False


def _is_gpu_index(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu") or isinstance(
        index, tuple(getattr(faiss, c) for c in ("IndexReplicas", "IndexShards") if hasattr(faiss, c))
    )


def index_kind(index: faiss.Index) -> str:
    """flat | ivf | ivfpq | hnsw of a loaded index (what `gpu_plan` needs)."""
    if hasattr(index, "hnsw"):
        return "hnsw"
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return "flat"
    return "ivfpq" if isinstance(ivf, faiss.IndexIVFPQ) else "ivf"


def build_index(vectors: np.ndarray, cfg: IndexConfig, path: str | Path) -> tuple[faiss.Index, dict]:
    """Index unit vectors [N, D] (float16/32, may be a memmap) and write it to `path`.

    Returns (the index, ready to search; stats {kind, factory, n, dim, gpu, gpu_note, seconds, ...}).
    Rows keep their order: search results are row numbers of `vectors`. Built on the GPU (see the
    module doc), the index returned stays there (for the searches that follow); the file is a CPU copy.
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
    gpu, note = gpu_plan(cfg.gpu, kind)
    if gpu:  # one GPU builds (replicas would each train and fill their own copy)
        index, note = to_gpu(index, kind, all_gpus=False, required=gpu_mode(cfg.gpu) == "require")
        gpu = note is None
    if kind in ("ivf", "ivfpq"):
        index.train(_train_sample(vectors, cfg))
    t_train = time.time() - t0
    sharded = kind in ("ivf", "ivfpq") and n > cfg.shard_rows
    if sharded:
        index = _build_sharded(vectors, index, gpu, cfg, path, kind)
        if gpu:
            note = "merged on-disk index: shards filled on the GPU, searched on the CPU (memory-mapped lists)"
    else:
        for _, chunk in _chunks(vectors, cfg.add_batch):
            index.add(chunk)
        cpu_index = to_cpu(index) if gpu else index
        set_search_params(cpu_index, cfg.nprobe, cfg.ef_search)  # saved with the index
        with atomic_path(path) as tmp:
            faiss.write_index(cpu_index, str(tmp))
        if gpu:
            set_search_params(index, cfg.nprobe, cfg.ef_search)
    stats = {
        "kind": kind,
        "factory": factory,
        "n": int(n),
        "dim": int(d),
        "gpu": gpu,
        "gpu_note": note,
        "shards": math.ceil(n / cfg.shard_rows) if sharded else 1,
        "train_seconds": round(t_train, 3),
        "seconds": round(time.time() - t0, 3),
        "config": asdict(cfg),
    }
    return index, stats


def _build_sharded(
    vectors: np.ndarray, trained: faiss.Index, gpu: bool, cfg: IndexConfig, path: Path, kind: str
) -> faiss.Index:
    """IVF in shards of `shard_rows`: each shard gets a copy of the trained empty index, is filled
    and written; the shards' inverted lists are merged into `path` + `path.ivfdata` on disk."""
    from faiss.contrib.ondisk import merge_ondisk

    if gpu:
        trained = to_cpu(trained)
    empty = faiss.serialize_index(trained)
    shard_files = []
    for j, s in enumerate(range(0, len(vectors), cfg.shard_rows)):
        shard = faiss.deserialize_index(empty)
        if gpu:  # filled on the GPU (assigning rows to cells is the cost), written from a CPU copy
            shard, _ = to_gpu(shard, kind, all_gpus=False)
        part = vectors[s : s + cfg.shard_rows]
        for off, chunk in _chunks(part, cfg.add_batch):
            shard.add_with_ids(chunk, np.arange(s + off, s + off + len(chunk), dtype=np.int64))
        if gpu and _is_gpu_index(shard):
            shard = to_cpu(shard)
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
    path: str | Path,
    nprobe: int | None = None,
    ef_search: int | None = None,
    mmap: bool = True,
    gpu: bool | str = True,
) -> faiss.Index:
    """Read an index written by `build_index` (memory-mapped by default); one clear line when missing.

    gpu (as `IndexConfig.gpu`): on a machine where faiss sees GPUs, a flat/IVF/IVF-PQ index is
    copied to all of them (replicas) and searched there; HNSW and merged on-disk indexes stay on
    the CPU."""
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
    kind = index_kind(index)
    use, note = gpu_plan(gpu, kind)
    if use and on_disk:
        use, note = False, "merged on-disk index: searched on the CPU (memory-mapped lists)"
    if use:
        index, note = to_gpu(index, kind, all_gpus=True, required=gpu_mode(gpu) == "require")
    if note:
        log.info("load_index %s: %s", path, note)
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
