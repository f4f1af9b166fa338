"""CM3 causal-mask transform: layout, span rules, inverse, statistics (style of metaseq's
cpu_tests/test_cm3_dataset.py: boundaries, overlaps, document boundaries never crossed)."""

import math
import time

import numpy as np
import pytest
import torch

from cm3leon.objective import (
    Cm3Example,
    _clip_to_segments,
    cm3_apply_spans,
    cm3_inverse,
    cm3_transform,
    loss_mask,
    maskable_segments,
)
from cm3leon.vocab import EOS_ID, PAD_ID, Vocab

V = Vocab(text_size=100, n_image_codes=64, n_sentinels=32)  # small table: text 0..99, image 100..163
BRK, EOSS, S0 = V.break_id, V.eoss_id, V.first_sentinel_id


def random_document(rng, length=None, pads=True):
    """A random retrieval-style block: `</s> text <break> image <break> text ...` (+ trailing pads)."""
    parts = [[EOS_ID]]
    for _ in range(rng.integers(1, 5)):
        parts.append(rng.integers(4, V.text_size, rng.integers(1, 12)))
        parts.append([BRK])
        parts.append(V.codes_to_ids(rng.integers(0, V.n_image_codes, rng.integers(1, 20))))
        if rng.random() < 0.5:
            parts.append([BRK])
        if rng.random() < 0.3:
            parts.append([EOS_ID])
    ids = np.concatenate(parts).astype(np.int64)
    if pads and rng.random() < 0.3:
        ids = np.concatenate([ids, np.full(rng.integers(1, 10), PAD_ID)])
    return ids if length is None else ids[:length]


def plain_text(length, rng):
    return rng.integers(4, V.text_size, length).astype(np.int64)


# ---- the layout, on a hand-made example ------------------------------------------------------
def test_apply_spans_layout():
    ids = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    ex = cm3_apply_spans(ids, [(5, 7), (1, 3)], V, truncate=False)
    assert ex.spans == [(1, 3), (5, 7)] and ex.n_spans == 2
    assert ex.ids.tolist() == [10, S0, 13, 14, S0 + 1, 17, S0, 11, 12, EOSS, S0 + 1, 15, 16, EOSS]
    cut = cm3_apply_spans(ids, [(1, 3), (5, 7)], V)
    assert cut.ids.tolist() == ex.ids[:8].tolist() and cut.truncated == 6
    assert cm3_apply_spans(ids, [(1, 3)], V, seq_len=10).ids.tolist() == [10, S0, 13, 14, 15, 16, 17, S0, 11, 12]


def test_apply_spans_trailing_pads_absorb_growth():
    ids = np.array([10, 11, 12, 13, PAD_ID, PAD_ID, PAD_ID, PAD_ID])
    ex = cm3_apply_spans(ids, [(2, 3)], V)
    assert ex.ids.tolist() == [10, 11, S0, 13, S0, 12, EOSS, PAD_ID]
    assert cm3_inverse(cm3_apply_spans(ids, [(2, 3)], V, truncate=False).ids, V).tolist() == ids.tolist()


def test_apply_spans_rejects_bad_spans():
    ids = np.arange(4, 14)
    for bad in ([(3, 3)], [(1, 5), (4, 6)], [(5, 11)], [(-1, 2)]):
        with pytest.raises(ValueError, match="spans"):
            cm3_apply_spans(ids, bad, V)


def test_no_span_keeps_block():
    rng = np.random.default_rng(0)
    ids = plain_text(64, rng)
    ex = cm3_transform(ids, V, rng, poisson_lambda=0.0)
    assert ex.n_spans == 0 and ex.spans == [] and np.array_equal(ex.ids, ids)
    assert len(cm3_transform(ids, V, rng, poisson_lambda=0.0, seq_len=32).ids) == 32


def test_rejects_already_transformed_input():
    with pytest.raises(ValueError, match="sentinel"):
        cm3_transform(np.array([5, 6, S0, 7]), V, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D integer"):
        cm3_transform(np.zeros((2, 3), dtype=np.int64), V, np.random.default_rng(0))


# ---- span rules over many random documents -----------------------------------------------------
def check_spans(ids, ex, allow_cross_break=False):
    spans = ex.spans
    assert spans == sorted(spans)
    for (_, e), (s2, _) in zip(spans, spans[1:]):
        assert e <= s2, f"overlapping spans {spans}"
    for s, e in spans:
        assert 1 <= s < e <= len(ids), f"span {(s, e)} outside the block or covers position 0"
        span = ids[s:e]
        assert not np.isin(span, [PAD_ID, EOS_ID, 0]).any(), "span covers a special token"
        if not allow_cross_break:
            assert not (span == BRK).any(), f"span {(s, e)} crosses a <break>"
            # lies inside one maskable segment
            assert any(a <= s and e <= b for a, b in maskable_segments(ids, V))


def test_span_rules_and_inverse_round_trip():
    rng = np.random.default_rng(1234)
    n_masked = 0
    for i in range(2000):
        ids = random_document(rng)
        ex = cm3_transform(ids, V, rng, poisson_lambda=1.5, truncate=False)
        check_spans(ids, ex)
        n_masked += ex.n_spans > 0
        assert len(ex.ids) == len(ids) + 3 * ex.n_spans and ex.truncated == 0
        assert np.array_equal(cm3_inverse(ex.ids, V), ids)
        if i % 10 == 0:  # truncated to the block: the same sequence cut at len(ids)
            ex_cut = cm3_transform(ids, V, np.random.default_rng(i), poisson_lambda=1.5)
            full = cm3_transform(ids, V, np.random.default_rng(i), poisson_lambda=1.5, truncate=False)
            assert np.array_equal(ex_cut.ids, full.ids[: len(ids)])
            assert ex_cut.truncated == len(full.ids) - len(ids)
    assert n_masked > 1000  # the test exercised masking


def test_sentinels_in_place_then_appended_in_order():
    rng = np.random.default_rng(5)
    for _ in range(300):
        ids = plain_text(200, rng)
        ex = cm3_transform(ids, V, rng, poisson_lambda=3.0, truncate=False)
        k = ex.n_spans
        sent = np.flatnonzero(V.is_sentinel(ex.ids))
        assert ex.ids[sent].tolist() == [S0 + i for i in range(k)] * 2
        eoss = np.flatnonzero(ex.ids == EOSS)
        assert len(eoss) == k and (k == 0 or eoss[-1] == len(ex.ids) - 1)
        for i, (s, e) in enumerate(ex.spans):  # appended span i is the original tokens
            start = sent[k + i] + 1
            assert np.array_equal(ex.ids[start : start + e - s], ids[s:e])


def test_cross_break_option():
    rng = np.random.default_rng(3)
    ids = np.array([EOS_ID] + ([5, 6, 7, BRK] + list(range(100, 110)) + [BRK]) * 8, dtype=np.int64)
    crossed = 0
    for _ in range(500):
        ex = cm3_transform(ids, V, rng, allow_cross_break=True, truncate=False)
        check_spans(ids, ex, allow_cross_break=True)
        crossed += any((ids[s:e] == BRK).any() for s, e in ex.spans)
        assert np.array_equal(cm3_inverse(ex.ids, V), ids)
    assert crossed > 100


def test_span_clipped_to_segment_it_overlaps_most():
    # segments [1, 4) and [5, 15), like metaseq's TestAdjustSpans
    ids = np.array([EOS_ID, 5, 6, 7, BRK] + list(range(100, 110)), dtype=np.int64)
    assert maskable_segments(ids, V) == [(1, 4), (5, 15)]
    clip = lambda spans: _clip_to_segments(spans, ids, BRK)  # noqa: E731
    assert clip([(2, 9)]) == [(5, 9)]  # overlaps 2 vs 4
    assert clip([(0, 6)]) == [(1, 4)]  # 3 vs 1 (position 0 excluded)
    assert clip([(3, 6)]) == [(3, 4)]  # tie: the first segment
    assert clip([(1, 3), (6, 8)]) == [(1, 3), (6, 8)]  # inside: unchanged
    assert clip([(4, 5), (0, 1)]) == []  # only on <break> / position 0: dropped
    rng = np.random.default_rng(0)
    n = 0
    for _ in range(300):
        ex = cm3_transform(ids, V, rng, poisson_lambda=2.0)
        check_spans(ids, ex)
        n += ex.n_spans
    assert n > 200
    # whole-segment rotation: exactly one span, a full segment, both segments drawn
    seen = {tuple(cm3_transform(ids, V, rng, rotation_rate=1.0).spans[0]) for _ in range(50)}
    assert seen == {(1, 4), (5, 15)}


def test_position_zero_never_masked():
    rng = np.random.default_rng(9)
    ids = plain_text(8, rng)  # short blocks: endpoints often round to 0
    for _ in range(2000):
        assert all(s >= 1 for s, _ in cm3_transform(ids, V, rng, poisson_lambda=2.0).spans)


# ---- statistics over 10,000 draws --------------------------------------------------------------
def reference_n_spans(length, lam, rng):
    """metaseq's get_spans_to_mask written plainly, counting kept spans (position 0 excluded)."""
    n = min(rng.poisson(lam), 511)
    if n == 0:
        return 0
    cands = []
    for _ in range(1 if n == 1 else n * n):
        a, b = sorted(rng.uniform(size=2))
        cands.append((int(a * length), int(b * length + 0.5)))
    kept = []
    for s, e in reversed(cands):
        if e <= s:
            continue
        if not any(max(s, ks) < min(e, ke) for ks, ke in kept):
            kept.append((s, e))
        if len(kept) == n:
            break
    return sum(1 for s, e in kept if max(s, 1) < e)


def test_statistics_10k_draws():
    rng = np.random.default_rng(2024)
    ids = plain_text(1024, rng)
    N = 10_000
    counts = np.array([cm3_transform(ids, V, rng).n_spans for _ in range(N)])
    # share of plain causal blocks ~ P(Poisson(1) = 0) = e^-1 (+ ~1/(2L) for empty n=1 spans)
    p0, p = math.exp(-1), (counts == 0).mean()
    se = math.sqrt(p0 * (1 - p0) / N)
    assert abs(p - p0) < 4 * se + 1e-3, (p, p0, se)
    # mean span count agrees with a plain re-implementation of metaseq's sampler
    ref = np.array([reference_n_spans(1024, 1.0, rng) for _ in range(N)])
    se_diff = math.sqrt(counts.var() / N + ref.var() / N)
    assert abs(counts.mean() - ref.mean()) < 4 * se_diff, (counts.mean(), ref.mean())
    assert 0.6 < counts.mean() < 1.0  # overlaps make it < E[n] = 1


def test_clamp_bounds():
    rng = np.random.default_rng(1)
    ids = plain_text(512, rng)
    always = [cm3_transform(ids, V, rng, min_spans=1).n_spans for _ in range(2000)]
    assert np.mean(np.array(always) == 0) < 0.01  # CM3 paper's clamp(.., 1, 16): (almost) always masked
    assert max(cm3_transform(ids, V, rng, poisson_lambda=5.0, max_spans=2).n_spans for _ in range(500)) == 2
    with pytest.raises(ValueError, match="min_spans"):
        cm3_transform(ids, V, rng, min_spans=3, max_spans=2)
    few = Vocab(text_size=100, n_image_codes=64, n_sentinels=2)  # caps max_spans=511 at 2 sentinels
    assert max(cm3_transform(ids, few, rng, poisson_lambda=5.0).n_spans for _ in range(200)) == 2


# ---- loss mask ---------------------------------------------------------------------------------
def test_loss_mask():
    ids = np.array([10, S0, 13, S0, 11, EOSS, PAD_ID, PAD_ID])
    assert loss_mask(ids, V).tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert loss_mask(ids, V, zero_sentinel_loss=True).tolist() == [1, 0, 1, 0, 1, 1, 0, 0]
    t = torch.as_tensor(ids)[None]
    assert torch.equal(loss_mask(t, V, True), torch.as_tensor(loss_mask(ids, V, True))[None])


def test_inverse_rejects_truncated_span():
    ex = cm3_apply_spans(np.arange(4, 20), [(2, 10)], V)  # the appended span loses its <eoss>
    with pytest.raises(ValueError, match="truncated"):
        cm3_inverse(ex.ids, V)


def test_returns_dataclass():
    ex = cm3_transform(np.arange(4, 40), V, np.random.default_rng(0))
    assert isinstance(ex, Cm3Example) and ex.ids.dtype == np.int64 and ex.n_spans == len(ex.spans)


@pytest.mark.slow
def test_speed_4k_document():
    """Cost per 4k-token paper-vocabulary document (a loose bound: the target is < 50 us on an idle core)."""
    vocab = Vocab.paper()
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(100):
        parts = [[EOS_ID]]
        while sum(map(len, parts)) < 4096:
            parts += [
                rng.integers(4, 56_320, 20),
                [vocab.break_id],
                rng.integers(*vocab.image_id_range, 1024),
                [vocab.break_id],
            ]
        docs.append(np.concatenate(parts)[:4096].astype(np.int64))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for d in docs:
            cm3_transform(d, vocab, rng)
        best = min(best, (time.perf_counter() - t0) / len(docs))
    assert best < 500e-6, f"{best * 1e6:.0f} us per document"
