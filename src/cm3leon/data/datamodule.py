"""The LightningDataModule of the main job: token shards -> CM3 training batches.

It owns its data. `prepare_data()` (Lightning calls it once per node, on local rank 0) makes what
is missing: for the embedded world its raw shards and token shards (`embedded.py`), and with
retrieval on the retrieval files (`cm3leon.retrieval.neighbours.ensure_retrieval`: built for the
embedded world, checked otherwise). `setup()` (every rank) opens them and checks, before fit, that every
training reader (process x DataLoader worker) has a shard of its own. `data_meta()` is what the
checkpoint records about them.

Per example (in the DataLoader worker): a token sample becomes a document (caption -> image, or
image -> caption with probability `image_to_text_rate`), `retrieval.k` retrieved documents are put
before it when retrieval is on (the training `DocumentSource`, asked by the sample's key), the
sequence is laid out and fitted to `seq_len` (`sequences.py`), and the CM3 transform is applied
(`objective.py`). Batches are right-padded to their longest sequence; targets are the inputs
shifted by one with no-loss positions set to -100. With `packing` the batch's examples are instead
packed whole into rows of `seq_len` (`packing.py`): the batch carries `positions` (restarting per
example) and `doc_ids` (document-aware attention), and no target crosses from one example into the
next. The stream is the same either way (a batch is `micro_batch_size` examples), so resume is too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from cm3leon.data.packing import pack_examples
from cm3leon.data.raw_shards import list_shards
from cm3leon.data.sequences import IGNORE_INDEX, Document, build_sequence, pad_batch
from cm3leon.data.token_shards import TokenSample, decode_sample, load_token_vocab
from cm3leon.data.token_stream import TokenShardStream, read_token_shard
from cm3leon.errors import UsageError
from cm3leon.lit.checks import check_readers, warn_world_clip
from cm3leon.objective import cm3_transform, loss_mask
from cm3leon.retrieval.protocol import DocumentSource, RetrievalQuery
from cm3leon.vocab import PAD_ID, Vocab


class CM3DataModule(L.LightningDataModule):
    """Streams token shards into CM3 batches.

    Args:
        tokens_dir: folder of the token shards `{train,val}/` (with meta.json) from preprocess; the
            retrieval files default to `tokens_dir/retrieval`.
        seq_len: context length (the paper: 4096).
        micro_batch_size: sequences per device per step.
        num_workers: DataLoader workers per device (and processes that prepare the embedded world).
        seed: seed of the stream (shard order, in-shard shuffle, masking, retrieved-document draws).
        image_to_text_rate: share of query documents laid out image -> caption.
        objective: `conf/objective/*.yaml` as a dict: {transform: {...}, zero_sentinel_loss: bool}.
        vocab: extra Vocab fields {base_size, n_sentinels, pad_multiple} (sizes come from meta.json).
        val_max_samples: cap on validation samples (null: all).
        retrieval: `conf/retrieval/*.yaml` (k documents per example; k = 0 or null: no retrieval).
        embedded_world: `tokens_dir` is the embedded world's: prepare_data makes the world, its token
            shards (with the tokenizers in `shipped_dir`) and retrieval files when missing or stale.
            Otherwise the token shards must exist (checked here: one line naming the folder).
        world: the world to generate (`cm3leon.data.world.WorldConfig` fields; out_dir required).
        shipped_dir: the folder of the world's tokenizers (world_vqgan.ckpt, world_bpe.json).
        packing: pack each batch's `micro_batch_size` examples whole into as few rows of `seq_len`
            tokens as first-fit allows (`cm3leon.data.packing`), instead of one padded row each.
    """

    def __init__(
        self,
        tokens_dir: str,
        seq_len: int = 4096,
        micro_batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 0,
        image_to_text_rate: float = 0.0,
        objective: Mapping | None = None,
        vocab: Mapping | None = None,
        val_max_samples: int | None = None,
        pin_memory: bool = True,
        retrieval: Mapping | None = None,
        embedded_world: bool = False,
        world: Mapping | None = None,
        shipped_dir: str | None = None,
        packing: bool = False,
    ):
        super().__init__()
        self.tokens_dir = Path(tokens_dir)
        self.train_dir, self.val_dir = self.tokens_dir / "train", self.tokens_dir / "val"
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
        self.retrieval = _retrieval_config(retrieval)
        self.embedded_world = bool(embedded_world)
        self.world = dict(world or {})
        self.shipped_dir = shipped_dir
        self.packing = bool(packing)
        if self.embedded_world and not (self.world.get("out_dir") and shipped_dir):
            raise UsageError(
                "data.embedded_world=true needs data.world.out_dir and data.shipped_dir (conf/data/world.yaml)"
            )
        self.neighbours: DocumentSource | None = None  # opened in setup when retrieval is on
        self._start_batch = 0
        self.vocab: Vocab | None = None
        self.meta: dict | None = None
        if not self.embedded_world:
            self.load_meta()  # the user's token shards: a missing folder stops here, in one line

    # ---- data: made once, opened per rank --------------------------------------------------
    def prepare_data(self) -> None:
        """Make the embedded world's data and the retrieval files when missing (local rank 0)."""
        if self.embedded_world:
            from cm3leon.data.embedded import ensure_embedded_tokens

            ensure_embedded_tokens(self.world, self.tokens_dir, self.shipped_dir, num_workers=self.num_workers)
        if self.retrieval is not None:
            from cm3leon.retrieval.neighbours import ensure_retrieval

            # a missing or stale build is made for the embedded world, one error line otherwise
            folder = ensure_retrieval(self.retrieval, self.tokens_dir, build_missing=self.embedded_world)
            if not self.embedded_world:
                self._warn_world_clip_bank(Path(folder))

    def _warn_world_clip_bank(self, folder: Path) -> None:
        """Neighbours of real data found with the world's tiny CLIP are near-random: say so."""
        try:
            encoder = json.loads((folder / "manifest.json").read_text())["encoder"]
        except (OSError, ValueError, KeyError):
            return  # an unreadable manifest is ensure_retrieval's to report
        warn_world_clip("retrieval.encoder", encoder, f"data.embedded_world=false (the memory bank in {folder})")

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
            raise UsageError(f"data.seq_len={self.seq_len} cannot hold one image of {self.tokens_per_image} tokens")
        self.train_shards = list_shards(self.train_dir)
        self.val_shards = list_shards(self.val_dir)
        if stage in (None, "fit"):
            # TokenShardStream refuses too few shards too, but only inside a DataLoader worker, after fit started
            world_size = self.trainer.world_size if self.trainer is not None else 1
            check_readers(len(self.train_shards), world_size, self.num_workers, str(self.train_dir))
        if self.retrieval is not None and self.neighbours is None:
            from cm3leon.retrieval.neighbours import NeighbourPool

            self.neighbours = NeighbourPool.from_config(self.retrieval, self.tokens_dir)

    def data_meta(self) -> dict:
        """What the checkpoint records about the data: the token shards' meta.json (tokenizer paths
        and hashes, tokens per image) and, with retrieval on, {'retrieval': {'k', 'folder'}} (the
        memory bank generate.py retrieves from by default)."""
        self.load_meta()
        meta = dict(self.meta)
        if self.retrieval is not None:
            meta["retrieval"] = {"k": self.retrieval.k, "folder": str(self.retrieval.folder(self.tokens_dir).resolve())}
        return meta

    # ---- examples and batches ------------------------------------------------------------
    def make_example(self, sample: TokenSample, rng: np.random.Generator) -> dict:
        """One token sample -> {'ids': int64 [n <= seq_len], 'key', 'n_retrieved'} (runs in workers)."""
        query = Document(sample.text_ids, sample.codes)
        retrieved = []
        if self.neighbours is not None:
            # drawn with the example's own generator: a resumed stream gets the same documents
            retrieved = self.neighbours.documents([RetrievalQuery(key=sample.key)], self.retrieval.k, rng)[0]
        image_first = bool(rng.random() < self.image_to_text_rate)
        ids, n_kept = build_sequence(query, retrieved, self.vocab, self.seq_len, image_first=image_first)
        ex = cm3_transform(ids, self.vocab, rng, seq_len=self.seq_len, **self.transform_kwargs)
        return {"ids": ex.ids, "key": sample.key, "n_retrieved": n_kept}

    def collate(self, examples: list[dict]) -> dict:
        """Pad and shift: input_ids [B, T-1], targets [B, T-1] (-100 where no loss). With packing:
        input_ids, targets, positions, doc_ids [R, seq_len], R <= B rows of whole examples."""
        out = {"keys": [e["key"] for e in examples], "n_retrieved": torch.tensor([e["n_retrieved"] for e in examples])}
        if self.packing:
            packed = pack_examples([e["ids"] for e in examples], self.seq_len, PAD_ID)
            ids = torch.from_numpy(packed.ids)
            keep = torch.from_numpy(packed.target_mask)  # no target from the next example
            out["positions"] = torch.from_numpy(packed.positions[:, :-1].copy())
            out["doc_ids"] = torch.from_numpy(packed.doc_ids[:, :-1].copy())
        else:
            ids = torch.from_numpy(pad_batch([e["ids"] for e in examples], PAD_ID))
            keep = None
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        mask = loss_mask(targets, self.vocab, self.zero_sentinel_loss)
        targets[~(mask if keep is None else mask & keep)] = IGNORE_INDEX
        # counted here, on the CPU: the accounting and MFU read it without a device sync
        n_real = int((targets != IGNORE_INDEX).sum())
        return {"input_ids": inputs.contiguous(), "targets": targets, "n_real": n_real, **out}

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
        if (
            state.get("micro_batch_size", self.micro_batch_size) != self.micro_batch_size
            or state.get("seed") != self.seed
        ):
            raise UsageError(
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


def _retrieval_config(retrieval: Mapping | None):
    """The RetrievalConfig of a `conf/retrieval/*.yaml` node, or None when it retrieves nothing."""
    if retrieval is None or retrieval.get("k", 0) == 0:
        return None
    if retrieval.get("k") is None:
        raise UsageError(
            f"retrieval={retrieval.get('name')} has no k: training takes retrieval=ra (k documents per "
            "example, retrieval.k=K) or retrieval=none"
        )
    from cm3leon.retrieval.neighbours import RetrievalConfig

    return RetrievalConfig.from_any(retrieval)
