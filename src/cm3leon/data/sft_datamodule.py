"""The LightningDataModule of instruction tuning (SFT): SFT token shards -> CM3 training batches.

It is `CM3DataModule` with another example source: the instruction sources of `sft_shards`
(one folder per source, sequences already laid out by the templates) read through a mixture
plan (`sft_mixture`: per-source weights, the paper's 3x / 0.3x caps) by `SftShardStream`. The
batches, packing, validation and exact resume (`state_dict`) are CM3DataModule's.

Per example (in the DataLoader worker), PAPER.md section 7 "same CM3 objective":
- a text-target example (caption, VQA answer) is laid out in the infilling form with probability
  `infill_rate` (the target masked in place and generated after `<sentinel:0>` up to `<eoss>`, the
  form VQA and captioning are asked in at inference; `infill_form`) and then not transformed again;
- otherwise, with `cm3` on (the default), the CM3 transform with the objective's rate
  (`objective.transform`, as pretraining).
The example's target mask follows the transform (`sft_templates.cm3_target_mask`). `loss_on`:
`all` (the paper's: every non-pad target, as pretraining) or `target` (only the template's output,
e.g. the edited image or the answer: every other target -100 in the batch).

The mixture is resolved once at setup and logged (samples per source per epoch); the checkpoint
records it, and a resume with another mixture is refused (it would read other samples).
`prepare_data` makes the world sources when missing or stale (`embedded_world`); file sources are
made by `python src/make_sft_shards.py`.

Retrieval (optional; the paper does not say whether its SFT retrieved): with `retrieval.k > 0` and
`retrieval.dir` a pretraining memory bank (`build_index.py`'s folder, e.g. the world's
`data/world/tokens/retrieval`), each example gets up to k documents retrieved by its prompt's text
(`sft_templates.retrieval_query`: the instruction, caption or question, never the target), put
after the opening `</s>` (`sequences.insert_retrieved`), as generation does with the same bank.
Retrieval is deterministic, so a resumed stream sees the same documents.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch

from cm3leon.data.datamodule import CM3DataModule, retrieval_config
from cm3leon.data.packing import Row, packing_mode
from cm3leon.data.sequences import IGNORE_INDEX, Document, insert_retrieved
from cm3leon.data.sft_mixture import MixturePlan, ValidationPlan, mixture_table, resolve_mixture
from cm3leon.data.sft_shards import (
    SPLITS,
    SftRecord,
    SftShardMaker,
    decode_record,
    parse_sources,
    read_source,
    shard_paths,
    source_inputs,
    split_meta_path,
    stale_reason,
    summary_line,
)
from cm3leon.data.sft_stream import MaskedRowPacker, SftShardStream
from cm3leon.data.sft_templates import SftSample, cm3_target_mask, retrieval_query
from cm3leon.data.token_shards import TokenSample, read_meta
from cm3leon.data.token_stream import read_token_shard
from cm3leon.errors import UsageError
from cm3leon.lit.checks import check_readers
from cm3leon.objective import cm3_apply_spans, cm3_transform
from cm3leon.utils import digest
from cm3leon.vocab import Vocab

LOSS_ON = ("all", "target")


def infill_form(ids: np.ndarray, mask: np.ndarray, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """A text-target sequence in the infilling form: the target span masked (`<sentinel:0>` in place,
    `<sentinel:0> target <eoss>` appended), the mask carried along. Equals
    `build_sft_sequence(..., infill=True)` (tested)."""
    where = np.flatnonzero(mask)
    ex = cm3_apply_spans(ids, [(int(where[0]), int(where[-1]) + 1)], vocab, truncate=False)
    return ex.ids, cm3_target_mask(mask, ex)


class PromptRetrieval:
    """An SFT example's documents: up to k retrieved from the bank in `folder` by the prompt's text
    (`retrieval_query`; none when it has no text). The Retriever (FAISS index and CLIP) is opened on
    first use, in each DataLoader worker."""

    def __init__(self, folder: str | Path, k: int):
        self.folder, self.k = Path(folder), int(k)
        self._retriever = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_retriever": None}

    def documents(self, sample: SftSample) -> list[Document]:
        query = retrieval_query(sample)
        if query is None:
            return []
        if self._retriever is None:
            from cm3leon.retrieval.retriever import Retriever

            self._retriever = Retriever(self.folder, k=self.k, device="cpu")
        return self._retriever.documents([query], self.k)[0]


class SftDataModule(CM3DataModule):
    """Streams SFT token shards into CM3 batches (see the module docstring).

    Args:
        tokens_dir: the SFT token shards: `{train,val}/meta.json` and `{train,val}/<source>/` (`sft_shards`).
        sources: {name: SftSource fields}: kind (world | file), task, weight, n_train / n_val (world),
            train_file / val_file (file). Weight 0 leaves a source out.
        mixture: {max_repeat, min_keep}: the caps of `sft_mixture` (the paper: 3 and 0.3).
        embedded_world: True: prepare_data makes the world sources when missing or stale (with
            `image_tokenizer` and `text_tokenizer`, `shard_size` samples per shard); file sources must
            exist. False: every source must exist (checked here: one line).
        image_tokenizer, text_tokenizer: the files world sources are made with.
        loss_on: all (the paper) | target.
        cm3: CM3-transform examples (the paper's SFT objective); false: plain causal LM.
        infill_rate: share of text-target examples laid out in the infilling form.
        seq_len, micro_batch_size, num_workers, seed, objective, vocab, pin_memory, packing: as
            CM3DataModule.
        val_max_samples: validation samples, split equally over the sources (null: all).
        retrieval: `conf/retrieval/*.yaml`; k > 0 needs `dir`, the memory bank to retrieve from
            (module docstring). Its tokenizers must be the SFT shards' (checked at setup).
    """

    def __init__(
        self,
        tokens_dir: str,
        sources: Mapping,
        mixture: Mapping,
        embedded_world: bool = False,
        image_tokenizer: str | None = None,
        text_tokenizer: str | None = None,
        shard_size: int = 1000,
        loss_on: str = "all",
        cm3: bool = True,
        infill_rate: float = 0.5,
        seq_len: int = 4096,
        micro_batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 0,
        objective: Mapping | None = None,
        vocab: Mapping | None = None,
        val_max_samples: int | None = None,
        pin_memory: bool = True,
        retrieval: Mapping | None = None,
        packing: bool | str = "none",
    ):
        # CM3DataModule.__init__ takes the pretraining world's options (raw world, retrieval,
        # image_to_text_rate); the fields its batches and resume read are set here
        L.LightningDataModule.__init__(self)
        self.tokens_dir = Path(tokens_dir)
        self.train_dir, self.val_dir = self.tokens_dir / "train", self.tokens_dir / "val"
        self.sources = {n: s for n, s in parse_sources(sources).items() if s.weight > 0}
        if not self.sources:
            raise UsageError("every data.sources weight is 0: give at least one SFT source a weight > 0")
        self.embedded_world = bool(embedded_world)
        self.image_tokenizer, self.text_tokenizer = image_tokenizer, text_tokenizer
        self.shard_size = int(shard_size)
        self.max_repeat, self.min_keep = float(mixture["max_repeat"]), float(mixture["min_keep"])
        if loss_on not in LOSS_ON:
            raise UsageError(f"data.loss_on={loss_on!r} is not one of {LOSS_ON}")
        self.loss_on, self.cm3, self.infill_rate = loss_on, bool(cm3), float(infill_rate)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.seed = seed
        objective = dict(objective or {})
        self.transform_kwargs = dict(objective.get("transform", {}))
        self.zero_sentinel_loss = bool(objective.get("zero_sentinel_loss", False))
        self.vocab_overrides = dict(vocab or {})
        self.val_max_samples = val_max_samples
        self.pin_memory = pin_memory
        self.retrieval = retrieval_config(retrieval)
        if self.retrieval is not None and not self.retrieval.dir:
            raise UsageError(
                "SFT retrieves from a pretraining memory bank: pass retrieval.dir=BANK (build_index.py's folder; "
                "the world's: data/world/tokens/retrieval), or retrieval=none"
            )
        self.neighbours = None  # pretraining's per-key pools: SFT retrieves by the prompt instead
        self.prompt_retrieval = PromptRetrieval(self.retrieval.dir, self.retrieval.k) if self.retrieval else None
        self.packing = packing_mode(packing)
        self._init_stream_state()
        self.vocab: Vocab | None = None
        self.meta: dict | None = None
        self.shares = None  # the resolved mixture (setup)
        if not self.embedded_world:  # the shards must exist: a missing source stops here, in one line
            for split in SPLITS:
                self._source_shards(split)
            self.load_meta()

    # ---- data: made once, opened per rank --------------------------------------------------
    def prepare_data(self) -> None:
        """Make the world sources that are missing or stale (embedded_world; local rank 0)."""
        if not self.embedded_world:
            return
        from cm3leon.data.preprocess import PreprocessConfig, tokenizer_files

        world = [s for s in self.sources.values() if s.kind == "world"]
        if not world:
            return
        if not (self.image_tokenizer and self.text_tokenizer):
            raise UsageError(
                "data.embedded_world=true makes the world sources: set data.image_tokenizer and data.text_tokenizer"
            )
        cfg = PreprocessConfig(self.image_tokenizer, self.text_tokenizer, num_workers=self.num_workers)
        files = tokenizer_files(cfg)  # hashed once
        todo = []
        for split in SPLITS:
            meta_path = split_meta_path(self.tokens_dir, split)
            meta = read_meta(meta_path.parent) if meta_path.is_file() else {}
            for src in (s for s in world if s.has(split)):
                fingerprint = digest(source_inputs(src, split, files, self.shard_size))
                why = stale_reason(read_source(self.tokens_dir, split, src.name), src, meta, self.seq_len, fingerprint)
                if why is not None:
                    print(f"[sft] making the world source {split}/{src.name} ({why}) in {self.tokens_dir}", flush=True)
                    todo.append((src, split))
        if todo:
            t0 = time.time()
            maker = SftShardMaker(self.tokens_dir, cfg, self.seq_len, self.shard_size, overwrite=True)
            for report in maker.make(todo):
                print(summary_line(report), flush=True)
            print(f"[sft] made {len(todo)} world source splits in {time.time() - t0:.0f} s", flush=True)

    def _source_shards(self, split: str) -> dict[str, tuple[list[str], list[int]]]:
        """Source name -> (shard paths, samples per shard) of `split`, each source checked (one line)."""
        meta_path = split_meta_path(self.tokens_dir, split)
        if not meta_path.is_file():
            raise UsageError(
                f"SFT token shards {meta_path.parent} not found: make them with `python src/make_sft_shards.py "
                "data=...` (world sources: data.embedded_world=true makes them)"
            )
        meta = read_meta(meta_path.parent)
        out = {}
        for src in self.sources.values():
            if not src.has(split):
                continue  # no validation samples (a source without training ones: the mixture says so)
            report = read_source(self.tokens_dir, split, src.name)
            why = stale_reason(report, src, meta, self.seq_len, None)
            if why is not None:
                how = (
                    "prepare_data makes it (data.embedded_world=true)"
                    if src.kind == "world"
                    else "make it with `python src/make_sft_shards.py`"
                )
                raise UsageError(f"SFT source {self.tokens_dir / split / src.name}: {why}; {how}")
            out[src.name] = shard_paths(self.tokens_dir, split, report)
        return out

    def setup(self, stage: str | None = None) -> None:
        self.load_meta()
        if self.seq_len < self.tokens_per_image + 4:
            raise UsageError(f"data.seq_len={self.seq_len} cannot hold one image of {self.tokens_per_image} tokens")
        if self.retrieval is not None:
            self._check_bank()
        train, val = self._source_shards("train"), self._source_shards("val")
        self.train_shards, train_layout = _flatten(train)
        self.val_shards, val_layout = _flatten(val)
        self.val_by_source = val
        sizes = {name: sum(train[name][1]) if name in train else 0 for name in self.sources}
        self.shares = resolve_mixture(
            sizes, {n: s.weight for n, s in self.sources.items()}, self.max_repeat, self.min_keep
        )
        self.train_plan = MixturePlan(tuple(train_layout), tuple(self.shares[n].samples for n in train), self.seed)
        per_source = None if self.val_max_samples is None else -(-int(self.val_max_samples) // max(len(val), 1))
        self.val_plan = ValidationPlan(tuple(val_layout), per_source)
        rank_zero = self.trainer is None or self.trainer.is_global_zero
        if rank_zero:
            print(mixture_table(self.shares, {n: s.task for n, s in self.sources.items()}), flush=True)
        if stage in (None, "fit"):
            world_size = self.trainer.world_size if self.trainer is not None else 1
            check_readers(self.train_plan.entries_per_epoch(), world_size, self.num_workers, str(self.train_dir))
            self._check_sample_grid()

    def _check_bank(self) -> None:
        """The memory bank's documents must be tokens of the SFT shards' tokenizers (one line)."""
        from cm3leon.retrieval.neighbours import check_bank_tokenizers

        shas = {key: (self.meta.get(key) or {}).get("sha256") for key in ("image_tokenizer", "text_tokenizer")}
        check_bank_tokenizers(self.retrieval.dir, shas, f"the SFT shards in {self.tokens_dir}")

    def _check_sample_grid(self) -> None:
        """The sampling callback draws plain captions (val_samples): refuse before fit when none exist."""
        from cm3leon.eval.callback import SampleCallback

        callbacks = self.trainer.callbacks if self.trainer is not None else []
        if any(isinstance(c, SampleCallback) for c in callbacks) and not self.val_samples(1):
            raise UsageError(
                "callbacks.samples draws plain caption samples, but no validation source has them: add a caption "
                "source, or drop the callback (~callbacks.samples)"
            )

    def data_meta(self) -> dict:
        """The shards' meta.json (tokenizers, tokens per image) and the SFT sources {name: task}."""
        meta = super().data_meta()
        meta["sft"] = {"sources": {n: s.task for n, s in self.sources.items()}, "loss_on": self.loss_on}
        return meta

    # ---- examples and batches ------------------------------------------------------------
    def make_example(self, record: SftRecord, rng: np.random.Generator) -> dict:
        """One SFT record -> {'ids': int64 [n <= seq_len], 'loss_mask': bool [n], 'key', 'source', 'n_retrieved'}."""
        ids, mask, n_retrieved = record.ids, record.loss_mask, 0
        if self.prompt_retrieval is not None:
            docs = self.prompt_retrieval.documents(record.sample)
            ids, mask, n_retrieved = insert_retrieved(ids, mask, docs, self.vocab, self.seq_len)
        if record.text_target and self.infill_rate > 0 and rng.random() < self.infill_rate:
            ids, mask = infill_form(ids, mask, self.vocab)  # already a CM3 example: not transformed again
        elif self.cm3:
            ex = cm3_transform(ids, self.vocab, rng, seq_len=self.seq_len, **self.transform_kwargs)
            ids, mask = ex.ids, cm3_target_mask(mask, ex)
        return {
            "ids": ids,
            "loss_mask": mask,
            "key": record.key,
            "source": record.meta["source"],
            "n_retrieved": n_retrieved,
        }

    def collate(self, items: list) -> dict:
        """CM3DataModule's batch; with loss_on=target every target outside the masks is -100.
        Unpacked rows also carry `sources` (each row's source name: the per-source validation loss)."""
        out = super().collate(items)
        if items and not isinstance(items[0], Row):
            out["sources"] = [e["source"] for e in items]
        if self.loss_on == "target":
            width = out["targets"].shape[1] + 1
            masks = np.zeros((len(items), width), dtype=bool)
            for i, item in enumerate(items):
                m = item.loss_mask if isinstance(item, Row) else item["loss_mask"]
                masks[i, : len(m)] = m[:width]
            out["targets"][~torch.from_numpy(masks[:, 1:])] = IGNORE_INDEX  # mask[t] marks target ids[t]
            out["n_real"] = int((out["targets"] != IGNORE_INDEX).sum())
        return out

    def _packer(self, split: bool) -> MaskedRowPacker | None:
        return None if self.packing == "none" else MaskedRowPacker(self.seq_len, self.vocab.pad_id, split=split)

    def _stream(self, shards: list[str], plan, seed: int, train: bool, packer) -> SftShardStream:
        decode = functools.partial(decode_record, vocab=self.vocab)
        return SftShardStream(
            shards,
            plan,
            decode,
            self.make_example,
            seed=seed,
            train=train,
            batch_size=self.micro_batch_size,
            packer=packer,
        )

    def train_dataloader(self):
        stream = self._stream(
            self.train_shards, self.train_plan, self.seed, True, self._packer(self.packing == "split")
        )
        stream.start_batch = self._next_batch = self._start_batch
        rank = self.trainer.global_rank if self.trainer is not None else 0
        stream.start_positions = self._start_positions.get(rank, {})
        return self._loader(stream, self.num_workers)

    def val_dataloader(self):
        # whole examples when packing, one worker: a fixed order (as CM3DataModule)
        stream = self._stream(self.val_shards, self.val_plan, self.seed + 1, False, self._packer(False))
        return self._loader(stream, min(self.num_workers, 1))

    @property
    def source_names(self) -> tuple[str, ...]:
        """The mixture's sources in config order: the LightningModule logs val/loss_source/<name> for each."""
        return tuple(self.sources)

    def val_samples(self, n: int) -> list[TokenSample]:
        """The first n validation samples of the plain caption template (`{caption} <break> {image}`,
        the pretraining layout) as TokenSamples: prompts of the sampling callback."""
        out: list[TokenSample] = []
        for name, src in self.sources.items():
            if src.task != "caption":
                continue
            for path in self.val_by_source[name][0]:
                for raw in read_token_shard(path):
                    rec = decode_record(raw, self.vocab)
                    if rec.meta["template"] != "caption":
                        continue
                    b = int(np.flatnonzero(rec.ids == self.vocab.break_id)[0])  # </s> caption <break> image </s>
                    codes = self.vocab.ids_to_codes(rec.ids[b + 1 : -1])
                    out.append(TokenSample(rec.key, rec.meta["fields"]["caption"], rec.ids[1:b], codes))
                    if len(out) >= n:
                        return out
        return out

    # ---- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """CM3DataModule's stream position, plus the resolved mixture (samples per source per epoch)."""
        state = super().state_dict()
        state["mixture"] = {n: s.samples for n, s in (self.shares or {}).items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        mixture = {n: s.samples for n, s in (self.shares or {}).items()}
        if state.get("mixture") != mixture:
            raise UsageError(
                f"the checkpoint's SFT mixture {state.get('mixture')} is not this run's {mixture} (samples per "
                "source per epoch): resuming would read other samples; use its sources and weights"
            )
        super().load_state_dict(state)


def _flatten(by_source: dict[str, tuple[list[str], list[int]]]) -> tuple[list[str], list[tuple[int, tuple[int, ...]]]]:
    """All shard paths in source order, and per source (index of its first shard, sample counts)."""
    paths, layout = [], []
    for shards, counts in by_source.values():
        layout.append((len(paths), tuple(counts)))
        paths += shards
    return paths, layout
