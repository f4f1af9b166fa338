"""Build training sequences in the paper's layout (PAPER.md section 1).

A document is one image-caption pair in one of two orders:

    caption -> image:   T <break> I          (text-to-image; the zero-shot prompt is `</s> T <break>`)
    image -> caption:   I <break> T          (image-to-text)

A training sequence puts the retrieved documents first and the query document last, every
document separated by `<break>`, inside `</s> ... </s>`:

    </s> T1 <break> I1 <break> T2 <break> I2 <break> Tq <break> Iq </s>

Over-length policy (the paper's 3 retrieved docs + query is ~4.2k tokens for a 4,096 context):
whole retrieved documents are dropped, first (farthest from the query) first, until the sequence
fits; images are never cut. If the query alone is still too long, its caption is truncated
from the end. A context that cannot hold one image plus its framing is a configuration error.

Generation uses the same layout, cut where the model takes over (`text_to_image_prompt`,
`unconditional_prompt`, `edit_prompts`, `infill_prompt`, `caption_prompt`): training and
generation read the document order and the framing from this one module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cm3leon.objective import cm3_apply_spans
from cm3leon.vocab import EOS_ID, UNK_ID, Vocab

IGNORE_INDEX = -100


@dataclass
class Document:
    """One image-caption pair as token arrays: `text_ids` are BPE ids, `codes` raw image codes."""

    text_ids: np.ndarray
    codes: np.ndarray


def document_ids(doc: Document, vocab: Vocab, image_first: bool, max_text: int | None = None) -> np.ndarray:
    """[T <break> I] or [I <break> T] as vocabulary ids (int64)."""
    text = np.asarray(doc.text_ids, dtype=np.int64)[:max_text]
    image = vocab.codes_to_ids(np.asarray(doc.codes, dtype=np.int64))
    brk = np.array([vocab.break_id], dtype=np.int64)
    parts = (image, brk, text) if image_first else (text, brk, image)
    return np.concatenate(parts)


def build_sequence(
    query: Document,
    retrieved: list[Document],
    vocab: Vocab,
    seq_len: int,
    image_first: bool = False,
) -> tuple[np.ndarray, int]:
    """The paper's layout for one example, fitted to `seq_len`.

    Returns (ids int64 [n <= seq_len], number of retrieved documents kept). Retrieved documents are
    always caption -> image; `image_first` sets the query's order.
    """
    eos = np.array([EOS_ID], dtype=np.int64)
    q = document_ids(query, vocab, image_first)
    framing = 2  # </s> ... </s>
    if len(q) + framing > seq_len:
        overflow = len(q) + framing - seq_len
        keep_text = len(query.text_ids) - overflow
        if keep_text < 1:
            raise ValueError(
                f"seq_len={seq_len} cannot hold one image ({len(query.codes)} tokens) plus a caption and framing; "
                "raise data.seq_len"
            )
        q = document_ids(query, vocab, image_first, max_text=keep_text)

    docs = _fit([document_ids(d, vocab, image_first=False) for d in retrieved], seq_len - len(q) - framing)
    return np.concatenate([_prefix(docs, vocab), q, eos]), len(docs)


def insert_retrieved(
    ids: np.ndarray, mask: np.ndarray | None, retrieved: Sequence[Document], vocab: Vocab, seq_len: int
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Put retrieved documents into a built sequence `</s> ... </s>` right after its opening `</s>`,
    where `build_sequence` lays them (an instruction sequence's own pairs stay nearest the end),
    dropping the farthest first until it fits `seq_len`.

    ids int64 [n]; mask: bool [n] target mask or None (the documents are never targets).
    Returns (ids [n + added], mask [n + added] or None, documents kept)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0 or ids[0] != EOS_ID:
        raise ValueError(
            "insert_retrieved: the sequence must open with </s> (a build_sequence / build_sft_sequence one)"
        )
    docs = _fit([document_ids(d, vocab, image_first=False) for d in retrieved], seq_len - len(ids))
    if not docs:
        return ids, mask, 0
    prefix = _prefix(docs, vocab)  # </s> D1 <break> ... : replaces the opening </s>
    out = np.concatenate([prefix, ids[1:]])
    if mask is not None:
        mask = np.concatenate([np.asarray(mask[:1], dtype=bool), np.zeros(len(prefix) - 1, dtype=bool), mask[1:]])
    return out, mask, len(docs)


def _fit(docs: list[np.ndarray], room: int) -> list[np.ndarray]:
    """The documents that fit in `room` tokens (each with its <break>), the first (farthest from
    the query) dropped first."""
    total = sum(len(d) + 1 for d in docs)
    while docs and total > room:
        total -= len(docs[0]) + 1
        docs = docs[1:]
    return docs


def _prefix(docs: Sequence[np.ndarray], vocab: Vocab) -> np.ndarray:
    """`</s> D1 <break> D2 <break> ...`: the opening and the retrieved documents (as id arrays)."""
    parts = [np.array([EOS_ID], dtype=np.int64)]
    for d in docs:
        parts += [d, np.array([vocab.break_id], dtype=np.int64)]
    return np.concatenate(parts)


# ---- prompts: the same layout, cut where the model takes over -----------------------------------
def retrieved_prefix(retrieved: Sequence[Document] | None, vocab: Vocab) -> list[int]:
    """`</s> T1 <break> I1 <break> ...`: the retrieved documents before the query, as in training."""
    return _prefix([document_ids(d, vocab, image_first=False) for d in retrieved or ()], vocab).tolist()


def text_to_image_prompt(text_ids, vocab: Vocab, retrieved: Sequence[Document] | None = None) -> list[int]:
    """The zero-shot prompt `</s> [retrieved docs] caption <break>` as ids."""
    return retrieved_prefix(retrieved, vocab) + [*map(int, text_ids), vocab.break_id]


def unconditional_prompt(vocab: Vocab, retrieved: Sequence[Document] | None = None) -> list[int]:
    """CFG's unconditional stream `</s> [retrieved docs] <sentinel:0> <break>` (the caption dropped)."""
    return retrieved_prefix(retrieved, vocab) + [vocab.sentinel_id(0), vocab.break_id]


def edit_prompts(
    prefix_ids, source_codes, instruction_ids, vocab: Vocab, retrieved: Sequence[Document] | None = None
) -> tuple[list[int], list[int], list[int]]:
    """The three instruct-CFG streams for the editing template (PAPER.md section 7):
    full     `</s> [docs] prefix <break> I_src <break> instruction <break>`
    img_cond `</s> [docs] prefix <break> I_src <break> <sentinel:0> <break>`   (instruction dropped)
    uncond   `</s> [docs] <sentinel:0> <break>`                                 (everything dropped)
    [docs]: the retrieved documents, kept in every stream as pretraining's CFG keeps them."""
    source = vocab.codes_to_ids(np.asarray(source_codes, dtype=np.int64)).tolist()
    head = [*retrieved_prefix(retrieved, vocab), *map(int, prefix_ids), vocab.break_id, *source, vocab.break_id]
    full = head + [*map(int, instruction_ids), vocab.break_id]
    img_cond = head + [vocab.sentinel_id(0), vocab.break_id]
    return full, img_cond, unconditional_prompt(vocab, retrieved)


def infill_prompt(ids, spans: Sequence[tuple[int, int]], vocab: Vocab) -> list[int]:
    """CM3 infilling prompt: mask `spans` of `ids` (cm3_apply_spans) and stop right after the first
    appended `<sentinel:0>`, where the model writes span 0 up to `<eoss>`. What the spans hold in
    `ids` is irrelevant (a placeholder)."""
    ex = cm3_apply_spans(np.asarray(ids, dtype=np.int64), spans, vocab, truncate=False)
    out = ex.ids.tolist()
    s0 = vocab.sentinel_id(0)
    first = out.index(s0)
    return out[: out.index(s0, first + 1) + 1]


def caption_prompt(
    codes,
    vocab: Vocab,
    text_before: Sequence[int] = (),
    text_after: Sequence[int] = (),
    image_first: bool = False,
    retrieved: Sequence[Document] | None = None,
) -> list[int]:
    """Image -> text by infilling: the query document `text_before <span> text_after <break> I` (or
    the image first) with the span masked, cut after the appended `<sentinel:0>` where the model
    writes the text up to `<eoss>`:
    `</s> [retrieved docs] text_before <sentinel:0> text_after <break> I </s> <sentinel:0>`."""
    text = [*map(int, text_before), UNK_ID, *map(int, text_after)]  # UNK_ID: the span's placeholder
    image = vocab.codes_to_ids(np.asarray(codes, dtype=np.int64)).tolist()
    doc = [*image, vocab.break_id, *text] if image_first else [*text, vocab.break_id, *image]
    prefix = retrieved_prefix(retrieved, vocab)
    start = len(prefix) + (len(image) + 1 if image_first else 0) + len(text_before)
    return infill_prompt(prefix + doc + [EOS_ID], [(start, start + 1)], vocab)


def image_infill_prompt(codes, spans: Sequence[tuple[int, int]], vocab: Vocab, text_ids=None) -> list[int]:
    """Regenerate code spans [(start, end), ...] of an image: `</s> [caption <break>] I </s>` with the
    spans masked, cut after the appended `<sentinel:0>`."""
    text = [] if text_ids is None else [*map(int, text_ids), vocab.break_id]
    off = 1 + len(text)
    seq = [EOS_ID, *text, *vocab.codes_to_ids(np.asarray(codes, dtype=np.int64)).tolist(), EOS_ID]
    return infill_prompt(seq, [(s + off, e + off) for s, e in spans], vocab)


def pad_batch(seqs: list[np.ndarray], pad_id: int, pad_to: int | None = None) -> np.ndarray:
    """Right-pad int sequences to the longest one (or `pad_to`): int64 [B, T]."""
    width = max(len(s) for s in seqs) if pad_to is None else pad_to
    out = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out
