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
(`objective.py`). Without packing a batch is `micro_batch_size` examples right-padded to the longest;
targets are the inputs shifted by one with no-loss positions set to -100. With `packing` (whole or
split, `packing.py`) a batch is `micro_batch_size` rows of exactly `seq_len` inputs filled from the
example stream: it carries `positions` (restarting per piece) and `doc_ids` (document-aware
attention), and no target crosses from one piece into the next. Validation packs whole examples
(each gets exactly its unpacked loss). Resume is exact either way (`state_dict`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from cm3leon.data.packing import Row, RowPacker, packing_mode, stack_rows
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
        packing: none (one padded row per example), whole (examples packed whole into rows of
            `seq_len`, the rest of a row padded) or split (rows filled, examples cut at row ends and
            continued in the next row): `cm3leon.data.packing`. With packing, `micro_batch_size`
            counts rows.
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
        packing: bool | str = "none",
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
        self.retrieval = retrieval_config(retrieval)
        self.embedded_world = bool(embedded_world)
        self.world = dict(world or {})
        self.shipped_dir = shipped_dir
        self.packing = packing_mode(packing)
        if self.embedded_world and not (self.world.get("out_dir") and shipped_dir):
            raise UsageError(
                "data.embedded_world=true needs data.world.out_dir and data.shipped_dir (conf/data/world.yaml)"
            )
        self.neighbours: DocumentSource | None = None  # opened in setup when retrieval is on
        self._init_stream_state()
        self.vocab: Vocab | None = None
        self.meta: dict | None = None
        if not self.embedded_world:
            self.load_meta()  # the user's token shards: a missing folder stops here, in one line

    def _init_stream_state(self) -> None:
        """Where the training stream starts (set by load_state_dict when resuming)."""
        self._start_batch = 0
        # packing: the stream position of every role after the consumed batches (resume), and the
        # positions of recent batches, by global batch index, until a checkpoint needs them
        self._start_positions: dict[int, dict[int, tuple[int, int]]] = {}
        self._recent_positions: dict[int, tuple[int, int, int]] = {}
        self._next_batch = 0

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

    def collate(self, items: list) -> dict:
        """Examples -> pad and shift: input_ids, targets [B, T] (T = longest - 1; -100 where no loss).
        Packed Rows -> input_ids, targets, positions, doc_ids [B, seq_len], and `stream_pos`."""
        if items and isinstance(items[0], Row):
            packed = stack_rows(items)
            ids = torch.from_numpy(packed.ids)
            keep = torch.from_numpy(packed.target_mask)  # no target from the next piece
            out = {
                "keys": [k for r in items for k in r.keys],
                "n_retrieved": torch.tensor([n for r in items for n in r.n_retrieved]),
                "positions": torch.from_numpy(packed.positions[:, :-1].copy()),
                "doc_ids": torch.from_numpy(packed.doc_ids[:, :-1].copy()),
                "stream_pos": items[-1].stream_pos,  # (role, samples packed, offset): one worker's rows
            }
        else:
            ids = torch.from_numpy(pad_batch([e["ids"] for e in items], PAD_ID))
            keep = None
            out = {"keys": [e["key"] for e in items], "n_retrieved": torch.tensor([e["n_retrieved"] for e in items])}
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        mask = loss_mask(targets, self.vocab, self.zero_sentinel_loss)
        targets[~(mask if keep is None else mask & keep)] = IGNORE_INDEX
        # counted here, on the CPU: the accounting and MFU read it without a device sync
        n_real = int((targets != IGNORE_INDEX).sum())
        return {"input_ids": inputs.contiguous(), "targets": targets, "n_real": n_real, **out}

    def _packer(self, split: bool) -> RowPacker | None:
        return None if self.packing == "none" else RowPacker(self.seq_len, PAD_ID, split=split)

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
            self.train_shards,
            self.make_example,
            seed=self.seed,
            train=True,
            batch_size=self.micro_batch_size,
            packer=self._packer(split=self.packing == "split"),
        )
        stream.start_batch = self._next_batch = self._start_batch
        rank = self.trainer.global_rank if self.trainer is not None else 0
        stream.start_positions = self._start_positions.get(rank, {})
        return self._loader(stream, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        # whole examples when packing: each gets exactly its unpacked loss
        stream = TokenShardStream(
            self.val_shards,
            self.make_example,
            seed=self.seed + 1,
            train=False,
            packer=self._packer(split=False),
            limit=self.val_max_samples,
        )
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
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Record where each packed training batch leaves its role's stream (a checkpoint needs it)."""
        if isinstance(batch, dict) and "stream_pos" in batch:
            role, start, offset = batch.pop("stream_pos")
            if self.trainer is not None and self.trainer.training:
                self._recent_positions[self._next_batch] = (int(role), int(start), int(offset))
                self._next_batch += 1
                keep = self._next_batch - 4 * max(1, self.num_workers) * max(1, self.trainer.accumulate_grad_batches)
                for old in [i for i in self._recent_positions if i < keep]:
                    del self._recent_positions[old]
        return batch

    def _positions_after(self, consumed: int) -> dict[int, tuple[int, int]]:
        """This rank's role -> (samples packed, offset) after its first `consumed` batches."""
        positions = dict(self._start_positions.get(self.trainer.global_rank if self.trainer else 0, {}))
        for i in sorted(i for i in self._recent_positions if i < consumed):
            role, start, offset = self._recent_positions[i]
            positions[role] = (start, offset)
        return positions

    def state_dict(self) -> dict:
        """Batches this rank has consumed: checkpoints are written at optimizer-step boundaries.
        With packing also every rank's stream positions (gathered: the checkpoint is rank 0's)."""
        consumed = 0
        if self.trainer is not None:
            consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches
        state = {"train_batches_consumed": consumed, "seed": self.seed, "micro_batch_size": self.micro_batch_size}
        if self.packing != "none":
            mine = self._positions_after(consumed)
            gathered = [mine]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, mine)
            state.update(
                packing=self.packing,
                num_workers=self.num_workers,
                stream_positions={rank: {r: list(p) for r, p in pos.items()} for rank, pos in enumerate(gathered)},
            )
        return state

    def load_state_dict(self, state: dict) -> None:
        if (
            state.get("micro_batch_size", self.micro_batch_size) != self.micro_batch_size
            or state.get("seed") != self.seed
        ):
            raise UsageError(
                "resuming with a different data.seed or data.micro_batch_size would repeat or skip data; "
                f"the checkpoint used seed={state.get('seed')} micro_batch_size={state.get('micro_batch_size')}"
            )
        saved = (state.get("packing", "none"), state.get("num_workers", self.num_workers))
        if saved[0] != self.packing or (self.packing != "none" and saved[1] != self.num_workers):
            raise UsageError(
                f"the checkpoint's data stream used data.packing={saved[0]} data.num_workers={saved[1]}; resuming "
                f"with packing={self.packing} num_workers={self.num_workers} would repeat or skip data: use its values"
            )
        positions = state.get("stream_positions", {})
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.packing != "none" and len(positions) != world:
            raise UsageError(
                f"the checkpoint's packed data streams are those of {len(positions)} ranks, this run has {world}: "
                "resume on as many ranks (packed streams cannot be re-split exactly)"
            )
        self._start_positions = {
            int(rank): {int(r): (int(p[0]), int(p[1])) for r, p in pos.items()} for rank, pos in positions.items()
        }
        self._start_batch = int(state["train_batches_consumed"])


def retrieval_config(retrieval: Mapping | None):
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
