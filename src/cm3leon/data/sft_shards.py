"""SFT token shards: instruction samples as token sequences (ids + target mask), one folder per source.

Layout under a tokens folder (`data.tokens_dir`):

    {train,val}/meta.json              tokenizers (paths, sha256), vocab sizes, tokens per image: the
                                       token-shard meta of preprocessing (`token_shards.read_meta`)
    {train,val}/<source>/NNNNNN.tar    the samples; NNNNNN.stats.json beside each (its counts and
                                       what made it: a rerun reuses a shard whose inputs match)
    {train,val}/<source>/report.json   what made the source and its counts, written last (a source
                                       without it is incomplete)

One sample (the key is `<source>-<split>-<index>`: a world sample's index or a file's row):

    KEY.json       {key, source, task, template, fields, objects, where}
    KEY.ids.npy    uint16 [T]  `build_sft_sequence`'s ids, in the canonical layout below
    KEY.mask.npy   bool [T]    its target mask (the template's output: the last image, or the answer
                               or caption text; see `sft_templates`)

Canonical ids: the sequence is built with `Vocab(text_size, n_image_codes)` without a gap or
sentinels: text ids, image code c at text_size + c, `<break>` at text_size + n_image_codes (fits
uint16 for the paper's table). `to_vocab_ids` maps them to the training Vocab (its base_size and
sentinels come from data.vocab or the init checkpoint), so the shards, like pretraining token
shards, do not depend on those. Shards hold the plain form only: the infilling form of text
targets (three tokens longer) is made at training time (`sft_datamodule`), so a text-target
sample must fit seq_len - 3.

Sources (`SftSource`): `world` (the embedded world's tasks, `sft_world.sft_samples`; made on
first use by the DataModule) or `file` (bring your own JSONL/CSV, `sft_files`; made by
`python src/make_sft_shards.py`); `SftShardMaker` makes both, resumable at shard granularity. Images are encoded with preprocessing's tokenizers
(`preprocess.ShardTokenizer`), text with its BPE; rows that cannot be used are skipped and
counted by reason (`sft_files.SFT_SKIP_REASONS`) in the stats, the report and one summary line.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from cm3leon.data.checked_reader import SkipCounter, count_skip, merge_skips
from cm3leon.data.preprocess import PreprocessConfig, ShardTokenizer, _tokenizer_meta, other_tokenizer
from cm3leon.data.raw_shards import SHARD_PATTERN
from cm3leon.data.sft_files import (
    BOX_UNITS,
    SFT_SKIP_REASONS,
    TASK_COLUMNS,
    RowSkipped,
    image_path,
    parse_row,
    read_table,
)
from cm3leon.data.sft_templates import IMAGE_SLOTS, TARGET_OF, SftSample, build_sft_sequence
from cm3leon.data.sft_world import SFT_TASKS, sample_images, sft_sample
from cm3leon.data.token_shards import META_FILE, read_meta, write_meta
from cm3leon.errors import UsageError
from cm3leon.utils import atomic_path, digest, file_sha256, file_stamp, write_json_atomic
from cm3leon.vocab import Vocab

FORMAT_VERSION = 1
SOURCE_KINDS = ("world", "file")
SPLITS = ("train", "val")
REPORT_FILE = "report.json"
INFILL_EXTRA = 3  # tokens the infilling form adds: <sentinel:0> in place, <sentinel:0> ... <eoss> appended


# ---- sources ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SftSource:
    """One instruction source: a folder `{split}/<name>/` of token shards.

    kind world: `n_train` / `n_val` samples of world task `task` (`sft_world`, seed `seed`).
    kind file:  `train_file` / `val_file` (JSONL/CSV rows of `task`, `sft_files`; box_units for grounded).
    weight: the source's share of an epoch before the caps (`sft_mixture`); 0: not trained on.
    """

    name: str
    task: str
    kind: str = "world"
    weight: float = 1.0
    n_train: int = 0
    n_val: int = 0
    seed: int = 0
    train_file: str | None = None
    val_file: str | None = None
    box_units: str = "pixels"

    @classmethod
    def from_config(cls, name: str, node: Mapping) -> SftSource:
        """A `data.sources.<name>` node -> SftSource, checked (one-line UsageError)."""
        known = {f for f in cls.__dataclass_fields__ if f != "name"}
        unknown = sorted(set(node) - known)
        if unknown:
            raise UsageError(f"data.sources.{name}: unknown keys {unknown}; known: {sorted(known)}")
        src = cls(name=name, **dict(node))
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise UsageError(f"data.sources.{name}: a source name is a folder name of [A-Za-z0-9_-]")
        if src.kind not in SOURCE_KINDS:
            raise UsageError(f"data.sources.{name}.kind={src.kind!r} is not one of {SOURCE_KINDS}")
        tasks = SFT_TASKS if src.kind == "world" else tuple(TASK_COLUMNS)
        if src.task not in tasks:
            raise UsageError(f"data.sources.{name}.task={src.task!r}: a {src.kind} source's task is one of {tasks}")
        if src.kind == "file" and not src.train_file and not src.val_file:
            raise UsageError(f"data.sources.{name}: a file source needs train_file and/or val_file (JSONL or CSV)")
        if src.box_units not in BOX_UNITS:
            raise UsageError(f"data.sources.{name}.box_units={src.box_units!r} is not pixels or grid")
        return src

    def has(self, split: str) -> bool:
        """Does the source have samples in `split` (a count or a file)?"""
        return bool(getattr(self, f"n_{split}") if self.kind == "world" else getattr(self, f"{split}_file"))

    def spec(self, split: str) -> dict:
        """What makes the source's `split` (weights are the mixture's, not the shards')."""
        if self.kind == "world":
            return {"kind": "world", "task": self.task, "n": getattr(self, f"n_{split}"), "seed": self.seed}
        return {"kind": "file", "task": self.task, "file": getattr(self, f"{split}_file"), "box_units": self.box_units}


def parse_sources(node: Mapping) -> dict[str, SftSource]:
    """`data.sources` -> {name: SftSource}."""
    if not node:
        raise UsageError("data.sources is empty: list the SFT sources (conf/data/sft_world.yaml)")
    return {name: SftSource.from_config(name, spec) for name, spec in node.items()}


# ---- ids and records -------------------------------------------------------------------------
def canonical_vocab(text_size: int, n_image_codes: int) -> Vocab:
    """The id layout shards are stored in (module docstring)."""
    if text_size + n_image_codes > np.iinfo(np.uint16).max:
        raise UsageError(f"{text_size} text ids + {n_image_codes} image codes do not fit the SFT shards' uint16 ids")
    return Vocab(text_size=text_size, n_image_codes=n_image_codes, n_sentinels=1, pad_multiple=1)


def to_vocab_ids(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Canonical ids (uint16 [T]) -> ids of `vocab` (int64 [T]): image codes and <break> moved."""
    ids = np.asarray(ids, dtype=np.int64)
    text, codes = vocab.text_size, vocab.n_image_codes
    out = ids.copy()
    image = (ids >= text) & (ids < text + codes)
    out[image] += vocab.image_offset - text
    out[ids == text + codes] = vocab.break_id
    if ids.max(initial=0) > text + codes:
        raise ValueError("SFT shard ids above <break>: not a plain-form SFT sequence")
    return out


@dataclass
class SftRecord:
    """One sample read back: ids int64 [T] in the training vocab, loss_mask bool [T] (marks ids[t]
    as a target), and its json (key, source, task, template, fields, objects, where)."""

    ids: np.ndarray
    loss_mask: np.ndarray
    meta: dict

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def sample(self) -> SftSample:
        """The instruction sample the record was built from (its template, fields and objects)."""
        m = self.meta
        return SftSample(m["template"], m["fields"], tuple(m.get("objects") or ()), key=m["key"])

    @property
    def text_target(self) -> bool:
        """The output is text (caption, VQA answer): trainable in the infilling form."""
        return TARGET_OF[self.meta["template"]] not in IMAGE_SLOTS


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def encode_record(key: str, source: str, sample: SftSample, ids: np.ndarray, mask: np.ndarray, where: str) -> dict:
    """One built sample -> the tar members (canonical ids)."""
    meta = {
        "key": key,
        "source": source,
        "task": sample.task,
        "template": sample.template,
        "fields": dict(sample.fields),
        "objects": [[name, list(box)] for name, box in sample.objects],
        "where": where,
    }
    return {
        "__key__": key,
        "json": json.dumps(meta).encode("utf-8"),
        "ids.npy": _npy(np.asarray(ids, dtype=np.uint16)),
        "mask.npy": _npy(np.asarray(mask, dtype=bool)),
    }


def decode_record(raw: dict, vocab: Vocab) -> SftRecord:
    """A raw tar sample ({'json', 'ids.npy', 'mask.npy'} bytes) -> SftRecord in `vocab`'s ids."""
    ids = np.load(io.BytesIO(raw["ids.npy"]), allow_pickle=False)
    mask = np.load(io.BytesIO(raw["mask.npy"]), allow_pickle=False)
    return SftRecord(to_vocab_ids(ids, vocab), mask.astype(bool), json.loads(raw["json"]))


# ---- making one shard ------------------------------------------------------------------------
@dataclass
class ShardJob:
    """One shard of a source's split: world samples [start, stop) or file `rows` [(row index, row)]."""

    source: SftSource
    split: str
    out_path: str
    made_from: dict
    start: int = 0
    stop: int = 0
    rows: list = field(default_factory=list)
    base: str = ""  # the file's folder (image paths are relative to it)


def _stats_path(out_path: Path) -> Path:
    # the name token_stream.shard_sample_count reads
    return out_path.with_name(out_path.name.removesuffix(".tar") + ".stats.json")


class SftShardWriter:
    """Makes SFT shards: items -> images encoded in batches -> sequences -> tar + stats sidecar."""

    def __init__(self, cfg: PreprocessConfig, seq_len: int):
        self.cfg, self.seq_len = cfg, int(seq_len)
        self.tok = ShardTokenizer(cfg)  # preprocessing's tokenizers (and its minimum image side)
        self.vocab = canonical_vocab(self.tok.text.vocab_size, self.tok.image.n_codes)

    def _items(self, job: ShardJob, skipped: SkipCounter) -> Iterator[tuple[str, SftSample, dict, str]]:
        """(key, sample, images by slot, where) of the job's good rows; bad rows counted."""
        src = job.source
        if src.kind == "world":
            for i in range(job.start, job.stop):
                s = sft_sample(src.seed, src.task, job.split, i)
                yield f"{src.name}-{job.split}-{i:09d}", s.sft, sample_images(s), f"world {s.sft.key}"
            return
        name = Path(getattr(src, f"{job.split}_file")).name
        for i, row in job.rows:
            key, where = f"{src.name}-{job.split}-{i:09d}", f"{name} row {i + 1}"
            try:
                item = parse_row(row, src.task, Path(job.base), key, self.tok.min_side, src.box_units)
            except RowSkipped as e:
                count_skip(skipped, e.reason, where)
                continue
            yield key, item.sample, item.images, where

    def _batches(self, items: Iterator) -> Iterator[list]:
        """Items in groups of at least `cfg.batch_size` images (one VQGAN forward each)."""
        batch: list = []
        for item in items:
            batch.append(item)
            if sum(len(images) for _, _, images, _ in batch) >= self.cfg.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _build(self, batch: list, source: SftSource, skipped: SkipCounter) -> Iterator[tuple[dict, int]]:
        """Encode a batch's images at once, build each sequence: (tar members, length needed)."""
        flat = [im for _, _, images, _ in batch for im in images.values()]
        with torch.inference_mode():
            codes = self.tok.image.encode(flat).cpu().numpy()
        k = 0
        for key, sample, images, where in batch:
            by_slot = {slot: codes[k + j] for j, slot in enumerate(images)}
            k += len(images)
            try:
                ids, mask = build_sft_sequence(sample, self.vocab, self.tok.text.encode, by_slot)
            except ValueError:
                if source.kind == "world":
                    raise  # a world sample the templates refuse is a bug, not a bad row
                count_skip(skipped, "bad_field", where)  # a file row's field the template cannot take
                continue
            needed = len(ids) + (INFILL_EXTRA if sample.target not in IMAGE_SLOTS else 0)
            if needed > self.seq_len:
                count_skip(skipped, "over_length", where)
                continue
            yield encode_record(key, source.name, sample, ids, mask, where), needed

    def process(self, job: ShardJob) -> dict:
        """Write the job's shard (atomically) and its stats sidecar; return the stats."""
        t0 = time.time()
        skipped, written, longest = SkipCounter(), 0, 0
        out_path = Path(job.out_path)
        with atomic_path(out_path) as tmp, wds.TarWriter(str(tmp)) as sink:
            for batch in self._batches(self._items(job, skipped)):
                for members, needed in self._build(batch, job.source, skipped):
                    sink.write(members)
                    written, longest = written + 1, max(longest, needed)
        stats = {
            "shard": out_path.name,
            "written": written,
            "longest": longest,
            "skipped": dict(skipped),
            "skipped_where": skipped.examples,
            "made_from": job.made_from,
            "seconds": round(time.time() - t0, 3),
        }
        write_json_atomic(_stats_path(out_path), stats, indent=None)
        return {**stats, "path": str(out_path)}


_worker: SftShardWriter | None = None


def _init_worker(cfg: PreprocessConfig, seq_len: int, threads: int) -> None:
    global _worker
    torch.set_num_threads(threads)
    _worker = SftShardWriter(cfg, seq_len)


def _run_job(job: ShardJob) -> dict:
    return _worker.process(job)


# ---- making sources --------------------------------------------------------------------------
def _read_stats(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def source_inputs(source: SftSource, split: str, files: dict, shard_size: int) -> dict:
    """What a source's shards are made from (`files`: `preprocess.tokenizer_files`); `digest` of it is
    the source's fingerprint (a file source adds its table's hash and its images' stamps)."""
    tokenizers = {k: files[k]["sha256"] for k in ("image_tokenizer", "text_tokenizer")}
    return {"format": FORMAT_VERSION, "spec": source.spec(split), "shard_size": shard_size, "tokenizers": tokenizers}


def _file_inputs(source: SftSource, split: str) -> tuple[list[dict], Path, dict]:
    """(rows, the file's folder, what the rows' files are) of a file source's split."""
    path = Path(getattr(source, f"{split}_file"))
    rows = read_table(path, source.task)
    base = path.parent
    columns = TASK_COLUMNS[source.task]["images"].values()
    images = [
        [str(p), file_stamp(p) if p.is_file() else None]
        for r in rows
        if "__error__" not in r
        for p in (image_path(r, c, base) for c in columns)
        if p is not None
    ]
    return rows, base, {"table_sha256": file_sha256(path), "images": digest(images)}


@dataclass
class _SourcePlan:
    """What making one source's split takes: the shard jobs to run and the shard stats to reuse."""

    source: SftSource
    split: str
    fingerprint: str
    names: list[str]
    jobs: list[ShardJob]
    reused: list[dict]


class SftShardMaker:
    """Makes SFT sources into `tokens_dir` with one set of tokenizers (`cfg`), loaded and hashed once.

    `make([(source, split), ...])` plans every source first (checks, shards to reuse), runs all shard
    jobs together (over `cfg.num_workers` processes on CPU), then writes each source's report.
    Refused in one line unless `overwrite`: a split folder made with other tokenizers, a file
    source's folder made from other inputs."""

    def __init__(
        self,
        tokens_dir: str | Path,
        cfg: PreprocessConfig,
        seq_len: int,
        shard_size: int = 1000,
        overwrite: bool = False,
        progress: bool = True,
    ):
        self.tokens_dir, self.cfg, self.seq_len = Path(tokens_dir), cfg, int(seq_len)
        self.shard_size, self.overwrite, self.progress = int(shard_size), overwrite, progress
        self.meta = _tokenizer_meta(cfg)  # preprocessing's meta.json: tokenizer paths, hashes, sizes
        self.files = {k: self.meta[k] for k in ("image_tokenizer", "text_tokenizer")}

    def make(self, todo: list[tuple[SftSource, str]]) -> list[dict]:
        """Make each (source, split); returns their reports (also each folder's report.json)."""
        plans = [self._plan(source, split) for source, split in todo]
        done = {s["path"]: s for s in self._run([j for p in plans for j in p.jobs])}
        return [self._report(p, done) for p in plans]

    def _plan(self, source: SftSource, split: str) -> _SourcePlan:
        if split not in SPLITS or not source.has(split):
            raise UsageError(f"SFT source {source.name} has no {split!r} split (n_{split} or {split}_file)")
        split_dir = self.tokens_dir / split
        out = split_dir / source.name
        other = other_tokenizer(split_dir, self.files)
        if other and not self.overwrite:
            raise UsageError(
                f"{split_dir} holds SFT shards made with another {other} ({read_meta(split_dir)[other]['path']}): "
                "pass overwrite=true to make them again, or write to a new tokens_dir"
            )
        if other or not (split_dir / META_FILE).is_file():
            write_meta(split_dir, {**self.meta, "kind": "sft"})
        inputs = source_inputs(source, split, self.files, self.shard_size)
        rows, base = [], Path()
        if source.kind == "world":
            n = int(source.spec(split)["n"])
        else:
            rows, base, inputs["files"] = _file_inputs(source, split)
            n = len(rows)
        fingerprint = digest(inputs)
        old = _read_stats(out / REPORT_FILE)
        if old is not None and old.get("fingerprint") != fingerprint and source.kind == "file" and not self.overwrite:
            raise UsageError(
                f"{out} holds shards made from other inputs or settings: pass overwrite=true to make them again, "
                "or write to a new tokens_dir"
            )
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_FILE).unlink(missing_ok=True)  # the report marks a complete source: none while making
        names = [SHARD_PATTERN % j for j in range(math.ceil(n / self.shard_size))]
        for orphan in sorted(p for p in out.glob("*.tar") if p.name not in names):
            orphan.unlink()  # shards of an earlier, larger input (the folder is this source's own)
            _stats_path(orphan).unlink(missing_ok=True)
        jobs, reused = [], []
        for j, name in enumerate(names):
            made_from = {"fingerprint": fingerprint, "shard": j, "seq_len": self.seq_len}
            stats = _read_stats(_stats_path(out / name)) if (out / name).is_file() else None
            if stats is not None and stats.get("made_from") == made_from:
                reused.append(stats)
                continue
            lo, hi = j * self.shard_size, min(n, (j + 1) * self.shard_size)
            job = ShardJob(source, split, str(out / name), made_from, start=lo, stop=hi, base=str(base))
            if source.kind == "file":
                job.rows = [(i, rows[i]) for i in range(lo, hi)]
            jobs.append(job)
        return _SourcePlan(source, split, fingerprint, names, jobs, reused)

    def _run(self, jobs: list[ShardJob]) -> list[dict]:
        """Run shard jobs: spread over `cfg.num_workers` processes on CPU, else in this process."""
        from tqdm import tqdm

        if not jobs:
            return []
        done = []
        bar = tqdm(total=len(jobs), desc="sft shards", unit="shard", disable=not self.progress)
        cfg = self.cfg
        if cfg.num_workers > 1 and cfg.device == "cpu" and len(jobs) > 1:
            threads = max(1, (os.cpu_count() or 1) // cfg.num_workers)
            # spawn, not fork: a forked child of a process whose torch threads already ran can deadlock
            with mp.get_context("spawn").Pool(cfg.num_workers, _init_worker, (cfg, self.seq_len, threads)) as pool:
                for stats in pool.imap_unordered(_run_job, jobs):
                    done.append(stats)
                    bar.update()
        else:
            writer = SftShardWriter(cfg, self.seq_len)
            for job in jobs:
                done.append(writer.process(job))
                bar.update()
        bar.close()
        return done

    def _report(self, plan: _SourcePlan, done: dict[str, dict]) -> dict:
        out = self.tokens_dir / plan.split / plan.source.name
        mine = {s["shard"]: s for s in plan.reused}
        mine.update({Path(j.out_path).name: done[j.out_path] for j in plan.jobs})
        all_stats = [mine[name] for name in plan.names]
        skipped, where = merge_skips(all_stats)
        report = {
            "format_version": FORMAT_VERSION,
            "source": asdict(plan.source),
            "split": plan.split,
            "fingerprint": plan.fingerprint,
            "seq_len": self.seq_len,
            "tokenizers": {k: v["sha256"] for k, v in self.files.items()},
            "shards": [{"name": s["shard"], "written": s["written"]} for s in all_stats],
            "written": sum(s["written"] for s in all_stats),
            "longest": max([s["longest"] for s in all_stats], default=0),
            "skipped": {r: skipped.get(r, 0) for r in SFT_SKIP_REASONS},
            "skipped_where": where,
            "shards_made": len(plan.jobs),
            "shards_reused": len(plan.reused),
            "seconds": round(sum(done[j.out_path]["seconds"] for j in plan.jobs), 2),  # work, summed over shards
        }
        write_json_atomic(out / REPORT_FILE, report)
        return report


def summary_line(report: dict) -> str:
    """One line: samples and shards written, skipped by reason, seconds."""
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items() if v) or "none"
    src = report["source"]
    return (
        f"[sft] {report['split']}/{src['name']} ({src['kind']} {src['task']}): {report['written']} samples in "
        f"{len(report['shards'])} shards ({report['shards_made']} new, {report['shards_reused']} reused), "
        f"skipped: {skipped}, longest {report['longest']} tokens, {report['seconds']} s of work"
    )


# ---- reading a source back -------------------------------------------------------------------
def read_source(tokens_dir: str | Path, split: str, name: str) -> dict | None:
    """The report of source `name` in `split`, or None when it is missing or incomplete."""
    return _read_stats(Path(tokens_dir) / split / name / REPORT_FILE)


def stale_reason(
    report: dict | None, source: SftSource, split_meta: dict, seq_len: int, fingerprint: str | None
) -> str | None:
    """Why a source's shards cannot be used as they are (None: usable).

    `fingerprint`: the inputs' fingerprint when known (world sources), None to skip that check."""
    if report is None:
        return "missing or incomplete"
    if report.get("format_version") != FORMAT_VERSION:
        return f"format {report.get('format_version')} != {FORMAT_VERSION}"
    ours = {k: split_meta.get(k, {}).get("sha256") for k in ("image_tokenizer", "text_tokenizer")}
    if report.get("tokenizers") != ours:
        return "made with other tokenizers than the split's meta.json"
    if report["source"].get("task") != source.task or report["source"].get("kind") != source.kind:
        return f"made for another task ({report['source'].get('kind')} {report['source'].get('task')})"
    if fingerprint is not None and report.get("fingerprint") != fingerprint:
        return "made with other settings"
    # the shards depend on seq_len only through the samples it left out
    if report["longest"] > seq_len:
        return f"holds sequences of {report['longest']} tokens > data.seq_len={seq_len}"
    if report["skipped"].get("over_length") and report["seq_len"] != seq_len:
        return f"made with seq_len={report['seq_len']} (samples left out as over-length), not {seq_len}"
    return None


def shard_paths(tokens_dir: str | Path, split: str, report: dict) -> tuple[list[str], list[int]]:
    """(shard paths, samples per shard) of a source's report (empty shards left out)."""
    folder = Path(tokens_dir) / split / report["source"]["name"]
    kept = [s for s in report["shards"] if s["written"] > 0]
    return [str(folder / s["name"]) for s in kept], [int(s["written"]) for s in kept]


def split_meta_path(tokens_dir: str | Path, split: str) -> Path:
    return Path(tokens_dir) / split / META_FILE
