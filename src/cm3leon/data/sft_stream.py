"""The SFT example stream: `TokenShardStream`'s readers, resume and packing over a mixture plan.

`TokenShardStream` reads whole shards, each once per epoch. An SFT epoch reads what the mixture
plan says (`sft_mixture`): some shards several times (up-sampled sources), parts of others
(down-sampled sources), a different part each epoch. `SftShardStream` keeps everything else of
`TokenShardStream` (the reader roles of DataLoader workers and ranks, `start_batch` /
`start_positions` for exact resume, packing) and replaces only `_examples`: global reader g of G
reads plan entries g, g + G, ... of each epoch, MIX_WINDOW entries at a time with their samples
interleaved (a shard holds one source: read one after the other, a batch would hold one task),
skipping `skip` samples by the entries' known sizes. The interleaving is seeded by (seed, epoch,
the group's first entry) and per-sample randomness (CM3 masking, the infill choice) by
(seed, epoch, shard, copy, sample), so a resumed stream yields the same examples.

`MaskedRowPacker` packs each example's loss mask beside its ids (`row.loss_mask`): a second
`RowPacker` over the same lengths lays the masks out exactly as the ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from cm3leon.data.packing import Row, RowPacker
from cm3leon.data.sft_mixture import PlanEntry
from cm3leon.data.token_stream import TokenShardStream, read_token_shard

MIX_WINDOW = 8  # training plan entries (shards) read at once, their samples interleaved


class SftShardStream(TokenShardStream):
    """Yields `transform(decode(raw sample), rng)` for the samples of `plan(epoch)`.

    Args:
        shards: token shard paths (PlanEntry.shard indexes this list).
        plan: epoch -> list of PlanEntry (`MixturePlan` for training, `ValidationPlan`).
        decode: raw sample dict ({'__key__', 'json', 'ids.npy', ...}) -> what `transform` takes.
        transform, seed, train, batch_size, packer: as TokenShardStream.
    """

    def __init__(
        self,
        shards: list[str],
        plan: Callable[[int], list[PlanEntry]],
        decode: Callable[[dict], object],
        transform: Callable,
        seed: int = 0,
        train: bool = True,
        batch_size: int = 1,
        packer=None,
    ):
        super().__init__(shards, transform, seed=seed, train=train, batch_size=batch_size, packer=packer)
        self.plan = plan
        self.decode = decode

    def _examples(self, g: int, G: int, skip: int) -> Iterator[dict]:
        """The examples of global reader g of G, after skipping `skip` samples."""
        epoch = 0
        while True:
            plan = self.plan(epoch)
            mine = list(range(g, len(plan), G))  # this reader's entries, by their index in the plan
            if self.train and not mine:
                raise ValueError(f"SFT reader {g} of {G} has no plan entries: lower data.num_workers")
            window = MIX_WINDOW if self.train else 1
            for start in range(0, len(mine), window):
                group = [plan[k] for k in mine[start : start + window]]
                sizes = [len(e.indices) for e in group]
                if skip >= sum(sizes):
                    skip -= sum(sizes)  # a consumed group: its shards are not read
                    continue
                # (entry, position in the entry) of every sample of the group, interleaved when training
                which = np.repeat(np.arange(len(group)), sizes)
                pos = np.concatenate([np.arange(n) for n in sizes])
                if self.train:
                    order = np.random.default_rng([self.seed, epoch, 4, mine[start]]).permutation(len(which))
                    which, pos = which[order], pos[order]
                raws: dict[int, list[dict]] = {}
                for w, p in zip(which[skip:].tolist(), pos[skip:].tolist()):
                    entry = group[w]
                    if w not in raws:
                        raws[w] = read_token_shard(self.shards[entry.shard])
                    i = int(entry.indices[p])
                    rng = np.random.default_rng([self.seed, epoch, entry.shard, 3, entry.copy, i])
                    yield self.transform(self.decode(raws[w][i]), rng)
                skip = 0
            if not self.train:
                return
            epoch += 1


class MaskedRowPacker(RowPacker):
    """A RowPacker whose rows also carry `loss_mask` (bool [seq_len + 1], False on padding): each
    example's 'loss_mask' packed exactly as its 'ids'."""

    def rows(self, examples: Iterable[dict], start: int = 0, offset: int = 0) -> Iterator[Row]:
        ids_stream, mask_stream = itertools.tee(examples)  # in lockstep: the tee holds about one row
        masks = RowPacker(self.capacity - 1, 0, self.split).rows(
            ({"ids": e["loss_mask"].astype(np.int64)} for e in mask_stream), start, offset
        )
        for row, mask_row in zip(super().rows(ids_stream, start, offset), masks):
            row.loss_mask = mask_row.ids.astype(bool)
            yield row
