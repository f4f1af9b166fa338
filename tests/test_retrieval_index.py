"""FAISS memory bank (every kind, memory-mapped loading, sharded build), key map, token store,
and the retrieval benchmark's measurement code on a small bank."""

import numpy as np
import pytest

from cm3leon.retrieval.index import IndexConfig, KeyMap, build_index, default_nlist, load_index
from cm3leon.retrieval.token_store import TokenStore, write_token_store


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def bank():
    rng = np.random.default_rng(0)
    return unit(rng, 3000, 32), unit(rng, 20, 32)


def brute_force(x, q, k):
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def test_flat_is_exact_and_survives_mmap_round_trip(bank, tmp_path):
    x, q = bank
    index, stats = build_index(x.astype(np.float16), IndexConfig(kind="auto", add_batch=700), tmp_path / "i.faiss")
    assert stats["kind"] == "flat" and stats["n"] == 3000
    x16 = x.astype(np.float16).astype(np.float32)  # what was indexed
    scores, ids = index.search(q, 5)
    np.testing.assert_array_equal(ids, brute_force(x16, q, 5))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x16.T, ids, 1), atol=1e-5)
    loaded = load_index(tmp_path / "i.faiss")
    np.testing.assert_array_equal(loaded.search(q, 5)[1], ids)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_approximate_kinds_find_their_own_vectors(bank, tmp_path, kind):
    x, _ = bank
    cfg = IndexConfig(kind=kind, nlist=16, nprobe=16, pq_m=8, ef_search=64)
    index, stats = build_index(x, cfg, tmp_path / f"{kind}.faiss")
    assert stats["kind"] == kind
    _, ids = index.search(x[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9
    loaded = load_index(tmp_path / f"{kind}.faiss", nprobe=16, ef_search=64)
    np.testing.assert_array_equal(loaded.search(x[:50], 3)[1], index.search(x[:50], 3)[1])


def test_sharded_ivf_equals_one_piece_ivf(bank, tmp_path):
    x, q = bank
    one, _ = build_index(x, IndexConfig(kind="ivf", nlist=16, nprobe=4), tmp_path / "one.faiss")
    sharded, stats = build_index(x, IndexConfig(kind="ivf", nlist=16, nprobe=4, shard_rows=1000), tmp_path / "sh.faiss")
    assert stats["shards"] == 3 and (tmp_path / "sh.ivfdata").is_file()
    assert not list(tmp_path.glob("sh.faiss.shard*"))  # shard files are removed after the merge
    _s1, i1 = one.search(q, 10)
    _s2, i2 = sharded.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    reloaded = load_index(tmp_path / "sh.faiss", nprobe=4)
    np.testing.assert_array_equal(reloaded.search(q, 10)[1], i1)


def test_missing_index_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_index(tmp_path / "nope.faiss")
    assert "\n" not in str(e.value) and "python src/build_index.py" in str(e.value)


def test_default_nlist_and_bad_kind():
    assert default_nlist(1_000_000) == 4096 and default_nlist(100) == 2
    with pytest.raises(ValueError, match="index kind"):
        IndexConfig(kind="lsh")


def test_key_map(tmp_path):
    keys = ["val_000000003", "train_000000001", "a", "ü-key"]
    KeyMap.write(tmp_path / "k", keys)
    km = KeyMap.load(tmp_path / "k")
    assert len(km) == 4 and [km.row(k) for k in keys] == [0, 1, 2, 3]
    assert km.row("missing") == -1 and km.key(3) == "ü-key"
    np.testing.assert_array_equal(km.rows(["a", "zz"]), [2, -1])


def test_token_store_round_trip(tmp_path):
    import webdataset as wds

    from cm3leon.data.token_shards import TokenSample, encode_sample

    rng = np.random.default_rng(0)
    samples = [
        TokenSample(
            f"k{i:03d}",
            "c",
            rng.integers(0, 900, size=rng.integers(1, 30)).astype(np.uint16),
            rng.integers(0, 512, size=16).astype(np.uint16),
        )
        for i in range(50)
    ]
    shards = []
    for j in range(2):
        shards.append(str(tmp_path / f"{j:06d}.tar"))
        with wds.TarWriter(shards[-1]) as sink:
            for s in samples[j * 25 : (j + 1) * 25]:
                sink.write(encode_sample(s))
    info = write_token_store(shards, tmp_path / "store")
    assert info["n"] == 50 and info["tokens_per_image"] == 16
    store = TokenStore(tmp_path / "store")
    for row in (0, 24, 25, 49):
        doc = store.document(row)
        np.testing.assert_array_equal(doc.text_ids, samples[row].text_ids)
        np.testing.assert_array_equal(doc.codes, samples[row].codes)
        assert store.key(row) == samples[row].key
    np.testing.assert_array_equal(store.get("k030").codes, samples[30].codes)
    assert store.get("nope") is None
    import pickle

    clone = pickle.loads(pickle.dumps(store))  # what a DataLoader worker receives: no arrays inside
    assert clone._arrays is None and clone.key(7) == "k007"


def test_bench_measures_recall_and_speed_on_a_small_bank():
    from cm3leon.bench import retrieval as bench

    x, q = bench.synthetic_bank(4000, 32, 50, clusters=50)
    assert x.shape == (4000, 32) and np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    import faiss

    flat = faiss.IndexFlatIP(32)
    flat.add(x)
    qps, truth = bench._qps(flat, q, 10, repeats=1)
    assert qps > 0 and bench._recall(truth, truth) == 1.0
    ivf = faiss.index_factory(32, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)
    row = bench._sweep(ivf, q, truth, 10, qps, "nprobe", (16,))
    assert row["recall_at_10"] == 1.0 and row["nprobe"] == 16  # all 16 cells scanned = exact
    row = bench._sweep(ivf, q, truth, 10, qps, "nprobe", (1, 2, 4, 8, 16))
    assert row["recall_at_10"] >= bench.RECALL_GOAL and len(row["sweep"]) <= 5  # the cheapest that reaches it
    store = bench._bench_store(n=500, lookups=500)
    assert store["lookups_per_s_by_row"] > 1000
