"""The LightningDataModule of the main job: token shards -> CM3 training batches.

Per example (in the DataLoader worker): a token sample becomes a document (caption -> image, or
image -> caption with probability `image_to_text_rate`), retrieved documents are put before it
when a neighbour source is configured, the sequence is laid out and fitted to `seq_len`
(`sequences.py`), and the CM3 transform is applied (`objective.py`). Batches are right-padded to
their longest sequence; targets are the inputs shifted by one with no-loss positions set to -100.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from cm3leon.data.raw_shards import list_shards
from cm3leon.data.sequences import IGNORE_INDEX, Document, build_sequence, pad_batch
from cm3leon.data.token_shards import TokenSample, decode_sample, load_token_vocab
from cm3leon.data.token_stream import TokenShardStream, read_token_shard
from cm3leon.objective import cm3_transform, loss_mask
from cm3leon.vocab import PAD_ID, Vocab

# A neighbour source maps (sample, rng) -> the retrieved documents to put before it.
NeighbourSource = Callable[[TokenSample, np.random.Generator], list[Document]]


class CM3DataModule(L.LightningDataModule):
    """Streams token shards into CM3 batches.

    Args:
        train_dir, val_dir: folders of token shards (with meta.json) from preprocess.
        seq_len: context length (the paper: 4096).
        micro_batch_size: sequences per device per step.
        num_workers: DataLoader workers per device.
        seed: seed of the stream (shard order, in-shard shuffle, masking).
        image_to_text_rate: share of query documents laid out image -> caption.
        objective: `conf/objective/*.yaml` as a dict: {transform: {...}, zero_sentinel_loss: bool}.
        vocab: extra Vocab fields {base_size, n_sentinels, pad_multiple} (sizes come from meta.json).
        val_max_samples: cap on validation samples (null: all).
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str,
        seq_len: int = 4096,
        micro_batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 0,
        image_to_text_rate: float = 0.0,
        objective: dict | None = None,
        vocab: dict | None = None,
        val_max_samples: int | None = None,
        pin_memory: bool = True,
    ):
        super().__init__()
        self.train_dir, self.val_dir = train_dir, val_dir
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.image_to_text_rate = image_to_text_rate
        objective = dict(objective or {})
        self.transform_kwargs = dict(objective.get("transform", {}))
        self.zero_sentinel_loss = bool(objective.get("zero_sentinel_loss", False))
        self.vocab_overrides = dict(vocab or {})
        self.val_max_samples = val_max_samples
        self.pin_memory = pin_memory
        self.neighbours: NeighbourSource | None = None
        self._start_batch = 0
        self.vocab: Vocab | None = None
        self.meta: dict | None = None

    # ---- set-up --------------------------------------------------------------------------
    def load_meta(self) -> Vocab:
        """Read the token shards' meta.json (cheap, no shard is opened) and build the Vocab."""
        if self.vocab is None:
            self.vocab, self.meta = load_token_vocab(self.train_dir, self.val_dir, **self.vocab_overrides)
        return self.vocab

    @property
    def tokens_per_image(self) -> int:
        self.load_meta()
        return int(self.meta["tokens_per_image"])

    def setup(self, stage: str | None = None) -> None:
        self.load_meta()
        if self.seq_len < self.tokens_per_image + 4:
            raise ValueError(f"data.seq_len={self.seq_len} cannot hold one image of {self.tokens_per_image} tokens")
        # cm3_transform caps the span count at the vocabulary's sentinel count
        self.train_shards = list_shards(self.train_dir)
        self.val_shards = list_shards(self.val_dir)

    # ---- examples and batches ------------------------------------------------------------
    def make_example(self, sample: TokenSample, rng: np.random.Generator) -> dict:
        """One token sample -> {'ids': int64 [n <= seq_len], 'key', 'n_retrieved'} (runs in workers)."""
        query = Document(sample.text_ids, sample.codes)
        retrieved = self.neighbours(sample, rng) if self.neighbours is not None else []
        image_first = bool(rng.random() < self.image_to_text_rate)
        ids, n_kept = build_sequence(query, retrieved, self.vocab, self.seq_len, image_first=image_first)
        ex = cm3_transform(ids, self.vocab, rng, seq_len=self.seq_len, **self.transform_kwargs)
        return {"ids": ex.ids, "key": sample.key, "n_retrieved": n_kept}

    def collate(self, examples: list[dict]) -> dict:
        """Pad and shift: input_ids [B, T-1], targets [B, T-1] (-100 where no loss)."""
        ids = torch.from_numpy(pad_batch([e["ids"] for e in examples], PAD_ID))
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        targets[~loss_mask(targets, self.vocab, self.zero_sentinel_loss)] = IGNORE_INDEX
        return {
            "input_ids": inputs.contiguous(),
            "targets": targets,
            "keys": [e["key"] for e in examples],
            "n_retrieved": torch.tensor([e["n_retrieved"] for e in examples]),
        }

    def _loader(self, stream: TokenShardStream, workers: int) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=self.micro_batch_size,
            collate_fn=self.collate,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        stream = TokenShardStream(
            self.train_shards, self.make_example, seed=self.seed, train=True, batch_size=self.micro_batch_size
        )
        stream.start_batch = self._start_batch
        return self._loader(stream, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        stream = TokenShardStream(self.val_shards, self.make_example, seed=self.seed + 1, train=False)
        if self.val_max_samples is not None:
            stream = _Limited(stream, self.val_max_samples)
        # one worker keeps the validation order fixed and the sample cap exact
        return self._loader(stream, min(self.num_workers, 1))

    def val_samples(self, n: int) -> list[TokenSample]:
        """The first n validation samples, in order (prompts for sample grids and evaluation)."""
        out: list[TokenSample] = []
        for shard in self.val_shards:
            out += [decode_sample(r) for r in read_token_shard(shard)[: n - len(out)]]
            if len(out) >= n:
                break
        return out

    # ---- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Batches this rank has consumed: checkpoints are written at optimizer-step boundaries."""
        consumed = 0
        if self.trainer is not None:
            consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return {"train_batches_consumed": consumed, "seed": self.seed, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("micro_batch_size", self.micro_batch_size) != self.micro_batch_size or state.get("seed") != self.seed:
            raise ValueError(
                "resuming with a different data.seed or data.micro_batch_size would repeat or skip data; "
                f"the checkpoint used seed={state.get('seed')} micro_batch_size={state.get('micro_batch_size')}"
            )
        self._start_batch = int(state["train_batches_consumed"])


class _Limited(torch.utils.data.IterableDataset):
    """The first `n` items of an iterable dataset."""

    def __init__(self, inner, n: int):
        super().__init__()
        self.inner, self.n = inner, n

    def __iter__(self):
        for i, x in enumerate(self.inner):
            if i >= self.n:
                return
            yield x
