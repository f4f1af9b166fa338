"""The CM3 causal-masked objective as pure functions on 1-D int64 id arrays (PAPER.md section 3).

One training block `ids` becomes, for spans (s_0, e_0) < (s_1, e_1) < ... of the original:

    ids[:s_0] <sentinel:0> ids[e_0:s_1] <sentinel:1> ... ids[e_last:]          (spans cut out in place)
    <sentinel:0> ids[s_0:e_0] <eoss> <sentinel:1> ids[s_1:e_1] <eoss> ...      (appended in order)

truncated back to the block length (each span adds 3 tokens, so the tail of the last appended span
is what gets cut). The model then learns plain next-token prediction on this sequence: left-to-right
generation plus infilling of the masked spans with bidirectional context.

Sampling (Meta's metaseq `CausalMaskedDocumentToSequenceDataset`, plus CM3Leon's <break> rule):
- n ~ Poisson(poisson_lambda), clamped to [min_spans, max_spans] (the code: [0, 511]; the CM3
  paper: [1, 16]). About e^-1 = 37% of blocks get no span and stay plain causal LM examples.
- n == 1: two endpoints uniform over the block, start rounded down, end rounded to nearest.
  n > 1: n^2 such candidate spans, greedily kept (last drawn first) while they do not overlap an
  already kept span, until n are kept. Empty candidates are dropped.
- Spans never cover position 0, `<break>`, `</s>`, `<s>` or `<pad>`: the block is cut into
  "segments" (maximal runs of maskable tokens: between two <break>s, one caption or one image) and
  each span is clipped to the segment it overlaps most (metaseq's `adjust_spans`); a span that
  overlaps no segment is dropped. So a span never crosses a <break>. With allow_cross_break=True
  (the CM3 paper's behaviour) <break> is an ordinary maskable token and only </s>, <s>, <pad> and
  position 0 delimit segments.
- Whole-segment rotation (rotation_rate, default 0: the paper gives no number): with this
  probability the block instead gets exactly one span, a whole segment chosen uniformly (e.g. the
  complete image between two <break>s, or the complete caption). This is the explicit way to teach
  image infilling / image-to-text with the full other modality as context; with rate 0 such
  examples still arise, only rarely, from the uniform endpoints.

Trailing `<pad>` tokens of the input are kept at the end and absorb the growth first. The input must
not already contain `<eoss>` or sentinels (so that the transform is invertible).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cm3leon.vocab import EOS_ID, PAD_ID, Vocab


@dataclass
class Cm3Example:
    """Result of `cm3_transform`.

    ids:       int64 [<= seq_len] the transformed block
    spans:     [(start, end), ...] half-open spans of the *original* ids, sorted, non-overlapping
    n_spans:   len(spans)
    truncated: how many tokens of the transformed sequence were cut to fit the block (pads first)
    """

    ids: np.ndarray
    spans: list[tuple[int, int]] = field(default_factory=list)
    n_spans: int = 0
    truncated: int = 0


def _blocked_positions(ids: np.ndarray, upper: int, start: int = 0, end: int | None = None) -> list[int]:
    """Sorted positions in [start, end) that no span may cover: position 0 and ids outside [3, upper)
    (<s>, <pad>, </s>, then <break> (unless it is `upper`), <eoss>, sentinels)."""
    sub = ids[start:end]
    # The Vocab layout puts the specials at 0..2 and <break> at base_size, so maskable ids form one
    # interval; the unsigned view turns the two-sided test into one compare.
    blocked = ((sub - (EOS_ID + 1)).view(np.uint64) >= upper - (EOS_ID + 1)).nonzero()[0]
    out = (blocked + start).tolist()
    if start == 0 and (not out or out[0] != 0):
        out.insert(0, 0)  # position 0 is never masked
    return out


def _segments(blocked: list[int], n: int) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of maskable positions in [0, n), given all blocked ones (0 included)."""
    bounds = blocked + [n]
    return [(a + 1, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a + 1]


def _upper(vocab: Vocab, allow_cross_break: bool) -> int:
    return vocab.eoss_id if allow_cross_break else vocab.break_id


def maskable_segments(ids, vocab: Vocab, allow_cross_break: bool = False) -> list[tuple[int, int]]:
    """Segments spans may cover: half-open runs between position 0, <s>, <pad>, </s> and <break>
    (<break> is maskable when allow_cross_break). <eoss>/sentinels are never maskable."""
    ids = np.asarray(ids, dtype=np.int64)
    return _segments(_blocked_positions(ids, _upper(vocab, allow_cross_break)), len(ids))


def _sample_spans(length: int, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to n non-overlapping spans with endpoints uniform over [0, length] (metaseq's rule):
    start rounded down, end rounded to nearest; for n > 1, n^2 candidates kept greedily."""
    u = (rng.random(2 if n == 1 else 2 * n * n) * length).tolist()
    cand = []
    for x, y in zip(u[0::2], u[1::2]):
        if x > y:
            x, y = y, x
        s, e = int(x), int(y + 0.5)
        if e > s:
            cand.append((s, e))
    if n == 1:
        return cand
    kept: list[tuple[int, int]] = []
    for s, e in reversed(cand):  # metaseq pops candidates from the end
        if all(e <= ks or s >= ke for ks, ke in kept):
            kept.append((s, e))
            if len(kept) == n:
                break
    return kept


def _clip_to_segments(spans: list[tuple[int, int]], ids: np.ndarray, upper: int) -> list[tuple[int, int]]:
    """Clip each span to the segment it overlaps most (the first such one, as metaseq's
    `adjust_spans`), i.e. to its longest piece between blocked positions; drop spans with none.
    Only the tokens under the spans are scanned."""
    out = []
    for s, e in spans:
        best, prev = (s, s), s
        for p in _blocked_positions(ids, upper, s, e) + [e]:
            if p - prev > best[1] - best[0]:
                best = (prev, p)
            prev = p + 1
        if best[1] > best[0]:
            out.append(best)
    return out


def cm3_transform(
    ids,
    vocab: Vocab,
    rng: np.random.Generator,
    *,
    poisson_lambda: float = 1.0,
    min_spans: int = 0,
    max_spans: int = 511,
    allow_cross_break: bool = False,
    rotation_rate: float = 0.0,
    seq_len: int | None = None,
    truncate: bool = True,
) -> Cm3Example:
    """Apply the CM3 causal-mask transform to one block of ids (see the module docstring).

    Args:
        ids: int array [L], one training block (trailing <pad> allowed).
        vocab: the id table (sentinel / <eoss> / <break> ids).
        rng: numpy Generator; the only source of randomness.
        poisson_lambda, min_spans, max_spans: n ~ clamp(Poisson(lambda), min_spans, max_spans),
            max_spans further capped by the vocabulary's sentinel count;
            poisson_lambda=0 with min_spans=0 turns the objective off (plain causal LM).
        allow_cross_break: let spans cover and cross <break> (CM3); False is CM3Leon's rule.
        rotation_rate: probability that the block's one span is a whole segment.
        seq_len: length to truncate the result to (default: the input length).
        truncate: False keeps the whole transformed sequence (for tests and inspection).
    Returns:
        Cm3Example with the transformed int64 ids and the spans (in original coordinates).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"cm3_transform expects a 1-D integer id array, got {ids.dtype} {ids.shape}")
    if not 0 <= min_spans <= max_spans or min_spans > vocab.n_sentinels:
        raise ValueError(
            f"need 0 <= min_spans={min_spans} <= max_spans={max_spans} and min_spans <= n_sentinels={vocab.n_sentinels}"
        )
    max_spans = min(max_spans, vocab.n_sentinels)  # a vocabulary with fewer sentinels caps the count
    ids = ids.astype(np.int64, copy=False)
    L = len(ids)
    if L and ids.max() >= vocab.eoss_id:
        raise ValueError("cm3_transform input already holds <eoss>/sentinel ids; pass the untransformed block")
    upper = _upper(vocab, allow_cross_break)
    # trailing pads are set aside (never masked) and put back at the end
    n_content = L
    if L and ids[-1] == PAD_ID:
        nz = (ids != PAD_ID).nonzero()[0]
        n_content = int(nz[-1]) + 1 if len(nz) else 0

    spans: list[tuple[int, int]] = []
    if rotation_rate > 0 and rng.random() < rotation_rate:
        segments = _segments(_blocked_positions(ids, upper, 0, n_content), n_content)
        if segments:
            spans = [segments[int(rng.integers(len(segments)))]]
    else:
        n = min(max(int(rng.poisson(poisson_lambda)) if poisson_lambda > 0 else 0, min_spans), max_spans)
        if n and n_content:
            spans = _clip_to_segments(_sample_spans(n_content, n, rng), ids, upper)
    return cm3_apply_spans(ids, spans, vocab, seq_len=seq_len, truncate=truncate, n_content=n_content)


def cm3_apply_spans(
    ids, spans, vocab: Vocab, *, seq_len: int | None = None, truncate: bool = True, n_content: int | None = None
) -> Cm3Example:
    """Deterministic half of `cm3_transform`: mask the given spans [(start, end), ...].

    Spans must be non-empty, non-overlapping and inside the non-pad content; they are numbered in
    start order. Also the way to build an infilling prompt by hand (e.g. the answer span of VQA).
    """
    ids = np.asarray(ids, dtype=np.int64)
    L = len(ids)
    out_len = L if seq_len is None else seq_len
    if n_content is None:
        nz = np.flatnonzero(ids != PAD_ID)
        n_content = int(nz[-1]) + 1 if len(nz) else 0
    spans = sorted((int(s), int(e)) for s, e in spans)
    if not spans:
        cut = max(0, L - out_len) if truncate else 0
        return Cm3Example(ids=ids[: L - cut].copy(), truncated=cut)
    ends = [0] + [e for _, e in spans]
    if any(e <= s or s < prev for (s, e), prev in zip(spans, ends)) or spans[-1][1] > n_content:
        raise ValueError(f"cm3_apply_spans: spans {spans} must be non-empty, non-overlapping, inside [0, {n_content})")
    k = len(spans)
    if k > vocab.n_sentinels:
        raise ValueError(f"cm3_apply_spans: {k} spans but only {vocab.n_sentinels} sentinels")
    total = L + 3 * k  # each span: -len+1 in place, +len+2 appended
    out = np.empty(total, dtype=np.int64)
    pos, prev = 0, 0
    app = n_content + k - sum(e - s for s, e in spans)  # where the appended spans start
    for i, (s, e) in enumerate(spans):
        # part 1: the block with each span replaced by its sentinel
        out[pos : pos + s - prev] = ids[prev:s]
        pos += s - prev
        out[pos] = vocab.first_sentinel_id + i
        pos += 1
        prev = e
        # part 2: "<sentinel:i> span <eoss>" appended in order
        out[app] = vocab.first_sentinel_id + i
        out[app + 1 : app + 1 + e - s] = ids[s:e]
        out[app + 1 + e - s] = vocab.eoss_id
        app += e - s + 2
    out[pos : pos + n_content - prev] = ids[prev:n_content]
    out[n_content + 3 * k :] = PAD_ID  # the input's trailing pads
    cut = max(0, total - out_len) if truncate else 0
    return Cm3Example(ids=out[: total - cut] if cut else out, spans=spans, n_spans=k, truncated=cut)


def cm3_inverse(ids, vocab: Vocab) -> np.ndarray:
    """Undo `cm3_transform`: put every appended span back in place of its sentinel.

    Restores the original ids exactly when nothing was truncated (trailing pads included when the
    transform ran with truncate=False). Raises ValueError when a span's `<eoss>` was cut off.
    """
    ids = np.asarray(ids, dtype=np.int64)
    sent = np.flatnonzero(vocab.is_sentinel(ids))
    if len(sent) == 0:
        return ids.copy()
    k = len(sent) // 2
    eoss = np.flatnonzero(ids == vocab.eoss_id)
    expected = vocab.first_sentinel_id + np.arange(k)
    if (
        len(sent) != 2 * k
        or len(eoss) != k
        or not np.array_equal(ids[sent[:k]], expected)
        or not np.array_equal(ids[sent[k:]], expected)
        or not np.all(eoss > sent[k:])
    ):
        raise ValueError("cm3_inverse: sequence is not a complete CM3 transform (truncated inside a span?)")
    pieces, prev = [], 0
    for i in range(k):
        pieces.append(ids[prev : sent[i]])
        pieces.append(ids[sent[k + i] + 1 : eoss[i]])
        prev = sent[i] + 1
    pieces.append(ids[prev : sent[k]])
    pieces.append(ids[eoss[-1] + 1 :])  # trailing pads
    return np.concatenate(pieces)


def loss_mask(ids, vocab: Vocab, zero_sentinel_loss: bool = False):
    """Which target tokens carry loss: [.., T] bool, same type as ids (numpy array or torch tensor).

    Every non-pad target (retrieved documents included: PAPER.md section 3). With
    zero_sentinel_loss (CM3) targets that are `<sentinel:i>` get no loss either; <eoss> keeps its
    loss so the model learns where an infilled span ends. CM3Leon-era code: False.
    """
    mask = ids != PAD_ID
    if zero_sentinel_loss:
        mask = mask & ~vocab.is_sentinel(ids)
    return mask
