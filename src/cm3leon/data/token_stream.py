"""A deterministic, resumable stream of token samples over token shards.

Why not `webdataset.WebDataset(resampled=True)`: resuming a resampled stream can only restart it
at random, repeating and skipping data. Here the stream is a pure function of (seed, position):

- every epoch the shard list is permuted with `seed + epoch` (training) or kept in order (validation);
- global worker g of G (= rank * num_workers + worker id, G = world_size * num_workers) reads
  shards g, g + G, g + 2G, ... of that order (split by node and by worker);
- within a shard, samples are permuted with a generator seeded by (seed, epoch, shard index);
  a whole shard of token ids is small (~20 MB for 10k samples of 1k tokens), so the in-shard
  permutation is an exact shuffle buffer of shard size;
- per-sample randomness (CM3 masking, retrieval pool sampling) uses a generator seeded by
  (seed, epoch, shard index, sample index), so a resumed stream yields identical examples.

To resume after `n` consumed batches, `start_batch = n`: PyTorch's DataLoader hands out batches
round-robin over workers, so the worker of role r has produced ceil((n - r) / W) batches of
`batch_size` samples, and the resumed loader's worker w takes role (w + n) mod W (its first batch
is global batch n). Each worker skips exactly its role's consumed samples, skipping whole shards
by their sample count (from preprocessing's stats sidecar) without reading them.

With packing (`packer`, `cm3leon.data.packing`) the stream yields packed rows instead, and a batch is
`batch_size` rows: how many samples a batch consumed then depends on their lengths, so each row
records where its role's stream stands after it (`Row.stream_pos`: samples packed, token offset
into the next) and the checkpoint stores, per role, that position after the last consumed batch
(`CM3DataModule.state_dict`). A resumed role skips that many samples, rebuilds the next one (its
randomness is seeded by its position, so it is the same example) and packs it from the offset.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cm3leon.data.token_shards import TokenSample, decode_sample


def read_token_shard(path: str) -> list[dict]:
    """All samples of one token shard as raw member dicts ({'__key__', 'json', 'text.npy', ...})."""
    samples: list[dict] = []
    with tarfile.open(path, "r") as tf:
        current: dict | None = None
        for m in tf:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key, ext = base.split(".", 1)
            if current is None or current["__key__"] != key:
                current = {"__key__": key}
                samples.append(current)
            current[ext] = tf.extractfile(m).read()
    return samples


def shard_sample_count(path: str) -> int | None:
    """Sample count from preprocessing's `NNNNNN.stats.json` sidecar, or None when absent."""
    stats = Path(path).with_name(Path(path).name.removesuffix(".tar") + ".stats.json")
    if stats.is_file():
        return int(json.loads(stats.read_text())["written"])
    return None


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TokenShardStream(IterableDataset):
    """Yields `transform(sample, rng)` for every TokenSample, in the deterministic order above.

    Args:
        shards: token shard paths.
        transform: (TokenSample, np.random.Generator) -> example dict; runs in the worker.
        seed: base seed of shard order, in-shard order and per-sample randomness.
        train: True: shuffle, loop forever over epochs, require >= 1 shard per global worker.
            False: fixed order, one pass (ranks/workers with no shard yield nothing).
        batch_size: per-rank micro-batch size (needed to turn consumed batches into samples).
        packer: a `RowPacker`: yield its packed rows (with their role's stream position) instead
            of examples.
        limit: stop after this many samples (validation caps; per reader).
    """

    def __init__(
        self,
        shards: list[str],
        transform: Callable[[TokenSample, np.random.Generator], dict],
        seed: int = 0,
        train: bool = True,
        batch_size: int = 1,
        packer=None,
        limit: int | None = None,
    ):
        super().__init__()
        self.shards = list(shards)
        self.transform = transform
        self.seed = seed
        self.train = train
        self.batch_size = batch_size
        self.packer = packer
        self.limit = limit
        self.start_batch = 0  # batches already consumed on this rank (set when resuming)
        # with a packer: role -> (samples packed, token offset into the next) after the consumed batches
        self.start_positions: dict[int, tuple[int, int]] = {}

    def _samples_to_skip(self, role: int, num_workers: int) -> int:
        n = self.start_batch
        batches = max(0, -(-(n - role) // num_workers))  # ceil((n - role) / num_workers)
        return batches * self.batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # A resumed DataLoader asks worker 0 for the next batch first: rotate the roles so that
        # worker w continues the stream of the worker that would have produced that batch.
        role = (worker + self.start_batch) % num_workers if self.train else worker
        rank, world = _dist_rank_world()
        g, G = rank * num_workers + role, world * num_workers
        if self.train and len(self.shards) < G:
            raise ValueError(
                f"{len(self.shards)} training shards < {G} readers (ranks x dataloader workers): some would starve; "
                "lower data.num_workers or write more, smaller shards"
            )
        if self.packer is not None:
            start, offset = self.start_positions.get(role, (0, 0)) if self.train else (0, 0)
            for row in self.packer.rows(self._examples(g, G, start), start, offset):
                row.stream_pos = (role, *row.stream_pos)
                yield row
        else:
            yield from self._examples(g, G, self._samples_to_skip(role, num_workers) if self.train else 0)

    def _examples(self, g: int, G: int, skip: int) -> Iterator[dict]:
        """The examples of global reader g of G, after skipping `skip` samples."""
        epoch, served = 0, 0
        while True:
            order = np.arange(len(self.shards))
            if self.train:
                order = np.random.default_rng([self.seed, epoch]).permutation(order)
            for shard_idx in order[g::G]:
                path = self.shards[shard_idx]
                count = shard_sample_count(path)
                if count is not None and skip >= count:
                    skip -= count
                    continue
                raw = read_token_shard(path)
                idx = np.arange(len(raw))
                if self.train:
                    idx = np.random.default_rng([self.seed, epoch, int(shard_idx)]).permutation(idx)
                for i in idx:
                    if skip:
                        skip -= 1
                        continue
                    if self.limit is not None and served >= self.limit:
                        return
                    served += 1
                    rng = np.random.default_rng([self.seed, epoch, int(shard_idx), int(i)])
                    yield self.transform(decode_sample(raw[i]), rng)
            if not self.train:
                return
            epoch += 1
