"""DataModule of images (+ captions) from raw shards, for training the VQGAN.

Raw shards are the img2dataset layout (`KEY.png|jpg`, `KEY.txt`; `cm3leon.data.raw_shards`), read
and decoded by the one raw-sample reader (`cm3leon.data.checked_reader`); webdataset resamples,
shuffles and splits them. Training streams shards resampled with replacement (an endless stream:
the Trainer stops at `max_steps`); validation reads its shards once, in order, up to
`val_max_samples`. Bad samples are skipped and counted by reason (`ImageShardDataset.skipped`).

Batches: {"image": float [B, 3, R, R] in [-1, 1], "caption": list[str], "key": list[str]}.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cm3leon.data.checked_reader import SkipCounter, decode_or_count, iter_members
from cm3leon.data.raw_shards import list_shards
from cm3leon.errors import UsageError
from cm3leon.tokenizers.image_processing import preprocess

log = logging.getLogger(__name__)


class ImageShardDataset(IterableDataset):
    """Iterable of {"image": [3, R, R], "caption": str, "key": str} from raw shards.

    train=True: shards resampled with replacement, samples shuffled in a buffer, endless.
    train=False: each shard once in order (split across dataloader workers), at most max_samples.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str],
        resolution: int,
        train: bool,
        shuffle_buffer: int = 1000,
        max_samples: int | None = None,
        seed: int = 0,
    ):
        self.urls = list_shards(shards)
        self.resolution, self.train = resolution, train
        self.shuffle_buffer, self.max_samples, self.seed = shuffle_buffer, max_samples, seed
        self.skipped = SkipCounter()  # by reason (checked_reader.SKIP_REASONS) and where, in this process

    def _read(self, shards: Iterable[dict]) -> Iterator[dict]:
        """webdataset stage: {"url"} dicts -> {"__key__", ext: bytes} samples (truncation counted)."""
        for shard in shards:
            for key, members in iter_members(shard["url"], self.skipped):
                yield {"__key__": key, "__url__": shard["url"], **members}

    def _pipeline(self) -> wds.DataPipeline:
        if self.train:
            worker = get_worker_info()
            rank = int(os.environ.get("RANK", 0))
            # a distinct, reproducible resampling stream per (rank, worker)
            seed = self.seed + 1000 * rank + (worker.id if worker else 0)
            return wds.DataPipeline(
                wds.ResampledShards(self.urls, seed=seed, deterministic=True),
                self._read,
                wds.shuffle(self.shuffle_buffer, rng=random.Random(seed)),
            )
        return wds.DataPipeline(wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker, self._read)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = 0
        for raw in self._pipeline():
            key = raw.pop("__key__")
            sample = decode_or_count(key, raw, self.skipped, where=f"{raw.pop('__url__', '?')}: {key}")
            if sample is None:
                log.warning("skipped sample %s; skipped so far: %s", key, dict(self.skipped))
                continue
            yield {"image": preprocess(sample.image, self.resolution), "caption": sample.caption, "key": sample.key}
            n += 1
            if self.max_samples is not None and n >= self.max_samples:
                return


class ImageDataModule(L.LightningDataModule):
    """Train/val loaders over raw image shards (folders, globs, brace patterns or lists of tars).

    embedded_world: the shards are split folders (`.../raw/train`, `.../raw/val`) of the embedded
    world; `prepare_data` generates it there on first use.
    world_dir: the embedded world's raw folder (`conf/train_tokenizer.yaml`: `${paths.world_dir}/raw`);
        with embedded_world, train_shards must be `world_dir/train`, so that a user's own shards left
        with embedded_world=true stop here instead of having a world generated beside them.
    Shards that do not exist stop in the constructor (one line naming data.train_shards/val_shards).
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None,
        resolution: int,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        val_max_samples: int | None = 1000,
        seed: int = 0,
        embedded_world: bool = False,
        world_dir: str | None = None,
    ):
        super().__init__()
        self.embedded_world = embedded_world
        self.world_dir = Path(world_dir) if world_dir else None
        if embedded_world and self.world_dir is not None and not _same_path(train_shards, self.world_dir / "train"):
            raise UsageError(
                f"data.train_shards={train_shards} is not the embedded world's folder ({self.world_dir / 'train'}) "
                "but data.embedded_world=true: set data.embedded_world=false to train on your own shards"
            )
        if not embedded_world:  # the world is made by prepare_data; other shards must exist now
            for option, shards in (("data.train_shards", train_shards), ("data.val_shards", val_shards)):
                try:
                    if shards:
                        list_shards(shards)
                except FileNotFoundError as e:
                    raise UsageError(f"{option}={shards}: {e}") from None
        self.train_shards, self.val_shards = train_shards, val_shards
        self.resolution, self.batch_size = resolution, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.val_max_samples, self.seed = val_max_samples, seed
        self.train_set: ImageShardDataset | None = None
        self.val_set: ImageShardDataset | None = None

    def prepare_data(self) -> None:
        if self.embedded_world:
            from cm3leon.data.world import ensure_world

            ensure_world(out_dir=str(self.world_dir or Path(self.train_shards).parent))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = ImageShardDataset(
                self.train_shards, self.resolution, train=True, shuffle_buffer=self.shuffle_buffer, seed=self.seed
            )
        if self.val_set is None and self.val_shards:
            self.val_set = ImageShardDataset(
                self.val_shards, self.resolution, train=False, max_samples=self.val_max_samples
            )

    def _loader(self, ds: ImageShardDataset, batch_size: int) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, self.val_batch_size)


def _same_path(spec, path: Path) -> bool:
    """True when a shard spec (a folder, a glob, a list) is exactly the folder `path`."""
    return isinstance(spec, str | os.PathLike) and Path(spec).resolve() == path.resolve()
