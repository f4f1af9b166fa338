"""RA-CM3 neighbours: the selection rules, the offline build on a small world, the training-time
neighbour source inside the DataModule, the inference Retriever, and the one-line errors.

The world acceptance (retrieved documents share the query's main shape and colour in >= 80% of
cases; no pair retrieves itself; nothing above 0.9) runs here on a 2,000-pair bank, and on the
full 20,000-pair world in the slow test."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from cm3leon.data import world
from cm3leon.data.datamodule import CM3DataModule
from cm3leon.data.preprocess import PreprocessConfig, preprocess_split
from cm3leon.data.sequences import document_ids
from cm3leon.data.token_shards import decode_sample
from cm3leon.data.token_stream import read_token_shard
from cm3leon.errors import UsageError
from cm3leon.retrieval.clip_encoder import DocumentEncoder, document_vectors
from cm3leon.retrieval.index import KeyMap
from cm3leon.retrieval.neighbours import NeighbourPool, build_retrieval, ensure_retrieval, select_neighbours
from cm3leon.retrieval.protocol import DocumentSource, RetrievalQuery
from cm3leon.retrieval.retriever import Retriever
from cm3leon.retrieval.tiny_clip import TINY_CLIP
from cm3leon.tokenizers.image_tokenizer import CONFIG_DIR, resolve_config
from cm3leon.tokenizers.vqgan import VQModel
from project import PROJECT_ROOT

SHIPPED = PROJECT_ROOT / "data" / "shipped"
torch.set_num_threads(2)


def ra_config(**overrides) -> dict:
    cfg = {
        "k": 2,
        "encoder": {"model_name": TINY_CLIP, "pretrained": str(SHIPPED / "world_clip.pt"), "device": "cpu"},
        "index": {"kind": "flat"},
    }
    return {**cfg, **overrides}


# ---- the selection rule on hand-made vectors ---------------------------------------------------
def test_selection_rules():
    e = np.eye(6, dtype=np.float32)
    bank = np.stack([e[0], e[1], e[2], e[2], e[3], e[4], e[5]])  # row 3 duplicates row 2
    # image query candidates, best first: itself, a near-duplicate (> 0.9), 2, 3 (= 2), 4, 5
    img = (np.array([[1.0, 0.95, 0.8, 0.8, 0.7, 0.6]]), np.array([[0, 1, 2, 3, 4, 5]]))
    # text query candidates: 2 again (picked: skip), 6 is the query's own content (skip), 5, empty slots
    txt = (np.array([[0.85, 0.8, 0.5, -1, -1]]), np.array([[2, 6, 5, -1, -1]]))
    rows, scores = select_neighbours(
        [img, txt],
        bank,
        per_query=2,
        max_relevance=0.9,
        duplicate_threshold=0.98,
        self_rows=np.array([0]),
        query_docs=e[5:6],
    )
    np.testing.assert_array_equal(rows, [[2, 4, 5, -1]])
    np.testing.assert_allclose(scores[0, :3], [0.8, 0.7, 0.5])
    assert np.isnan(scores[0, 3])


def test_selection_is_per_row_and_respects_per_query():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((50, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = bank[:5] + 0.3 * rng.standard_normal((5, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sim = q @ bank.T
    order = np.argsort(-sim, axis=1)[:, :10]
    cands = (np.take_along_axis(sim, order, 1), order)
    rows, _ = select_neighbours([cands], bank, per_query=3, max_relevance=2.0, duplicate_threshold=2.0)
    np.testing.assert_array_equal(rows, order[:, :3])  # no rule fires: the 3 best
    rows, _ = select_neighbours([cands], bank, per_query=3, max_relevance=2.0, self_rows=order[:, 0])
    np.testing.assert_array_equal(rows, order[:, 1:4])


# ---- a small world, end to end -----------------------------------------------------------------
@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """256 train + 64 val pairs tokenized with a random tiny VQGAN (the codes do not matter for
    retrieval), and their retrieval files built by the first-use path."""
    root = tmp_path_factory.mktemp("ra")
    torch.manual_seed(0)
    vq = root / "vq.ckpt"
    torch.save(VQModel(resolve_config("tiny")).state_dict(), vq)
    vq.with_suffix(".yaml").write_text((CONFIG_DIR / "tiny.yaml").read_text())
    raw = world.ensure_world(out_dir=str(root / "raw"), n_train=256, n_val=64, shard_size=64, num_workers=1)
    pcfg = PreprocessConfig(image_tokenizer=str(vq), text_tokenizer=str(SHIPPED / "world_bpe.json"), num_workers=1)
    for split in ("train", "val"):
        preprocess_split(str(raw / split), root / "tokens" / split, pcfg, progress=False)
    tokens = root / "tokens"
    ensure_retrieval(ra_config(), tokens, build_missing=True)
    return tokens, NeighbourPool.from_config(ra_config(), tokens)


def scene_of(key: str) -> world.Scene:
    split, index = key.rsplit("_", 1)
    return world.scene_for(0, split, int(index))


def main_shape(scene: world.Scene) -> tuple[str, str]:
    """(kind, colour) of the largest shape, the first in reading order among equals."""
    s = max(scene.shapes, key=lambda s: world.SIZES.index(s.size))
    return s.kind, s.colour


def shares_main_shape(query: world.Scene, doc: world.Scene) -> bool:
    return main_shape(query) in {(s.kind, s.colour) for s in doc.shapes}


def test_build_writes_consistent_files(small_world):
    tokens, _ = small_world
    folder = tokens / "retrieval"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["index"]["n"] == 256 and manifest["store"]["n"] == 256
    assert manifest["encoder"]["doc_vector"].startswith("normalize(")
    train_keys, bank_keys = KeyMap.load(folder / "train" / "keys"), KeyMap.load(folder / "store" / "keys")
    assert [train_keys.key(r) for r in range(256)] == [bank_keys.key(r) for r in range(256)]
    for split, n in (("train", 256), ("val", 64)):
        nb = np.load(folder / split / "neighbours.npy")
        sc = np.load(folder / split / "scores.npy").astype(np.float32)
        assert nb.shape == (n, 4) and nb.max() < 256
        filled = nb >= 0
        assert filled.sum(1).mean() > 3.5  # pools are (nearly) always full
        assert np.nanmax(sc[filled]) <= 0.9 + 1e-3  # none above 0.9 (fp16 storage)
        keys = KeyMap.load(folder / split / "keys")
        for r in range(n):
            picked = nb[r][nb[r] >= 0]
            assert len(set(picked)) == len(picked)  # no duplicate rows
            assert keys.key(r) not in {bank_keys.key(p) for p in picked}  # never the pair itself


def test_neighbours_follow_the_rules_exactly(small_world):
    """Recompute every train pool from the stored vectors with a plain loop."""
    tokens, _ = small_world
    folder = tokens / "retrieval"
    f32 = lambda p: np.load(p).astype(np.float32)  # noqa: E731
    bank = f32(folder / "bank" / "doc.npy")
    img, txt, qtxt = (f32(folder / "train" / f"{x}.npy") for x in ("image", "text", "query_text"))
    qdoc = document_vectors(txt, img)
    stored = np.load(folder / "train" / "neighbours.npy")
    mismatches = 0
    for r in range(len(bank)):
        picked = []
        for q in (img[r], qtxt[r]):
            sims = bank @ q
            got = 0
            for c in np.argsort(-sims, kind="stable")[:32]:
                if got == 2:
                    break
                if c == r or sims[c] > 0.9 or bank[c] @ qdoc[r] >= 0.98:
                    continue
                if any(c == p or bank[c] @ bank[p] >= 0.98 for p in picked):
                    continue
                picked.append(c)
                got += 1
        assert (stored[r][len(picked) :] == -1).all()
        # compared by content: the world repeats scenes, and FAISS and numpy order exact ties differently
        mismatches += not np.array_equal(bank[stored[r][: len(picked)]], bank[picked])
    assert mismatches == 0


def test_neighbour_source_in_the_datamodule(small_world):
    tokens, source = small_world
    assert isinstance(source, DocumentSource)  # the one retrieval protocol
    dm = CM3DataModule(
        str(tokens),
        seq_len=512,
        micro_batch_size=2,
        num_workers=0,
        retrieval=ra_config(),
        objective={"transform": {"poisson_lambda": 0.0}},
        vocab={"n_sentinels": 16},
    )
    dm.prepare_data()  # the files are current: nothing to make
    dm.setup()
    assert isinstance(dm.neighbours, NeighbourPool) and dm.neighbours.folder == source.folder
    assert dm.data_meta()["retrieval"] == {"k": 2, "folder": str((tokens / "retrieval").resolve())}
    vocab = dm.vocab
    sample = decode_sample(read_token_shard(dm.train_shards[0])[3])
    ex = dm.make_example(sample, np.random.default_rng([1, 2, 3]))
    again = dm.make_example(sample, np.random.default_rng([1, 2, 3]))
    np.testing.assert_array_equal(ex["ids"], again["ids"])  # the example's rng decides: resumable
    assert ex["n_retrieved"] == 2
    # the sequence holds the 2 retrieved documents (from the pool, via the token store), then the query
    docs = source.documents([RetrievalQuery(key=sample.key)], 2, np.random.default_rng([1, 2, 3]))[0]
    pool = source.pool(sample.key)
    pool_docs = [source.store.document(p) for p in pool]
    for d in docs:
        assert any(np.array_equal(d.codes, p.codes) and np.array_equal(d.text_ids, p.text_ids) for p in pool_docs)
    parts = [np.array([2])]
    for d in docs:
        parts += [document_ids(d, vocab, image_first=False), np.array([vocab.break_id])]
    expected_prefix = np.concatenate(parts)
    if not (ex["ids"][: len(expected_prefix)] == expected_prefix).all():  # query laid out image-first is fine too
        pytest.fail("retrieved documents are not at the start of the sequence")
    # different examples draw different subsets / orders of the pool of 4
    draws = {tuple(map(int, np.random.default_rng(s).permutation(pool)[:2])) for s in range(20)}
    assert len(draws) > 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["n_retrieved"].tolist() == [2, 2]
    clone = pickle.loads(pickle.dumps(source))  # what a spawned DataLoader worker receives
    assert clone._maps is None
    assert len(clone.documents([RetrievalQuery(key=sample.key)], 2, np.random.default_rng(0))[0]) == 2


def test_k_is_per_call_and_zero_is_no_retrieval(small_world):
    tokens, source = small_world
    keys = [decode_sample(r).key for r in read_token_shard(str(tokens / "val" / "000000.tar"))[:3]]
    queries = [RetrievalQuery(key=k) for k in keys]
    assert [len(d) for d in source.documents(queries, 3, np.random.default_rng(0))] == [3, 3, 3]
    assert source.documents(queries, 0) == [[], [], []]
    # without a generator: the pool's first k in stored order (best first per query kind)
    first = source.documents(queries[:1], 2)[0]
    stored = [source.store.document(r) for r in source.pool(keys[0])[:2]]
    assert all(np.array_equal(a.codes, b.codes) for a, b in zip(first, stored, strict=True))
    with pytest.raises(ValueError, match="by sample key"):
        source.documents([RetrievalQuery(text="a red circle")], 2)
    for off in ({"name": "none", "k": 0}, None):
        assert CM3DataModule(str(tokens), retrieval=off).retrieval is None
    with pytest.raises(UsageError, match="retrieval=checkpoint has no k"):
        CM3DataModule(str(tokens), retrieval={"name": "checkpoint", "k": None})


def test_retriever_by_prompt_text(small_world):
    tokens, _ = small_world
    retriever = Retriever.from_config(ra_config(), tokens)
    prompts = [world.caption(world.scene_for(0, "val", i)) for i in range(16)]
    hits = retriever.retrieve(prompts, k=2)
    assert len(hits) == 16 and all(1 <= len(h) <= 2 for h in hits)
    store = retriever.store
    for h in hits:
        for x in h:
            assert x.score <= 0.9 and x.key.startswith("train_") and store.key(x.row) == x.key
            np.testing.assert_array_equal(x.document.codes, store.document(x.row).codes)
    docs = retriever.documents(prompts[:2], k=1)
    assert [len(d) for d in docs] == [1, 1]


def test_retriever_refuses_another_encoder(small_world, tmp_path):
    import open_clip

    tokens, _ = small_world
    torch.manual_seed(1)
    other = tmp_path / "other_clip.pt"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), other)
    with pytest.raises(ValueError, match="not the one that embedded"):
        Retriever(tokens / "retrieval", encoder=DocumentEncoder(TINY_CLIP, str(other), device="cpu"))


def test_missing_and_stale_files_give_one_line(small_world, tmp_path):
    tokens, _ = small_world
    with pytest.raises(FileNotFoundError) as e:
        ensure_retrieval(ra_config(dir=str(tmp_path / "nowhere")), tokens)
    msg = str(e.value)
    assert "\n" not in msg and "manifest.json" in msg and "python src/build_index.py" in msg
    with pytest.raises(UsageError) as e:
        ensure_retrieval(ra_config(max_relevance=0.8), tokens)
    assert "\n" not in str(e.value) and "rebuild" in str(e.value)
    broken = tmp_path / "copy"
    shutil.copytree(tokens / "retrieval", broken)
    (broken / "store" / "store.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"store\.json not found"):
        NeighbourPool.from_config(ra_config(dir=str(broken)), tokens)
    with pytest.raises(FileNotFoundError) as e:
        build_retrieval(
            ra_config(
                encoder={"model_name": TINY_CLIP, "pretrained": str(tmp_path / "world_clip.pt")},
                dir=str(tmp_path / "r"),
            ),
            tokens,
        )
    assert "\n" not in str(e.value) and "python src/train_clip.py" in str(e.value)


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_checks_inputs_first_reuses_and_refuses_other_builds(small_world, tmp_path, monkeypatch):
    """Issue 14 items 1-2: a build of the same inputs is reused; missing raw shards or a build of
    other settings leave the existing files whole (a failure mid-way too), with one line."""
    import cm3leon.retrieval.neighbours as nbrs

    tokens, _ = small_world
    folder = tmp_path / "r"
    shutil.copytree(tokens / "retrieval", folder)
    before = snapshot(folder)
    assert build_retrieval(ra_config(dir=str(folder)), tokens, progress=False)["reused"]
    assert snapshot(folder) == before
    with pytest.raises(FileNotFoundError, match="raw shards of split"):
        build_retrieval(ra_config(dir=str(folder), raw_dir=str(tmp_path / "typo")), tokens, progress=False)
    assert snapshot(folder) == before
    with pytest.raises(UsageError, match="selection rules.*overwrite=true") as e:
        build_retrieval(ra_config(dir=str(folder), max_relevance=0.8), tokens, progress=False)
    assert "\n" not in str(e.value) and snapshot(folder) == before

    def broken_index(*args, **kwargs):
        raise RuntimeError("faiss ran out of memory")

    monkeypatch.setattr(nbrs, "build_index", broken_index)
    with pytest.raises(RuntimeError, match="out of memory"):
        build_retrieval(ra_config(dir=str(folder), max_relevance=0.8), tokens, progress=False, overwrite=True)
    assert snapshot(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["r"]


# ---- the world acceptance --------------------------------------------------------------------
def world_retrieval_scores(n_bank: int, n_val: int) -> dict:
    """Retrieve k=2 documents for validation captions from a bank of training pairs (the
    Retriever's rule), and score them against the captions' scenes."""
    enc = DocumentEncoder(TINY_CLIP, str(SHIPPED / "world_clip.pt"), device="cpu", batch_size=500)
    bank_scenes = [world.scene_for(0, "train", i) for i in range(n_bank)]
    docs, _, _ = enc.encode_documents([world.caption(s) for s in bank_scenes], [world.render(s) for s in bank_scenes])
    import faiss

    index = faiss.IndexFlatIP(docs.shape[1])  # exact, as build_index's `flat`
    index.add(docs)
    val_scenes = [world.scene_for(0, "val", i) for i in range(n_val)]
    q = enc.encode_texts([world.caption(s) for s in val_scenes])
    rows, scores = select_neighbours(
        [index.search(q, 128)], docs, per_query=2, max_relevance=0.9, duplicate_threshold=0.98
    )
    pairs = [(v, bank_scenes[r]) for v, rr in zip(val_scenes, rows) for r in rr if r >= 0]
    main_colour = [
        max(v.shapes, key=lambda s: world.SIZES.index(s.size)).colour in {s.colour for s in d.shapes} for v, d in pairs
    ]
    return {
        "share": float(np.mean([shares_main_shape(v, d) for v, d in pairs])),
        "colour_share": float(np.mean(main_colour)),
        "docs": len(pairs),
        "max_score": float(np.nanmax(scores)),
    }


def test_world_retrieval_is_far_above_chance():
    """A fast guard on a small bank (1,000 pairs; fewer close candidates than the real 20,000): a
    random bank document shares the query's main shape and colour ~7% of the time; with the shipped
    CLIP 0.68 of the retrieved ones do and 0.87 keep the main colour (measured when it was shipped)."""
    s = world_retrieval_scores(n_bank=1000, n_val=100)
    assert s["docs"] >= 190 and s["max_score"] <= 0.9
    assert s["colour_share"] >= 0.8 and s["share"] >= 0.55, s


def test_world_retrieval_shares_main_shape_and_colour():
    """Issue 4 acceptance: the whole training set as the bank (20,000 pairs), the 1,000 validation
    captions; retrieved documents share the query's main shape and colour in >= 80% of cases
    (0.835 with the shipped CLIP), none above relevance 0.9."""
    s = world_retrieval_scores(n_bank=20_000, n_val=1000)
    assert s["docs"] >= 1900 and s["max_score"] <= 0.9
    assert s["share"] >= 0.8, s


@pytest.mark.slow
def test_world_acceptance_full_bank(tmp_path):
    """The issue's acceptance on the whole world: 20,000-pair bank, the 1,000 validation captions
    through build_retrieval + Retriever; no pair retrieves itself; nothing above 0.9."""
    raw = world.ensure_world(out_dir=str(PROJECT_ROOT / "data" / "world" / "raw"))  # the checkout's world
    torch.manual_seed(0)
    vq = tmp_path / "vq.ckpt"  # the codes do not matter for retrieval: a random VQGAN is quicker to get
    torch.save(VQModel(resolve_config("tiny")).state_dict(), vq)
    vq.with_suffix(".yaml").write_text((CONFIG_DIR / "tiny.yaml").read_text())
    pcfg = PreprocessConfig(image_tokenizer=str(vq), text_tokenizer=str(SHIPPED / "world_bpe.json"), num_workers=2)
    for split in ("train", "val"):
        preprocess_split(str(raw / split), tmp_path / "tokens" / split, pcfg, progress=False)
    manifest = build_retrieval(ra_config(), tmp_path / "tokens", progress=False)
    assert manifest["index"]["n"] == 20_000
    folder = tmp_path / "tokens" / "retrieval"
    for split in ("train", "val"):
        nb = np.load(folder / split / "neighbours.npy")
        assert np.nanmax(np.load(folder / split / "scores.npy").astype(np.float32)) <= 0.9 + 1e-3
    nb = np.load(folder / "train" / "neighbours.npy")
    assert not (nb == np.arange(len(nb))[:, None]).any()
    retriever = Retriever(folder)
    val = [world.scene_for(0, "val", i) for i in range(1000)]
    hits = retriever.retrieve([world.caption(s) for s in val], k=2)
    shared = [shares_main_shape(v, scene_of(h.key)) for v, hh in zip(val, hits) for h in hh]
    assert len(shared) >= 1900 and max(h.score for hh in hits for h in hh) <= 0.9
    assert np.mean(shared) >= 0.8
