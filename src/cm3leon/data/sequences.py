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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cm3leon.vocab import EOS_ID, Vocab

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
    brk = np.array([vocab.break_id], dtype=np.int64)
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

    docs = [document_ids(d, vocab, image_first=False) for d in retrieved]
    total = len(q) + framing + sum(len(d) + 1 for d in docs)  # +1: the <break> after each retrieved doc
    while docs and total > seq_len:
        total -= len(docs[0]) + 1
        docs.pop(0)  # drop the first (farthest from the query) document first

    parts = [eos]
    for d in docs:
        parts += [d, brk]
    parts += [q, eos]
    return np.concatenate(parts), len(docs)


def pad_batch(seqs: list[np.ndarray], pad_id: int, pad_to: int | None = None) -> np.ndarray:
    """Right-pad int sequences to the longest one (or `pad_to`): int64 [B, T]."""
    width = max(len(s) for s in seqs) if pad_to is None else pad_to
    out = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out
