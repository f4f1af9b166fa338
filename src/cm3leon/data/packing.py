"""Sequence packing: training examples fill fixed rows of `seq_len + 1` tokens, in stream order.

Why: one CM3Leon training example is one RA-CM3 sequence, `</s> retrieved docs <break> query </s>`
(`sequences.build_sequence`): one query document with its retrieved documents. At 256 px a
document is ~1,045 tokens, so an example is ~1.05k tokens without retrieval and ~3.1k with two
retrieved documents: padded to the 4,096 context, a large share of every batch is padding (and
batches padded to their longest sequence have variable shapes, which defeats compiled kernels).
Packed, every batch is `[micro_batch_size, seq_len]` and

- attention never crosses examples: `doc_ids` makes the model's attention block-diagonal causal
  (`CM3LeonLM.forward(..., doc_ids=...)`), and `positions` restart at 0 per piece;
- CM3 masking stays per example: examples are packed after `cm3_transform`, so no masked span
  crosses from one example into another;
- the loss never crosses examples: the target after a piece's last token (the next piece's first
  token) carries no loss.

Two modes (`data.packing`):

- `whole`: examples are never cut. An example that does not fit the row's room closes the row
  (the rest is padding) and starts the next one. Every example gets exactly the logits it would get
  alone; but whole documents of ~1k tokens leave up to a document of padding per row: with k=2 a
  row holds one ~3.1k-token example, 23% padding.
- `split` (metaseq's token blocks, with document-aware attention): rows are filled to the last
  token; an example that does not fit is cut at the row's end and continues at the start of the
  next row, as a piece of its own. The continuation overlaps the cut by one token (its first input
  is the previous piece's last target), so every target of every example is trained exactly once;
  the continuation's tokens see only the continuation (the retrieved documents or the start of the
  query before the cut are in the previous row). Padding is only what a finite stream leaves in
  its last row: on paper-shaped data < 1% (README, training section). The paper recipes use it.

A row holds `seq_len + 1` tokens: inputs are `ids[:-1]`, targets `ids[1:]` (the shift of unpacked
batches), so an example of up to `seq_len + 1` tokens fits a row, as unpacked. Packing is a pure
function of the example stream, and every row records where the stream stands after it
(`stream_pos`), so a resumed stream restarts exactly at the next token (`TokenShardStream`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from cm3leon.errors import UsageError

PAD_DOC = -1  # the doc id of padding: an id of its own, so padding attends only to padding
PACKING_MODES = ("none", "whole", "split")


def packing_mode(value) -> str:
    """`data.packing` -> 'none' | 'whole' | 'split' (false or null: 'none')."""
    if value is None or value is False:
        return "none"
    if isinstance(value, str) and value in PACKING_MODES:
        return value
    raise UsageError(
        f"data.packing={value!r}: use none (one padded row per example), whole (examples packed whole, rows "
        "padded) or split (rows filled, examples cut at row ends; cm3leon/data/packing.py)"
    )


@dataclass
class Row:
    """One packed row. `ids`, `positions`, `doc_ids` [seq_len + 1]; `pieces[j] = (example, start,
    length, offset)`: piece j (doc id j) is tokens [offset, offset + length) of stream example
    `example`, placed at [start, start + length). `stream_pos = (example, offset)`: the next token
    to pack after this row (example index in the stream, token offset in it)."""

    ids: np.ndarray
    positions: np.ndarray
    doc_ids: np.ndarray
    pieces: list[tuple[int, int, int, int]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    n_retrieved: list[int] = field(default_factory=list)
    stream_pos: tuple[int, int] = (0, 0)


class RowPacker:
    """Packs a stream of examples ({'ids': int64 [n <= seq_len + 1], 'key', 'n_retrieved'}) into
    Rows of seq_len + 1 tokens; `split` cuts examples at row ends (see the module docstring)."""

    def __init__(self, seq_len: int, pad_id: int, split: bool):
        self.capacity, self.pad_id, self.split = seq_len + 1, pad_id, split

    def _empty(self) -> Row:
        cap = self.capacity
        return Row(
            ids=np.full(cap, self.pad_id, dtype=np.int64),
            positions=np.zeros(cap, dtype=np.int64),
            doc_ids=np.full(cap, PAD_DOC, dtype=np.int64),
        )

    def rows(self, examples: Iterable[dict], start: int = 0, offset: int = 0) -> Iterator[Row]:
        """Rows from `examples`, the stream's examples from index `start` on, whose first `offset`
        tokens are already in an earlier row (a resumed stream). A last, partly filled row is
        yielded when the examples end."""
        cap = self.capacity
        row, fill, index = self._empty(), 0, start
        for ex in examples:
            ids = np.asarray(ex["ids"])
            n = len(ids)
            if n > cap:
                raise ValueError(f"an example of {n} tokens does not fit a packed row of {cap} tokens")
            pos, offset = offset, 0
            while pos < n:
                room, length = cap - fill, n - pos
                if length > room:
                    if not self.split or room < 2:  # a piece needs 2 tokens to carry one target
                        row.stream_pos = (index, pos)
                        yield row
                        row, fill = self._empty(), 0
                        continue
                    length = room
                j = len(row.pieces)
                row.ids[fill : fill + length] = ids[pos : pos + length]
                row.positions[fill : fill + length] = np.arange(length)
                row.doc_ids[fill : fill + length] = j
                row.pieces.append((index, fill, length, pos))
                row.keys.append(ex.get("key", ""))
                row.n_retrieved.append(int(ex.get("n_retrieved", 0)))
                fill += length
                # a cut example continues with its piece's last token: that token's target is next
                pos = n if pos + length == n else pos + length - 1
                if fill == cap:
                    row.stream_pos = (index + (pos == n), 0 if pos == n else pos)
                    yield row
                    row, fill = self._empty(), 0
            index += 1
        if fill:
            row.stream_pos = (index, 0)
            yield row


@dataclass
class PackedRows:
    """Rows stacked: `ids`, `positions`, `doc_ids` [R, seq_len + 1] (inputs = [:, :-1], targets =
    [:, 1:]); `target_mask` [R, seq_len] is True where target [:, 1:] belongs to the same piece as
    its input (not padding, not the next piece's first token)."""

    ids: np.ndarray
    positions: np.ndarray
    doc_ids: np.ndarray
    target_mask: np.ndarray
    rows: list[Row]

    @property
    def inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input ids, positions, doc ids), each [R, seq_len]."""
        return self.ids[:, :-1], self.positions[:, :-1], self.doc_ids[:, :-1]

    @property
    def targets(self) -> np.ndarray:
        return self.ids[:, 1:]


def stack_rows(rows: list[Row]) -> PackedRows:
    """Stack Rows into arrays and mark the targets that carry loss."""
    ids = np.stack([r.ids for r in rows])
    positions = np.stack([r.positions for r in rows])
    doc_ids = np.stack([r.doc_ids for r in rows])
    target_mask = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] != PAD_DOC)
    return PackedRows(ids, positions, doc_ids, target_mask, rows)


def pack_examples(examples: list[np.ndarray], seq_len: int, pad_id: int, split: bool = False) -> PackedRows:
    """Pack a list of id arrays (already laid out and CM3-transformed) into rows of seq_len + 1."""
    if not examples:
        raise ValueError("pack_examples needs at least one example")
    packer = RowPacker(seq_len, pad_id, split)
    return stack_rows(list(packer.rows({"ids": e} for e in examples)))


def pad_fraction(lengths: Iterable[int], seq_len: int, split: bool) -> float:
    """Share of the input positions of packed rows that are padding, for examples of these lengths
    (the rows' input positions are seq_len each; a split example's overlap token counts once)."""
    lengths = list(lengths)
    rows = list(RowPacker(seq_len, 0, split).rows({"ids": np.zeros(n, dtype=np.int64)} for n in lengths))
    if len(rows) > 1:
        rows = rows[:-1]  # the stream's last row is a finite sample's artefact: a training stream has none
    return 1.0 - int(stack_rows(rows).target_mask.sum()) / (len(rows) * seq_len)
