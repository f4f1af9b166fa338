import numpy as np
import pytest

from cm3leon.data.sequences import Document, build_sequence, document_ids, insert_retrieved, pad_batch
from cm3leon.vocab import EOS_ID, PAD_ID, Vocab

V = Vocab(text_size=300, n_image_codes=64, n_sentinels=8)


def doc(n_text, n_img=16, start=10):
    return Document(np.arange(start, start + n_text), np.arange(n_img) % V.n_image_codes)


def split_on_break(ids):
    parts, cur = [], []
    for t in ids:
        if t == V.break_id:
            parts.append(cur)
            cur = []
        else:
            cur.append(int(t))
    return parts + [cur]


def test_paper_layout_retrieved_first_query_last():
    q, r1, r2 = doc(5, start=20), doc(3, start=40), doc(4, start=60)
    ids, kept = build_sequence(q, [r1, r2], V, seq_len=200)
    assert kept == 2 and ids[0] == EOS_ID and ids[-1] == EOS_ID
    parts = split_on_break(ids[1:-1])
    # T1 <break> I1 <break> T2 <break> I2 <break> Tq <break> Iq
    assert len(parts) == 6
    assert parts[0] == list(range(40, 43)) and parts[2] == list(range(60, 64)) and parts[4] == list(range(20, 25))
    for img in (parts[1], parts[3], parts[5]):
        assert len(img) == 16 and all(V.is_image(np.array(img)))


def test_image_first_order():
    ids, _ = build_sequence(doc(5), [], V, seq_len=100, image_first=True)
    parts = split_on_break(ids[1:-1])
    assert len(parts[0]) == 16 and all(V.is_image(np.array(parts[0]))) and parts[1] == list(range(10, 15))


def test_drops_first_retrieved_docs_until_it_fits():
    q, rs = doc(5), [doc(3, start=100), doc(3, start=150), doc(3, start=200)]
    one_doc = len(document_ids(rs[0], V, False)) + 1
    full, kept = build_sequence(q, rs, V, seq_len=10_000)
    assert kept == 3
    ids, kept = build_sequence(q, rs, V, seq_len=len(full) - 1)
    assert kept == 2 and len(ids) == len(full) - one_doc
    assert 100 not in ids.tolist() and 150 in ids.tolist()  # the first (farthest) doc went first
    ids, kept = build_sequence(q, rs, V, seq_len=len(full) - 2 * one_doc - 1)
    assert kept == 0 and ids.tolist().count(V.break_id) == 1


def test_query_caption_truncated_never_the_image():
    ids, _ = build_sequence(doc(20), [], V, seq_len=30)
    assert len(ids) == 30
    assert V.is_image(ids).sum() == 16
    with pytest.raises(ValueError, match="seq_len"):
        build_sequence(doc(20), [], V, seq_len=18)


@pytest.mark.parametrize("seq_len", [200, 120, 60])
def test_insert_retrieved_lays_documents_out_as_build_sequence(seq_len):
    """Documents put into a built sequence land where build_sequence puts them, the farthest dropped
    first when they do not fit; the target mask is carried along (the documents are never targets)."""
    q, docs = doc(5, start=20), [doc(3, start=40), doc(4, start=60)]
    alone, _ = build_sequence(q, [], V, seq_len=seq_len)
    mask = np.zeros(len(alone), dtype=bool)
    mask[-17:-1] = True  # the query image
    ids, out_mask, kept = insert_retrieved(alone, mask, docs, V, seq_len)
    want, want_kept = build_sequence(q, docs, V, seq_len=seq_len)
    assert kept == want_kept and np.array_equal(ids, want) and len(ids) <= seq_len
    assert len(out_mask) == len(ids) and out_mask.sum() == 16 and np.array_equal(ids[out_mask], alone[mask])
    assert insert_retrieved(alone, None, [], V, seq_len)[0] is alone


def test_insert_retrieved_needs_a_built_sequence():
    with pytest.raises(ValueError, match="must open with </s>"):
        insert_retrieved(np.array([20, 21]), None, [doc(3)], V, 100)


def test_pad_batch():
    out = pad_batch([np.array([5, 6, 7]), np.array([8])], PAD_ID)
    assert out.tolist() == [[5, 6, 7], [8, PAD_ID, PAD_ID]] and out.dtype == np.int64
