"""The CLIP document encoder: parity with open_clip, vector conventions, query dropout, the tiny
world CLIP (tokenizer, shipped weights' recall), and the one-line errors for missing weights."""

import gzip

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cm3leon.data import world
from cm3leon.retrieval.clip_encoder import DocumentEncoder, document_vectors, drop_tokens, recall_at_k
from cm3leon.retrieval.tiny_clip import CONTEXT_LENGTH, TINY_CLIP, WORDS, register_tiny_clip
from project import PROJECT_ROOT

SHIPPED_CLIP = PROJECT_ROOT / "data" / "shipped" / "world_clip.pt"
torch.set_num_threads(2)


def world_pairs(split: str, n: int, start: int = 0):
    """(captions, uint8 images) of the embedded world, rendered exactly as its raw shards hold them."""
    scenes = [world.scene_for(0, split, i) for i in range(start, start + n)]
    return [world.caption(s) for s in scenes], [world.render(s) for s in scenes]


@pytest.fixture(scope="module")
def shipped_encoder():
    return DocumentEncoder(TINY_CLIP, pretrained=str(SHIPPED_CLIP), device="cpu")


# ---- acceptance: same embeddings as open_clip with the same checkpoint file ------------------
def check_parity(model_name: str, path, image_sizes) -> None:
    """DocumentEncoder(model_name, path) == open_clip.create_model_and_transforms(model_name, path)."""
    ref, _, ref_pre = open_clip.create_model_and_transforms(model_name, pretrained=str(path))
    ref.eval()
    tok = open_clip.get_tokenizer(model_name)
    texts = ["a photo of a cat", "a large red circle in the top left on a white background", "x"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in image_sizes]
    with torch.no_grad():
        want_t = ref.encode_text(tok(texts), normalize=True).numpy()
        want_i = ref.encode_image(torch.stack([ref_pre(im) for im in images]), normalize=True).numpy()
    del ref

    enc = DocumentEncoder(model_name, pretrained=str(path), device="cpu", batch_size=2)  # 2: batching is exercised
    got_t, got_i = enc.encode_texts(texts), enc.encode_images(images)
    assert got_t.shape == (3, enc.dim) and got_i.shape == (3, enc.dim)
    np.testing.assert_allclose(got_t, want_t, atol=1e-5)
    np.testing.assert_allclose(got_i, want_i, atol=1e-5)
    doc, _, _ = enc.encode_documents(texts, images)
    np.testing.assert_allclose(doc, document_vectors(want_t, want_i), atol=1e-5)


@pytest.mark.slow  # ~15 s on an idle 2-core CPU (three ViT-B-32 builds, a 350 MB file), ~90 s on a busy one
def test_vit_b32_file_gives_open_clip_embeddings(tmp_path):
    """Issue acceptance, with an open_clip ViT-B-32 checkpoint saved from a random-initialised model."""
    torch.manual_seed(0)
    path = tmp_path / "vit_b_32_random.pt"
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), path)  # random init: tests only
    check_parity("ViT-B-32", path, ((224, 224), (100, 300), (64, 64)))


def test_tiny_clip_file_gives_open_clip_embeddings(tmp_path):
    """The same check, fast: the tiny architecture, random-initialised, through the same code path."""
    register_tiny_clip()
    torch.manual_seed(0)
    path = tmp_path / "tiny_random.pt"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), path)  # random init: tests only
    check_parity(TINY_CLIP, path, ((64, 64), (30, 90), (128, 128)))


def test_document_vectors_are_renormalised_means():
    rng = np.random.default_rng(0)
    t, i = rng.standard_normal((2, 5, 8)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    i /= np.linalg.norm(i, axis=1, keepdims=True)
    d = document_vectors(t, i)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(d, (t + i) / np.linalg.norm(t + i, axis=1, keepdims=True), atol=1e-6)
    # a query's relevance to its own document: sqrt((1 + cos(t, i)) / 2)
    cos = (t * i).sum(1)
    np.testing.assert_allclose((t * d).sum(1), np.sqrt((1 + cos) / 2), atol=1e-6)


def test_drop_tokens_drops_a_fifth_of_the_content_and_keeps_order():
    register_tiny_clip()
    tok = open_clip.get_tokenizer(TINY_CLIP)
    caps, _ = world_pairs("val", 20)
    ids = tok(caps)
    special = set(tok.all_special_ids)
    out = drop_tokens(ids, 0.2, np.random.default_rng(0), special, pad_id=0)
    for row, new in zip(ids.tolist(), out.tolist()):
        content = [t for t in row if t not in special and t != 0]
        kept = [t for t in new if t not in special and t != 0]
        assert len(kept) == len(content) - round(0.2 * len(content))
        it = iter(content)
        assert all(t in it for t in kept)  # a subsequence: order kept, nothing invented
        assert new[0] == tok.sot_token_id and new[len(kept) + 1] == tok.eot_token_id
        assert all(t == 0 for t in new[len(kept) + 2 :])


# ---- the tiny world CLIP -------------------------------------------------------------------
def test_tiny_tokenizer_spells_world_words_like_clip():
    register_tiny_clip()
    tiny = open_clip.get_tokenizer(TINY_CLIP)
    full = open_clip.tokenizer.SimpleTokenizer()
    assert tiny.vocab_size == open_clip.get_model_config(TINY_CLIP)["text_cfg"]["vocab_size"] < 1000
    phrases = [*world.KINDS, *world.COLOURS, *world.SIZES, *world.POSITION_PHRASES.values(), *world.BACKGROUNDS]
    world_words = set(" ".join(phrases).split()) | {"a", "and", "on", "background"}
    assert world_words <= set(WORDS), "the world gained words: extend WORDS and retrain world_clip.pt"
    caps, _ = world_pairs("train", 300)
    longest = 0
    for c in caps:
        a, b = tiny.encode(c), full.encode(c)
        assert [tiny.decoder[i] for i in a] == [full.decoder[i] for i in b]
        longest = max(longest, len(a) + 2)
    assert longest <= CONTEXT_LENGTH
    assert tiny.decode(tiny.encode("a pink star")).strip() == "a pink star"  # other text: byte fallback


def test_shipped_world_clip_recall_at_5(shipped_encoder):
    """Issue acceptance: text->image recall@5 >= 0.8 on the 1,000 validation pairs."""
    caps, images = world_pairs("val", 1000)
    t = shipped_encoder.encode_texts(caps)
    i = shipped_encoder.encode_images(images)
    r = recall_at_k(t, i)
    assert r["r@5"] >= 0.8, r
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)


def test_training_input_equals_open_clip_preprocess(shipped_encoder):
    """train_clip feeds uint8 tensors through `Normalizer`; inference uses open_clip's transform."""
    import sys

    sys.path.insert(0, str(PROJECT_ROOT / "src"))
    from cm3leon.retrieval.clip_training import Normalizer

    _, images = world_pairs("val", 4)
    fast = Normalizer(shipped_encoder.model)(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    ref = torch.stack([shipped_encoder.preprocess(Image.fromarray(im)) for im in images])
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_shipped_file_is_small_and_self_describing():
    ckpt = torch.load(SHIPPED_CLIP, map_location="cpu", weights_only=True)
    assert ckpt["model_name"] == TINY_CLIP and SHIPPED_CLIP.stat().st_size < 5e6
    assert ckpt["metrics"][-1]["t2i_r@5"] >= 0.8


# ---- errors ----------------------------------------------------------------------------------
def test_missing_weights_file_is_one_line_naming_the_command(tmp_path):
    missing = tmp_path / "world_clip.pt"
    with pytest.raises(FileNotFoundError) as e:
        DocumentEncoder(TINY_CLIP, pretrained=str(missing))
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "python src/train_clip.py" in msg


def test_random_weights_are_refused():
    with pytest.raises(ValueError, match="needs trained weights"):
        DocumentEncoder(TINY_CLIP, pretrained=None)
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        DocumentEncoder("ViT-B-32", pretrained="no-such-tag")


def test_merge_file_has_no_empty_merge():
    """An empty last line would add a phantom vocabulary entry (and shift the specials)."""
    register_tiny_clip()
    path = open_clip.get_model_config(TINY_CLIP)["text_cfg"]["tokenizer_kwargs"]["bpe_path"]
    with gzip.open(path) as f:
        lines = f.read().decode().split("\n")
    assert all(len(line.split()) == 2 for line in lines[1:])
