"""Memory-bank search: approximate FAISS indexes against exact search, the CLIP encoder's
embeddings/s, index build times, plus token-store lookups.

    from cm3leon.bench.retrieval import bench_retrieval
    bench_retrieval()   # {'bank': ..., 'bank_stats': ..., 'clip_like': {'exact': ..., 'ivf': ...},
                        #  'encoder': ..., 'token_store': ..., 'goal_met': ...}

Three synthetic banks of unit vectors (float32, 512-d by default); queries are never bank members:
- `clip_like` (the default, `clip_like_bank`): modelled on CLIP document vectors: a cone around a
  common mean direction, a power-law covariance spectrum (effective rank ~30 of 512), many small
  overlapping topics and sub-topics of heavy-tailed sizes and spreads, and each document the
  normalised mean of an image view and a text view on either side of a modality gap; queries are
  single image or text views (as the retrieval's image and text queries). See `ClipLike`.
- `clustered` (`synthetic_bank`): a mixture of 2,000 well-separated isotropic Gaussian clusters:
  IVF finds every neighbour in the first cell it scans (too easy).
- `uniform`: isotropic random unit vectors, no structure (no index can exploit it: the worst case).
`bank_stats` says where each sits: cosine to the bank's mean direction, participation ratio of the
covariance, 10th-neighbour distance over the median pairwise distance, its spread, local intrinsic
dimensionality (`bank_stats` in the output, on `stats_n` rows of each bank).

For each bank searched (`datasets`), the smallest search effort (nprobe / efSearch) that reaches
recall@10 >= 0.95 against exact search is reported with its queries/s (the operating point);
`goal_met` says whether that is also >= 10x the exact queries/s. Index builds use `build_index`
(the project's code path: faiss' GPU build when installed and a GPU is visible, else the CPU);
timings are wall-clock on the threads given. `encoder`: documents/s of the CLIP encoder (`bench_encoder`).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from cm3leon.retrieval.index import IndexConfig, build_index, default_nlist, faiss_gpus, set_search_params

RECALL_GOAL = 0.95
SPEEDUP_GOAL = 10.0
BANKS = ("clustered", "clip_like", "uniform")


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


@dataclass(frozen=True)
class ClipLike:
    """The generative model of `clip_like_bank` (variances are shares of the non-mean part).

    A fixed "world" of `topics` topic centres and `subtopics` sub-topic centres per topic is drawn
    once (so a bank of any size is iid draws from one distribution); a document picks a sub-topic
    (sizes log-normal at both levels: heavy-tailed), adds point noise scaled by its topic's spread
    (log-normal: dense and loose topics), and is seen as an image and a text view.
    """

    topics: int = 2000
    subtopics: int = 8
    alpha: float = 1.0  # covariance spectrum of the semantic directions: variance of the j-th ~ j^-alpha
    semantic_rank: int = 128  # point and view noise live in the leading directions of that spectrum
    cone: float = 1.1  # the common mean direction's length (mean cosine to the bank mean ~0.7)
    topic_var: float = 0.4  # topic centres around the mean (all semantic directions)
    subtopic_var: float = 0.3  # sub-topic centres around their topic (times the topic's spread)
    point_var: float = 0.2  # a document around its sub-topic (times the topic's spread)
    view_var: float = 0.15  # each view's own noise (caption vs image content)
    iso_var: float = 0.08  # isotropic floor, all dimensions (what the semantic subspace misses)
    gap: float = 0.4  # modality gap: image views +gap, text views -gap along one direction
    size_sigma: float = 1.0  # log-normal sigma of topic and sub-topic sizes
    spread_sigma: float = 0.35  # log-normal sigma of a topic's spread


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12)[:, None]


def clip_like_bank(
    n: int, dim: int, n_queries: int, spec: ClipLike = ClipLike(), seed: int = 0, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors shaped like CLIP document vectors: (bank float32 [n, dim], queries float32
    [n_queries, dim]). Bank rows are documents, normalize(normalize(image) + normalize(text)) as
    `document_vectors`; queries are single views (even rows image, odd rows text) of other documents.

    Coordinates before a random rotation: axis 0 the common mean direction (`cone`), axis 1 the
    modality gap, axes 2.. the semantic directions with variances ~ j^-alpha."""
    if dim < 4:
        raise ValueError(f"clip_like_bank: dim={dim} < 4")
    world = np.random.default_rng([seed, 0])
    sem = dim - 2
    r = min(spec.semantic_rank, sem)
    spectrum = np.arange(1, sem + 1, dtype=np.float64) ** -spec.alpha
    sd = np.sqrt(spectrum / spectrum.sum()).astype(np.float32)  # all semantic directions: variance 1
    sd_r = sd[:r] / np.sqrt(np.sum(sd[:r] ** 2))  # the leading r: variance 1
    n_sub = spec.topics * spec.subtopics
    of_topic = np.repeat(np.arange(spec.topics), spec.subtopics)
    spread = np.exp(world.normal(0, spec.spread_sigma, spec.topics)).astype(np.float32)
    topic = world.standard_normal((spec.topics, sem), dtype=np.float32) * sd * np.float32(math.sqrt(spec.topic_var))
    sub = topic[of_topic] + world.standard_normal((n_sub, sem), dtype=np.float32) * sd * (
        np.float32(math.sqrt(spec.subtopic_var)) * spread[of_topic, None]
    )
    weight = np.exp(world.normal(0, spec.size_sigma, spec.topics))[of_topic]
    weight *= np.exp(world.normal(0, spec.size_sigma, n_sub))
    p = weight / weight.sum()
    rotation = np.linalg.qr(world.standard_normal((dim, dim)))[0].astype(np.float32)

    def draw(m: int, rng: np.random.Generator, queries: bool) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, chunk):
            c = min(chunk, m - s)
            which = rng.choice(n_sub, size=c, p=p)
            x = rng.standard_normal((c, dim), dtype=np.float32) * np.float32(math.sqrt(spec.iso_var / dim))
            x[:, 0] += spec.cone
            x[:, 2:] += sub[which]
            x[:, 2 : 2 + r] += (
                rng.standard_normal((c, r), dtype=np.float32)
                * sd_r
                * (np.float32(math.sqrt(spec.point_var)) * spread[of_topic[which], None])
            )
            view_sd = sd_r * np.float32(math.sqrt(spec.view_var))
            image = x.copy()
            image[:, 1] += spec.gap
            image[:, 2 : 2 + r] += rng.standard_normal((c, r), dtype=np.float32) * view_sd
            text = x
            text[:, 1] -= spec.gap
            text[:, 2 : 2 + r] += rng.standard_normal((c, r), dtype=np.float32) * view_sd
            image, text = _unit_rows(image), _unit_rows(text)
            if queries:
                v = np.where((np.arange(s, s + c) % 2 == 0)[:, None], image, text)
            else:
                v = _unit_rows(image + text)
            out[s : s + c] = v @ rotation
        return out

    queries = draw(n_queries, np.random.default_rng([seed, 1]), queries=True)  # the same for every n
    return draw(n, np.random.default_rng([seed, 2]), queries=False), queries


def make_bank(name: str, n: int, dim: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One of `BANKS`: (bank, queries)."""
    if name == "clip_like":
        return clip_like_bank(n, dim, n_queries, seed=seed)
    if name == "clustered":
        return synthetic_bank(n, dim, n_queries, seed=seed)
    if name == "uniform":
        return synthetic_bank(n, dim, n_queries, clusters=0, seed=seed)
    raise ValueError(f"unknown bench data set {name!r}: {' | '.join(BANKS)}")


def bank_stats(bank: np.ndarray, sample: int = 500, k: int = 10, lid_k: int = 20, seed: int = 0) -> dict:
    """How a bank of unit vectors is shaped (what makes search on it easy or hard):

    mean_cos_to_mean: mean cosine of a vector to the bank's mean direction (0: centred; CLIP: a cone);
    mean_pair_cos: mean cosine of random pairs;
    participation_ratio: (sum l)^2 / sum l^2 over the covariance eigenvalues l (the effective
      number of dimensions; dim for isotropic vectors); dims_90: directions holding 90% of the variance;
    nn10_over_median_pair: median distance to the 10th neighbour over the median pairwise distance
      (~1: neighbours are no nearer than anything else; small: tight, separated groups);
    nn10_spread: 90th over 10th percentile of that 10th-neighbour distance (local density varies);
    lid: median local intrinsic dimensionality (maximum likelihood over the `lid_k` nearest).
    Neighbours of `sample` bank rows (themselves excluded), covariance of <= 20,000 rows."""
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(bank, dtype=np.float32)
    n = len(x)
    mean = x.mean(0, dtype=np.float64)
    mean_cos = float(np.mean(x @ (mean / np.linalg.norm(mean)).astype(np.float32)))
    rows = rng.choice(n, min(n, 20_000), replace=False)
    eig = np.clip(np.linalg.eigvalsh(np.cov(x[rows].T.astype(np.float64))), 0, None)[::-1]
    a, b = rng.integers(n, size=(2, 20_000))
    pair_cos = np.einsum("ij,ij->i", x[a], x[b])[a != b]
    q = rng.choice(n, min(sample, n), replace=False)
    kk = min(max(k, lid_k) + 1, n)
    sims, _ = faiss.knn(x[q], x, kk, metric=faiss.METRIC_INNER_PRODUCT)
    dist = np.sqrt(np.clip(2 - 2 * sims[:, 1:], 1e-12, None))  # column 0: the row itself
    d10 = dist[:, k - 1]
    lid = -1.0 / np.mean(np.log(dist / dist[:, -1:]), axis=1)
    return {
        "mean_cos_to_mean": round(mean_cos, 3),
        "mean_pair_cos": round(float(pair_cos.mean()), 3),
        "participation_ratio": round(float(eig.sum() ** 2 / np.sum(eig**2)), 1),
        "dims_90": int(np.searchsorted(np.cumsum(eig) / eig.sum(), 0.9) + 1),
        "nn10_over_median_pair": round(
            float(np.median(d10) / np.median(np.sqrt(np.clip(2 - 2 * pair_cos, 0, None)))), 3
        ),
        "nn10_spread": round(float(np.percentile(d10, 90) / np.percentile(d10, 10)), 2),
        "lid": round(float(np.median(lid)), 1),
    }


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


def _bench_bank(
    bank: np.ndarray, queries: np.ndarray, k: int, hnsw: bool, folder: Path, gpu, nlist: int | None = None
) -> dict:
    n = len(bank)
    exact, st = build_index(bank, IndexConfig(kind="flat", gpu=gpu), folder / "flat.faiss")
    exact_qps, truth = _qps(exact, queries, k)
    out = {"exact": {"build_s": st["seconds"], "gpu": st["gpu"], "qps": round(exact_qps, 1)}}
    del exact
    nlist = nlist or min(1024, default_nlist(n))
    ivf, st = build_index(
        bank, IndexConfig(kind="ivf", nlist=nlist, train_size=40 * nlist, gpu=gpu), folder / "ivf.faiss"
    )
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist]
    out["ivf"] = {
        "factory": st["factory"],
        "gpu": st["gpu"],
        "build_s": st["seconds"],
        "train_s": st["train_seconds"],
        "vectors_per_s": round(n / max(st["seconds"], 1e-9)),
        **_sweep(ivf, queries, truth, k, exact_qps, "nprobe", probes),
    }
    del ivf
    if hnsw:
        index, st = build_index(
            bank, IndexConfig(kind="hnsw", hnsw_m=16, ef_construction=40, gpu=gpu), folder / "hnsw.faiss"
        )
        out["hnsw"] = {
            "factory": st["factory"],
            "gpu": st["gpu"],
            "gpu_note": st["gpu_note"],
            "build_s": st["seconds"],
            "vectors_per_s": round(n / max(st["seconds"], 1e-9)),
            **_sweep(index, queries, truth, k, exact_qps, "ef_search", (16, 32, 64, 128, 256, 512)),
        }
    return out


WORLD_CAPTION = "a {} {} {} on a {} background"


def bench_encoder(
    device: str | None = None,
    batch_size: int | None = None,
    batches: int | None = None,
    items: int | None = None,
    clip_weights: str | Path | None = None,
) -> dict:
    """Embeddings/s of the CLIP encoder: fp16 on CUDA, fp32 on the CPU (`DocumentEncoder`'s defaults).

    tiny_clip: the project's `DocumentEncoder` end to end (tokenizer, PIL preprocessing, transfer,
      forward, normalisation) with the shipped world CLIP (64 px images, world captions);
    vit_b_32: the paper retriever's architecture, open_clip ViT-B-32 with random weights (speed
      only), model forward on inputs already on the device: the ceiling of a real bank's embedding.
    batch_size: ViT-B-32 items per forward (default the encoder's: 1024 on CUDA, 4 here on the CPU,
    where one batch takes seconds); batches: timed batches (default 5 on CUDA after a warm-up, 1 on the CPU).
    items: captions and images through the tiny CLIP (default 4 batches on CUDA, 512 on the CPU).
    """
    import open_clip
    import torch

    from cm3leon.retrieval.clip_encoder import GPU_BATCH, SHIPPED_WORLD_CLIP, DocumentEncoder
    from cm3leon.retrieval.tiny_clip import TINY_CLIP

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    precision = "fp16" if cuda else "fp32"
    out: dict = {"device": device, "precision": precision}

    def rate(fn, items: int, reps: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return round(items * reps / (time.perf_counter() - t0), 1)

    checkout = Path(__file__).resolve().parents[3]
    weights = next(
        (w for w in (clip_weights, SHIPPED_WORLD_CLIP, checkout / SHIPPED_WORLD_CLIP) if w and Path(w).is_file()), None
    )
    if weights is None:
        out["tiny_clip"] = {"skipped": f"no {SHIPPED_WORLD_CLIP} (python src/train_clip.py)"}
    else:
        enc = DocumentEncoder(TINY_CLIP, str(weights), device=device)
        rng = np.random.default_rng(0)
        m = items or (4 * enc.batch_size if cuda else 512)
        words = (("small", "large"), ("red", "green", "blue"), ("circle", "square"), ("white", "gray"))
        captions = [WORLD_CAPTION.format(*(w[(i >> j) % len(w)] for j, w in enumerate(words))) for i in range(m)]
        size = enc.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        images = list(rng.integers(0, 256, size=(m, size, size, 3), dtype=np.uint8))
        enc.encode_texts(captions[: enc.batch_size])  # warm-up (CUDA context, kernels)
        enc.encode_images(images[: enc.batch_size])
        texts_s = rate(lambda: enc.encode_texts(captions), m, 1)
        images_s = rate(lambda: enc.encode_images(images), m, 1)
        out["tiny_clip"] = {
            "batch": enc.batch_size,
            "texts_per_s": texts_s,
            "images_per_s": images_s,
            "documents_per_s": round(1 / (1 / texts_s + 1 / images_s), 1),
        }
        del enc
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that the weights are random: they are
    try:
        model = open_clip.create_model("ViT-B-32", pretrained=None, precision=precision, device=device).eval()
    finally:
        logging.getLogger().setLevel(level)
    b = batch_size or (GPU_BATCH if cuda else 4)
    reps = batches or (5 if cuda else 1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(b, 3, 224, 224, generator=gen).to(device, open_clip.get_input_dtype(precision))
    tokens = torch.randint(1, 49406, (b, 77), generator=gen).to(device)
    with torch.inference_mode():
        if cuda:
            model.encode_image(pixels)
            model.encode_text(tokens)
        out["vit_b_32"] = {
            "batch": b,
            "batches": reps,
            "weights": "random (speed only)",
            "images_per_s": rate(lambda: model.encode_image(pixels), b, reps),
            "texts_per_s": rate(lambda: model.encode_text(tokens), b, reps),
        }
    if cuda:
        out["vit_b_32"]["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _guarded(fn) -> dict:
    try:
        return fn()
    except Exception as e:  # the encoder's numbers must not cost the index numbers
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}


def bench_retrieval(
    device: str | None = None,
    n: int = 200_000,
    dim: int = 512,
    n_queries: int = 500,
    k: int = 10,
    threads: int = 2,
    datasets: tuple[str, ...] = ("clip_like",),
    hnsw: bool = False,
    gpu: bool | str = "auto",
    stats_n: int = 50_000,
    encoder: bool = True,
    nlist: int | None = None,
) -> dict:
    """Build time, queries/s and recall@10 of IVF (and HNSW) vs exact search on synthetic banks,
    the banks' shape statistics, and the CLIP encoder's embeddings/s.

    datasets: banks searched, any of `BANKS` (default the CLIP-like one; "clustered" and "uniform"
    are the easy and the impossible extremes). hnsw: also HNSW16 (its build takes minutes on 2
    cores). gpu: faiss' GPUs for the index builds and searches (`IndexConfig.gpu`). stats_n: rows of
    each bank `bank_stats` measures (all three banks, whatever `datasets` says). device: the
    encoder's (default cuda when available). nlist: IVF cells (default `default_nlist(n)`, at most
    1024: 1024 at the default 200,000). Larger banks: e.g. n=1_000_000, nlist=4096 (minutes).
    """
    import torch

    faiss.omp_set_num_threads(threads)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out: dict = {
        "bank": {
            "n": n,
            "dim": dim,
            "dtype": "float32",
            "queries": n_queries,
            "k": k,
            "threads": threads,
            "faiss_gpus": faiss_gpus(),
            "index_gpu": gpu,
        }
    }
    m = min(n, stats_n)
    out["bank_stats"] = {"n": m} | {name: bank_stats(make_bank(name, m, dim, 0)[0]) for name in BANKS}
    out["bank_stats"]["clip_like_model"] = asdict(ClipLike())
    try:
        with tempfile.TemporaryDirectory() as d:
            for name in datasets:
                t1 = time.perf_counter()
                bank, queries = make_bank(name, n, dim, n_queries)
                gen_s = round(time.perf_counter() - t1, 1)
                out[name] = {"generate_s": gen_s, **_bench_bank(bank, queries, k, hnsw, Path(d), gpu, nlist)}
                del bank
        if encoder:
            out["encoder"] = _guarded(lambda: bench_encoder(device))
    finally:
        torch.set_num_threads(torch_threads)
    out["token_store"] = _bench_store()
    out["goal"] = f"recall@10 >= {RECALL_GOAL} at >= {SPEEDUP_GOAL}x exact queries/s"
    out["goal_met"] = {
        name: any(isinstance(v, dict) and v.get("goal_met") for v in out[name].values()) for name in datasets
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
