"""Raw shards -> token shards (see `token_shards.py` for the output format).

Each raw shard becomes one token shard of the same name, written to a temporary file and renamed
when complete, with a `NNNNNN.stats.json` sidecar recording what it was made from (the raw shard's
size + mtime, the tokenizers' hashes) and its sample keys. A rerun reuses a token shard only when
its sidecar matches (resumable at shard granularity); a raw shard that changed is made again and
reported as re-made. Shards are spread over worker processes on CPU; on a GPU one process encodes
large batches. Bad samples are skipped and counted by reason (`checked_reader.py`, the one
raw-sample decoder).

Checked before anything is written: the raw shards exist, two raw shards do not map to one token
shard name, and the output folder holds no token shards of other inputs (another tokenizer, or a
raw shard that is no longer in the input): those are replaced only with `overwrite=True`. A sample
key found in two raw shards stops the run with both named (keys must be unique in a split).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from cm3leon.data.checked_reader import SKIP_REASONS, SkipCounter, iter_raw_samples, merge_skips
from cm3leon.data.raw_shards import list_shards
from cm3leon.data.token_shards import REPORT_FILE, TokenSample, encode_sample, read_meta, write_meta
from cm3leon.errors import UsageError
from cm3leon.tokenizers.image_tokenizer import ImageTokenizer
from cm3leon.tokenizers.text_tokenizer import TextTokenizer
from cm3leon.utils import atomic_path, file_sha256, file_stamp, write_json_atomic


@dataclass
class PreprocessConfig:
    image_tokenizer: str
    text_tokenizer: str
    device: str = "cpu"
    batch_size: int = 64
    num_workers: int = 2
    min_image_side: int | None = None  # default: half the tokenizer's resolution


class ShardTokenizer:
    """Tokenizes one raw shard at a time: captions with BPE, images with the VQGAN."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        self.text = TextTokenizer.from_file(cfg.text_tokenizer)
        self.image = ImageTokenizer.from_checkpoint(cfg.image_tokenizer, device=cfg.device)
        self.min_side = cfg.min_image_side or max(1, self.image.resolution // 2)

    def _encode_batch(self, batch) -> list[TokenSample]:
        with torch.inference_mode():
            codes = self.image.encode([s.image for s in batch]).cpu().numpy()
        text = self.text.encode_batch([s.caption for s in batch])
        return [
            TokenSample(s.key, s.caption, np.asarray(t, dtype=np.uint16), c.astype(np.uint16))
            for s, t, c in zip(batch, text, codes)
        ]

    def process(self, in_path: str, out_path: Path, made_from: dict | None = None) -> dict:
        """Tokenize `in_path` into `out_path` (atomically); return its counts. `made_from` (the raw
        shard's stamp, the tokenizers' hashes) is recorded in the stats sidecar with the keys."""
        skipped = SkipCounter()  # counts by reason and names the first places of each
        keys: list[str] = []
        with atomic_path(out_path) as tmp, wds.TarWriter(str(tmp)) as sink:
            batch = []
            for sample in iter_raw_samples(in_path, skipped, self.min_side):
                batch.append(sample)
                if len(batch) == self.cfg.batch_size:
                    for s in self._encode_batch(batch):
                        sink.write(encode_sample(s))
                    keys += [s.key for s in batch]
                    batch = []
            if batch:
                for s in self._encode_batch(batch):
                    sink.write(encode_sample(s))
                keys += [s.key for s in batch]
        stats = {
            "shard": Path(in_path).name,
            "raw": str(in_path),
            "written": len(keys),
            "skipped": dict(skipped),
            "skipped_where": skipped.examples,
            "made_from": made_from or {},
            "keys": keys,
        }
        write_json_atomic(_stats_path(out_path), stats, indent=None)
        return stats


def _stats_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name.removesuffix(".tar") + ".stats.json")


_worker: ShardTokenizer | None = None


def _init_worker(cfg: PreprocessConfig, threads: int) -> None:
    global _worker
    torch.set_num_threads(threads)
    _worker = ShardTokenizer(cfg)


def _run_job(job: tuple[str, str, dict]) -> dict:
    return _worker.process(job[0], Path(job[1]), job[2])


def tokenizer_files(cfg: PreprocessConfig) -> dict:
    """{image_tokenizer, text_tokenizer: {path, sha256}}: which files make a folder's token shards."""
    return {
        name: {"path": str(path), "sha256": file_sha256(path)}
        for name, path in (("image_tokenizer", cfg.image_tokenizer), ("text_tokenizer", cfg.text_tokenizer))
    }


def other_tokenizer(out_dir: Path, files: dict) -> str | None:
    """The first tokenizer (by name) whose file differs from the one `out_dir`'s shards were made
    with (`files`: `tokenizer_files`); None when they match or the folder holds no shards yet."""
    if not (out_dir / "meta.json").is_file():
        return None
    old = read_meta(out_dir)
    return next((name for name in files if old.get(name, {}).get("sha256") != files[name]["sha256"]), None)


def _tokenizer_meta(cfg: PreprocessConfig) -> dict:
    text = TextTokenizer.from_file(cfg.text_tokenizer)
    image = ImageTokenizer.from_checkpoint(cfg.image_tokenizer)
    return {
        "vocab": {"text_size": text.vocab_size, "n_image_codes": image.n_codes},
        "tokens_per_image": image.tokens_per_image,
        "image_resolution": image.resolution,
        **tokenizer_files(cfg),
    }


def _raw_stamp(shard: str) -> list[int] | None:
    """[size, mtime_ns] of a local raw shard; None for remote specs (`pipe:`, `s3://`: not checked)."""
    return file_stamp(shard) if os.path.isfile(shard) else None


def _read_stats(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class SplitPlan:
    """What `preprocess_split` would do, decided before anything is written."""

    jobs: list[tuple[str, str, dict]] = field(default_factory=list)  # (raw shard, token shard, made_from)
    reused: list[dict] = field(default_factory=list)  # stats of token shards that match their inputs
    remade: list[str] = field(default_factory=list)  # raw shards whose token shard exists but is stale
    orphans: list[Path] = field(default_factory=list)  # token shards with no raw shard in the input
    other_tokenizer: str | None = None  # the tokenizer the folder was made with, when another

    @property
    def up_to_date(self) -> bool:
        return not self.jobs and not self.orphans and self.other_tokenizer is None


def plan_split(raw: str, out_dir: str | Path, files: dict) -> SplitPlan:
    """Compare `out_dir`'s token shards with the raw shards of `raw` and the tokenizer `files`
    (`tokenizer_files`). Raises a one-line error for missing raw shards or two raw shards that
    would make one token shard."""
    out_dir = Path(out_dir)
    shards = list_shards(raw)
    by_name: dict[str, str] = {}
    for shard in shards:
        name = Path(shard).name
        if name in by_name:
            raise UsageError(
                f"raw shards {by_name[name]} and {shard} would both become {out_dir / name}: "
                "preprocess them into separate output folders, or rename one"
            )
        by_name[name] = shard
    plan = SplitPlan(other_tokenizer=other_tokenizer(out_dir, files))
    tokenizers = {name: files[name]["sha256"] for name in ("image_tokenizer", "text_tokenizer")}
    for name, shard in by_name.items():
        out_path = out_dir / name
        made_from = {"raw_stamp": _raw_stamp(shard), "tokenizers": tokenizers}
        stats = _read_stats(_stats_path(out_path)) if out_path.is_file() else None
        old = (stats or {}).get("made_from", {})
        same_tokenizers = old.get("tokenizers") == tokenizers
        if stats is not None and same_tokenizers and old.get("raw_stamp") == made_from["raw_stamp"]:
            plan.reused.append(stats)  # a remote raw shard (no stamp) is trusted by name, as before
            continue
        if stats is not None and same_tokenizers:
            plan.remade.append(shard)  # the raw shard changed since its token shard was made
        plan.jobs.append((shard, str(out_path), made_from))
    plan.orphans = sorted(p for p in out_dir.glob("*.tar") if p.name not in by_name)
    return plan


def _check_overwrite(out_dir: Path, plan: SplitPlan, overwrite: bool) -> None:
    """Refuse (one line) to replace token shards made from other inputs unless `overwrite`."""
    if overwrite:
        return
    if plan.other_tokenizer:
        name = plan.other_tokenizer
        raise UsageError(
            f"{out_dir} holds token shards made with another {name} ({read_meta(out_dir)[name]['path']}): "
            "pass overwrite=true to make them again, or write to a new output folder"
        )
    if plan.orphans:
        raise UsageError(
            f"{out_dir} holds {len(plan.orphans)} token shards whose raw shard is not in the input "
            f"(e.g. {plan.orphans[0].name}): pass overwrite=true to remove them, or write to a new output folder"
        )


def _key_hashes(keys: list[str]) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys], np.uint64
    )


def check_unique_keys(all_stats: list[dict]) -> None:
    """Raise a one-line UsageError naming a sample key found twice and the raw shards holding it.

    Keys are compared as 64-bit hashes (12 bytes per sample in memory); a hash match is confirmed
    on the keys themselves before it is reported."""
    with_keys = [s for s in all_stats if s.get("keys")]
    if not with_keys:
        return
    hashes = np.concatenate([_key_hashes(s["keys"]) for s in with_keys])
    owner = np.concatenate([np.full(len(s["keys"]), i, np.int32) for i, s in enumerate(with_keys)])
    pos = np.concatenate([np.arange(len(s["keys"]), dtype=np.int32) for s in with_keys])
    order = np.argsort(hashes, kind="stable")
    for d in np.flatnonzero(hashes[order][1:] == hashes[order][:-1]):
        a, b = order[d], order[d + 1]
        key_a, key_b = with_keys[owner[a]]["keys"][pos[a]], with_keys[owner[b]]["keys"][pos[b]]
        if key_a == key_b:
            src_a, src_b = (with_keys[owner[i]].get("raw", with_keys[owner[i]]["shard"]) for i in (a, b))
            where = f"raw shard {src_a} twice" if src_a == src_b else f"raw shards {src_a} and {src_b}"
            raise UsageError(
                f"sample key {key_a!r} is in {where}: keys must be unique in a split "
                "(make the shards again with distinct keys, e.g. make_shards key_prefix=...)"
            )


def preprocess_split(
    raw: str, out_dir: str | Path, cfg: PreprocessConfig, progress: bool = True, overwrite: bool = False
) -> dict:
    """Tokenize every raw shard of `raw` (folder, glob or brace pattern) into `out_dir`.

    Returns the report (also written to `out_dir/report.json`): samples written, skipped per reason,
    shards processed now, shards reused from an earlier run and shards re-made because their raw
    shard changed. Nothing is written before the inputs are checked (see the module docstring).
    """
    out_dir = Path(out_dir)
    meta = _tokenizer_meta(cfg)
    plan = plan_split(raw, out_dir, {k: meta[k] for k in ("image_tokenizer", "text_tokenizer")})
    _check_overwrite(out_dir, plan, overwrite)
    for orphan in plan.orphans:  # allowed by overwrite: token shards of raw shards no longer in the input
        orphan.unlink()
        _stats_path(orphan).unlink(missing_ok=True)
    write_meta(out_dir, {**meta, "source": str(raw)})
    check_unique_keys(plan.reused)

    t0 = time.time()
    jobs = plan.jobs
    done: list[dict] = []
    bar = tqdm(total=len(jobs), desc=f"preprocess {out_dir.name}", unit="shard", disable=not progress or not jobs)
    use_pool = cfg.num_workers > 1 and cfg.device == "cpu" and len(jobs) > 1
    if use_pool:
        threads = max(1, (os.cpu_count() or 1) // cfg.num_workers)
        # spawn, not fork: a forked child of a process whose torch threads already ran can deadlock
        with mp.get_context("spawn").Pool(cfg.num_workers, _init_worker, (cfg, threads)) as pool:
            for stats in pool.imap_unordered(_run_job, jobs):
                done.append(stats)
                bar.update()
    elif jobs:
        worker = ShardTokenizer(cfg)
        for shard, out_path, made_from in jobs:
            done.append(worker.process(shard, Path(out_path), made_from))
            bar.update()
    bar.close()

    all_stats = plan.reused + done
    check_unique_keys(all_stats)  # before report.json: an unfinished report marks the split as not done
    skipped, where = merge_skips(all_stats)
    report = {
        "raw": str(raw),
        "out_dir": str(out_dir),
        "shards": len(all_stats),
        "shards_processed": len(done),
        "shards_reused": len(plan.reused),
        "shards_remade": len(plan.remade),
        "shards_removed": len(plan.orphans),
        "written": sum(s["written"] for s in all_stats),
        "skipped": {r: skipped.get(r, 0) for r in SKIP_REASONS},
        "skipped_where": where,  # the first places of each reason ("shard.tar: key")
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(out_dir / REPORT_FILE, report)
    return report


def summary_line(report: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items() if v) or "none"
    return (
        f"{report['out_dir']}: {report['written']} samples in {report['shards']} shards "
        f"({report['shards_processed']} new, {report['shards_reused']} reused), skipped: {skipped}, "
        f"{report['seconds']} s"
        + (f"; re-made {report['shards_remade']} shards whose raw input changed" if report.get("shards_remade") else "")
        + (
            f"; removed {report['shards_removed']} shards of raw input no longer given"
            if report.get("shards_removed")
            else ""
        )
    )
