"""Memory-bank search on CPU: approximate FAISS indexes against exact search, plus token-store lookups.

    from cm3leon.bench.retrieval import bench_retrieval
    bench_retrieval()   # {'bank': {...}, 'clustered': {'exact': {...}, 'ivf': {...}}, 'token_store': {...}, 'goal_met': {...}}

The synthetic bank stands in for CLIP document vectors: 200,000 x 512 float32 unit vectors drawn
from a mixture of 2,000 Gaussian clusters (CLIP embeddings are clustered; uniformly random
512-d vectors have no near neighbours and are the worst case of every approximate index).
Queries are fresh draws from the same mixture, not bank members. For each approximate index the
smallest search effort (nprobe / efSearch) that reaches recall@10 >= 0.95 against exact search is
reported with its queries/s; `goal_met` says whether that is also >= 10x the exact queries/s.
Index builds use `build_index` (the project's code path); timings are wall-clock on the threads given.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from cm3leon.retrieval.index import IndexConfig, build_index, set_search_params

RECALL_GOAL = 0.95
SPEEDUP_GOAL = 10.0


def synthetic_bank(n: int, dim: int, n_queries: int, clusters: int = 2000, spread: float = 0.6, seed: int = 0):
    """Unit vectors from a Gaussian mixture (clusters=0: isotropic, no structure):
    (bank float32 [n, dim], queries float32 [n_queries, dim])."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(clusters, 1), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        x = rng.standard_normal((m, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        if clusters:
            x += centres[rng.integers(clusters, size=m)]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(n), draw(n_queries)


def _qps(index: faiss.Index, queries: np.ndarray, k: int, repeats: int = 2) -> tuple[float, np.ndarray]:
    """Best-of-`repeats` queries/s of one batched search, and its ids."""
    best, ids = 0.0, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        best = max(best, len(queries) / (time.perf_counter() - t0))
    return best, ids


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


def _sweep(index, queries, truth, k, exact_qps, param: str, values) -> dict:
    """Search effort sweep; the answer is the cheapest setting that reaches the recall goal."""
    rows = []
    for v in values:
        set_search_params(index, **{param: v})
        qps, ids = _qps(index, queries, k)
        rows.append(
            {
                param: v,
                "qps": round(qps, 1),
                "recall_at_10": round(_recall(ids, truth), 4),
                "speedup": round(qps / exact_qps, 1),
            }
        )
        if rows[-1]["recall_at_10"] >= RECALL_GOAL:
            break
    best = next((r for r in rows if r["recall_at_10"] >= RECALL_GOAL), rows[-1])
    return {**best, "goal_met": best["recall_at_10"] >= RECALL_GOAL and best["speedup"] >= SPEEDUP_GOAL, "sweep": rows}


def _bench_store(n: int = 20_000, lookups: int = 20_000) -> dict:
    """Random-row lookups/s of a TokenStore with world-sized documents (25 text ids, 64 codes)."""
    from cm3leon.retrieval.index import KeyMap
    from cm3leon.retrieval.token_store import TokenStore

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        text = rng.integers(0, 1000, size=n * 25, dtype=np.uint16)
        text.tofile(d / "text.bin")
        rng.integers(0, 1024, size=(n, 64), dtype=np.uint16).tofile(d / "codes.bin")
        np.save(d / "offsets.npy", np.arange(0, n * 25 + 1, 25, dtype=np.int64))
        KeyMap.write(d / "keys", [f"k{i:09d}" for i in range(n)])
        (d / "store.json").write_text(f'{{"n": {n}, "tokens_per_image": 64, "text_tokens": {n * 25}}}')
        store = TokenStore(d)
        rows = rng.integers(0, n, size=lookups)
        store.document(0)
        t0 = time.perf_counter()
        for r in rows:
            store.document(int(r))
        by_row = lookups / (time.perf_counter() - t0)
        keys = [f"k{int(r):09d}" for r in rows[: lookups // 4]]
        t0 = time.perf_counter()
        for key in keys:
            store.get(key)
        by_key = len(keys) / (time.perf_counter() - t0)
    return {"docs": n, "lookups_per_s_by_row": round(by_row), "lookups_per_s_by_key": round(by_key)}


def _bench_bank(bank: np.ndarray, queries: np.ndarray, k: int, hnsw: bool, folder: Path) -> dict:
    exact, st = build_index(bank, IndexConfig(kind="flat", gpu=False), folder / "flat.faiss")
    exact_qps, truth = _qps(exact, queries, k)
    out = {"exact": {"build_s": st["seconds"], "qps": round(exact_qps, 1)}}
    del exact
    nlist = 1024
    ivf, st = build_index(
        bank, IndexConfig(kind="ivf", nlist=nlist, train_size=40 * nlist, gpu=False), folder / "ivf.faiss"
    )
    out["ivf"] = {
        "factory": st["factory"],
        "build_s": st["seconds"],
        "train_s": st["train_seconds"],
        **_sweep(ivf, queries, truth, k, exact_qps, "nprobe", (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    }
    del ivf
    if hnsw:
        index, st = build_index(
            bank, IndexConfig(kind="hnsw", hnsw_m=16, ef_construction=40, gpu=False), folder / "hnsw.faiss"
        )
        out["hnsw"] = {
            "factory": st["factory"],
            "build_s": st["seconds"],
            **_sweep(index, queries, truth, k, exact_qps, "ef_search", (16, 32, 64, 128, 256, 512)),
        }
    return out


def bench_retrieval(
    n: int = 200_000,
    dim: int = 512,
    n_queries: int = 1000,
    k: int = 10,
    threads: int = 2,
    datasets: tuple[str, ...] = ("clustered",),
    hnsw: bool = False,
) -> dict:
    """Build time, queries/s and recall@10 of IVF (and HNSW) vs exact search on synthetic CPU banks.

    datasets: "clustered" (the Gaussian mixture above) and/or "uniform" (isotropic random unit
    vectors: no structure, the worst case). hnsw: also HNSW16 (its build takes minutes on 2 cores).
    """
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    out: dict = {"bank": {"n": n, "dim": dim, "dtype": "float32", "queries": n_queries, "k": k, "threads": threads}}
    with tempfile.TemporaryDirectory() as d:
        for name in datasets:
            if name == "clustered":
                bank, queries = synthetic_bank(n, dim, n_queries)
            elif name == "uniform":
                bank, queries = synthetic_bank(n, dim, n_queries, clusters=0)
            else:
                raise ValueError(f"unknown bench data set {name!r}: clustered | uniform")
            out[name] = _bench_bank(bank, queries, k, hnsw, Path(d))
            del bank
    out["token_store"] = _bench_store()
    out["goal"] = f"recall@10 >= {RECALL_GOAL} at >= {SPEEDUP_GOAL}x exact queries/s"
    out["goal_met"] = {name: any(v.get("goal_met") for v in out[name].values()) for name in datasets}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
