"""Sequence packing: several whole training examples share one fixed-length row.

Why: one CM3Leon training example is one RA-CM3 sequence, `</s> retrieved docs <break> query </s>`
(`sequences.build_sequence`): one query document with its retrieved documents. At 256 px a
document is ~1,100 tokens, so an example is ~1.1k tokens without retrieval and ~3.3k with two
retrieved documents: padded to the 4,096 context, most of a batch would be padding (and batches
padded to their longest sequence have variable shapes, which defeats compiled kernels). metaseq
packs token streams into fixed blocks; here a block is filled with several *whole* examples
instead, so that

- an example is never split across rows (a query stays with its retrieved documents, and the
  over-length policy of `build_sequence` stays the only place where documents are dropped);
- CM3 masking stays per example: examples are packed after `cm3_transform`, so no masked span
  crosses from one example into another;
- attention never crosses examples: `doc_ids` makes the model's attention block-diagonal causal
  (`CM3LeonLM.forward(..., doc_ids=...)`), and `positions` restart at 0 per example, so each
  example gets exactly the logits it would get alone;
- the loss never crosses examples: the target after an example's last token (the next example's
  first token) carries no loss, as an unpacked example's last token is never an input.

A row holds `seq_len + 1` tokens: inputs are `ids[:, :-1]`, targets `ids[:, 1:]` (the same shift as
unpacked batches), so an example of up to `seq_len + 1` tokens fits, as unpacked. Packing is greedy
first-fit in the examples' order: deterministic, so the data stream's exact resume is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_DOC = -1  # the doc id of padding: an id of its own, so padding attends only to padding


@dataclass
class PackedRows:
    """Packed examples. All arrays have R rows; `ids`, `positions`, `doc_ids` are the full rows of
    seq_len + 1 tokens (inputs = [:, :-1], targets = [:, 1:]); `target_mask` [R, seq_len] is
    True where target [:, 1:] belongs to the same example as its input (not padding, not the
    next example's first token). `placement[i] = (row, start)` of example i."""

    ids: np.ndarray  # int64 [R, seq_len + 1]
    positions: np.ndarray  # int64 [R, seq_len + 1], restarting at 0 per example (0 on padding)
    doc_ids: np.ndarray  # int64 [R, seq_len + 1]: index of the example in `examples`, PAD_DOC on padding
    target_mask: np.ndarray  # bool [R, seq_len]
    placement: list[tuple[int, int]]

    @property
    def inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input ids, positions, doc ids), each [R, seq_len]."""
        return self.ids[:, :-1], self.positions[:, :-1], self.doc_ids[:, :-1]

    @property
    def targets(self) -> np.ndarray:
        return self.ids[:, 1:]


def first_fit(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """Greedy first-fit: each length, in order, goes to the first row with room. -> (row, start)."""
    free: list[int] = []
    out = []
    for n in lengths:
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit a packed row of {capacity} tokens")
        r = next((r for r, room in enumerate(free) if room >= n), len(free))
        if r == len(free):
            free.append(capacity)
        out.append((r, capacity - free[r]))
        free[r] -= n
    return out


def pack_examples(examples: list[np.ndarray], seq_len: int, pad_id: int, min_rows: int = 0) -> PackedRows:
    """Pack whole examples (int id arrays, already laid out and CM3-transformed) into rows of
    seq_len + 1 tokens by greedy first-fit; at least `min_rows` rows (extra ones all padding)."""
    if not examples:
        raise ValueError("pack_examples needs at least one example")
    capacity = seq_len + 1
    placement = first_fit([len(e) for e in examples], capacity)
    R = max(min_rows, 1 + max(r for r, _ in placement))
    ids = np.full((R, capacity), pad_id, dtype=np.int64)
    positions = np.zeros((R, capacity), dtype=np.int64)
    doc_ids = np.full((R, capacity), PAD_DOC, dtype=np.int64)
    for i, (ex, (r, start)) in enumerate(zip(examples, placement)):
        n = len(ex)
        ids[r, start : start + n] = ex
        positions[r, start : start + n] = np.arange(n)
        doc_ids[r, start : start + n] = i
    target_mask = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] != PAD_DOC)
    return PackedRows(ids, positions, doc_ids, target_mask, placement)
