"""GPU retrieval (issue 16): faiss' GPU dispatch exercised on the CPU with a fake GPU, the CLIP-like
bank of the retrieval benchmark (its shape lies between the clustered and the isotropic bank), the
benchmark's new fields, and the encoder's fp16 path."""

import faiss
import numpy as np
import pytest

from cm3leon.bench import retrieval as bench
from cm3leon.retrieval.index import IndexConfig, build_index, default_nlist, gpu_mode, gpu_plan, load_index


@pytest.fixture
def fake_gpu(monkeypatch):
    """faiss reports one GPU; "moving" an index there returns it unchanged. Returns the calls."""
    calls = []

    def to_gpus(index, co=None, ngpu=-1):
        calls.append(("to_gpu", ngpu))
        return index

    def to_cpu(index):
        calls.append(("to_cpu",))
        return index

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", to_cpu, raising=False)  # absent from faiss-cpu
    return calls


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_gpu_build_trains_fills_on_one_gpu_and_writes_a_cpu_copy(fake_gpu, small, tmp_path, kind):
    cfg = IndexConfig(kind=kind, nlist=16, nprobe=16, pq_m=8)
    index, stats = build_index(small, cfg, tmp_path / "g.faiss")
    assert stats["gpu"] is True and stats["gpu_note"] is None
    assert fake_gpu == [("to_gpu", 1), ("to_cpu",)]  # built on the first GPU, written from a CPU copy
    fake_gpu.clear()
    loaded = load_index(tmp_path / "g.faiss", nprobe=16)
    assert fake_gpu == [("to_gpu", -1)]  # searched on every GPU
    np.testing.assert_array_equal(loaded.search(small[:20], 5)[1], index.search(small[:20], 5)[1])


def test_gpu_sharded_build_fills_each_shard_on_the_gpu(fake_gpu, small, tmp_path):
    cfg = IndexConfig(kind="ivf", nlist=16, nprobe=4, shard_rows=800)
    _, stats = build_index(small, cfg, tmp_path / "s.faiss")
    assert stats["shards"] == 3 and stats["gpu"] and "on-disk" in stats["gpu_note"]
    assert fake_gpu.count(("to_gpu", 1)) == 4  # training + 3 shards
    fake_gpu.clear()
    load_index(tmp_path / "s.faiss", nprobe=4)
    assert fake_gpu == []  # merged on-disk lists stay memory-mapped on the CPU


def test_gpu_fallbacks_hnsw_off_and_refused(fake_gpu, small, tmp_path, monkeypatch):
    _, stats = build_index(small, IndexConfig(kind="hnsw"), tmp_path / "h.faiss")
    assert stats["gpu"] is False and "CPU-only" in stats["gpu_note"] and fake_gpu == []
    load_index(tmp_path / "h.faiss")
    assert fake_gpu == []
    _, stats = build_index(small, IndexConfig(kind="flat", gpu=False), tmp_path / "f.faiss")
    assert stats["gpu"] is False and fake_gpu == []
    load_index(tmp_path / "f.faiss", gpu="false")
    assert fake_gpu == []

    def refuse(index, co=None, ngpu=-1):
        raise RuntimeError("Error in GpuCloner: not implemented for this type of index\nmore")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", refuse)
    index, stats = build_index(small, IndexConfig(kind="ivf", nlist=16), tmp_path / "r.faiss")
    assert stats["gpu"] is False and "could not put" in stats["gpu_note"] and "\n" not in stats["gpu_note"]
    assert index.ntotal == len(small)  # built on the CPU instead
    with pytest.raises(RuntimeError, match="not implemented"):
        build_index(small, IndexConfig(kind="ivf", nlist=16, gpu="require"), tmp_path / "r2.faiss")


def test_gpu_modes_without_a_gpu(small, tmp_path):
    assert faiss.get_num_gpus() == 0  # faiss-cpu here (the GPU test machine too)
    assert [gpu_mode(g) for g in (True, None, "auto", "TRUE", False, "false", "require")] == [
        "auto",
        "auto",
        "auto",
        "auto",
        "false",
        "false",
        "require",
    ]
    assert gpu_plan("auto", "ivf") == (False, None) and gpu_plan(True, "hnsw") == (False, None)
    _, stats = build_index(small, IndexConfig(kind="flat"), tmp_path / "c.faiss")
    assert stats["gpu"] is False and stats["gpu_note"] is None
    with pytest.raises(RuntimeError, match="requirements-gpu.txt"):
        build_index(small, IndexConfig(kind="flat", gpu="require"), tmp_path / "x.faiss")
    with pytest.raises(ValueError, match="no GPU HNSW"):
        gpu_plan("require", "hnsw")
    with pytest.raises(ValueError, match="index gpu"):
        IndexConfig(gpu="cuda")


# ---- the CLIP-like bank ----------------------------------------------------------------------
N, DIM = 20_000, 64
SPEC = bench.ClipLike(topics=200)  # the default world (2,000 topics) is sized for 200,000 documents


@pytest.fixture(scope="module")
def banks():
    return {
        "clustered": bench.synthetic_bank(N, DIM, 200, clusters=200),
        "clip_like": bench.clip_like_bank(N, DIM, 200, spec=SPEC),
        "uniform": bench.synthetic_bank(N, DIM, 200, clusters=0),
    }


def test_clip_like_bank_is_unit_deterministic_and_its_queries_do_not_depend_on_n():
    x, q = bench.clip_like_bank(3000, DIM, 50, spec=SPEC)
    assert x.shape == (3000, DIM) and q.shape == (50, DIM) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(x, bench.clip_like_bank(3000, DIM, 50, spec=SPEC)[0])
    np.testing.assert_array_equal(q, bench.clip_like_bank(1000, DIM, 50, spec=SPEC)[1])
    assert not np.array_equal(x[:1000], bench.clip_like_bank(1000, DIM, 50, spec=SPEC, seed=1)[0])


def test_clip_like_statistics_lie_between_clustered_and_isotropic(banks):
    stats = {name: bench.bank_stats(x) for name, (x, _) in banks.items()}
    c, u, clip = stats["clustered"], stats["uniform"], stats["clip_like"]
    assert clip["mean_cos_to_mean"] > 0.5 > max(c["mean_cos_to_mean"], u["mean_cos_to_mean"])  # a cone
    assert clip["participation_ratio"] < 0.5 * min(c["participation_ratio"], u["participation_ratio"])
    assert clip["lid"] < 0.8 * min(c["lid"], u["lid"])  # low-dimensional neighbourhoods
    assert c["nn10_over_median_pair"] < clip["nn10_over_median_pair"] < u["nn10_over_median_pair"]
    assert clip["nn10_spread"] > 1.3 > max(c["nn10_spread"], u["nn10_spread"])  # heavy-tailed density


def _ivf_recall(x, q, nprobes):
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, truth = exact.search(q, 10)
    ivf = faiss.index_factory(x.shape[1], "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x[:5000])
    ivf.add(x)
    out = []
    for p in nprobes:
        ivf.nprobe = p
        out.append(bench._recall(ivf.search(q, 10)[1], truth))
    return out


def test_clip_like_bank_is_hard_for_ivf_but_reachable(banks):
    clustered = _ivf_recall(*banks["clustered"], (1,))
    clip = _ivf_recall(*banks["clip_like"], (1, 16))
    assert clustered[0] > 0.97  # separated blobs: one cell holds every neighbour
    assert clip[0] < 0.8 and clip[1] >= bench.RECALL_GOAL  # neighbours spread over cells, found with more


def test_bench_reports_stats_operating_point_encoder_and_build_times():
    r = bench.bench_retrieval(n=3000, dim=64, n_queries=40, stats_n=3000, encoder=False)
    assert set(r["bank_stats"]) >= {"clustered", "clip_like", "uniform", "n", "clip_like_model"}
    assert r["bank"]["faiss_gpus"] == 0 and r["clip_like"]["exact"]["gpu"] is False
    ivf = r["clip_like"]["ivf"]
    assert {"nprobe", "recall_at_10", "speedup", "build_s", "train_s", "vectors_per_s", "sweep"} <= set(ivf)
    assert ivf["factory"] == f"IVF{default_nlist(3000)},Flat" and r["goal_met"].keys() == {"clip_like"}


def test_encoder_bench_and_fp16_inputs(tmp_path):
    """The project encoder in fp16 (as on CUDA; here on the CPU) equals fp32: images go in at the
    precision's dtype (open_clip keeps some parameters in fp32, so the first parameter's dtype was wrong)."""
    from cm3leon.retrieval.clip_encoder import CPU_BATCH, SHIPPED_WORLD_CLIP, DocumentEncoder
    from cm3leon.retrieval.tiny_clip import TINY_CLIP

    fp32 = DocumentEncoder(TINY_CLIP, SHIPPED_WORLD_CLIP, device="cpu")
    fp16 = DocumentEncoder(TINY_CLIP, SHIPPED_WORLD_CLIP, device="cpu", precision="fp16")
    assert fp32.batch_size == CPU_BATCH and fp16.input_dtype.is_floating_point and fp16.input_dtype.itemsize == 2
    images = list(np.random.default_rng(0).integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8))
    captions = ["a small red circle on a blue background", "a large green square on a white background"]
    assert np.min(np.sum(fp32.encode_images(images) * fp16.encode_images(images), 1)) > 0.999
    assert np.min(np.sum(fp32.encode_texts(captions) * fp16.encode_texts(captions), 1)) > 0.999
    r = bench.bench_encoder("cpu", batch_size=1, items=32)
    assert r["precision"] == "fp32" and r["tiny_clip"]["documents_per_s"] > 0
    assert r["vit_b_32"]["batch"] == 1 and r["vit_b_32"]["images_per_s"] > 0
