"""Raw shards -> token shards (see `token_shards.py` for the output format).

Each raw shard becomes one token shard of the same name, written to a temporary file and renamed
when complete, with a `NNNNNN.stats.json` sidecar; a rerun skips shards whose sidecar exists
(resumable at shard granularity). Shards are spread over worker processes on CPU; on a GPU one
process encodes large batches. Bad samples are skipped and counted by reason (`checked_reader.py`,
the one raw-sample decoder).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from cm3leon.data.checked_reader import SKIP_REASONS, iter_raw_samples
from cm3leon.data.raw_shards import list_shards
from cm3leon.data.token_shards import REPORT_FILE, TokenSample, encode_sample, read_meta, write_meta
from cm3leon.tokenizers.image_tokenizer import ImageTokenizer
from cm3leon.tokenizers.text_tokenizer import TextTokenizer
from cm3leon.utils import file_sha256


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

    def process(self, in_path: str, out_path: Path) -> dict:
        """Tokenize `in_path` into `out_path` (atomically); return its counts."""
        skipped: Counter = Counter()
        written = 0
        tmp = out_path.with_name(out_path.name + ".tmp")
        with wds.TarWriter(str(tmp)) as sink:
            batch = []
            for sample in iter_raw_samples(in_path, skipped, self.min_side):
                batch.append(sample)
                if len(batch) == self.cfg.batch_size:
                    for s in self._encode_batch(batch):
                        sink.write(encode_sample(s))
                    written += len(batch)
                    batch = []
            if batch:
                for s in self._encode_batch(batch):
                    sink.write(encode_sample(s))
                written += len(batch)
        os.replace(tmp, out_path)
        stats = {"shard": Path(in_path).name, "written": written, "skipped": dict(skipped)}
        _stats_path(out_path).write_text(json.dumps(stats))
        return stats


def _stats_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name.removesuffix(".tar") + ".stats.json")


_worker: ShardTokenizer | None = None


def _init_worker(cfg: PreprocessConfig, threads: int) -> None:
    global _worker
    torch.set_num_threads(threads)
    _worker = ShardTokenizer(cfg)


def _run_job(job: tuple[str, str]) -> dict:
    return _worker.process(job[0], Path(job[1]))


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


def _check_same_tokenizers(out_dir: Path, meta: dict) -> None:
    """Refuse to mix shards made with different tokenizers in one folder."""
    name = other_tokenizer(out_dir, {k: meta[k] for k in ("image_tokenizer", "text_tokenizer")})
    if name:
        raise ValueError(
            f"{out_dir} holds token shards made with another {name} ({read_meta(out_dir)[name]['path']}); "
            "write to a new output folder or delete this one"
        )


def preprocess_split(raw: str, out_dir: str | Path, cfg: PreprocessConfig, progress: bool = True) -> dict:
    """Tokenize every raw shard of `raw` (folder, glob or brace pattern) into `out_dir`.

    Returns the report (also written to `out_dir/report.json`): samples written, skipped per reason,
    shards processed now and shards reused from an earlier run.
    """
    out_dir = Path(out_dir)
    shards = list_shards(raw)
    meta = _tokenizer_meta(cfg)
    _check_same_tokenizers(out_dir, meta)
    write_meta(out_dir, {**meta, "source": str(raw)})

    jobs, reused = [], []
    for shard in shards:
        out_path = out_dir / (Path(shard).name.removesuffix(".tar") + ".tar")
        if out_path.is_file() and _stats_path(out_path).is_file():
            reused.append(json.loads(_stats_path(out_path).read_text()))
        else:
            jobs.append((shard, str(out_path)))

    t0 = time.time()
    done: list[dict] = []
    bar = tqdm(total=len(jobs), desc=f"preprocess {out_dir.name}", unit="shard", disable=not progress or not jobs)
    use_pool = cfg.num_workers > 1 and cfg.device == "cpu" and len(jobs) > 1
    if use_pool:
        threads = max(1, (os.cpu_count() or 1) // cfg.num_workers)
        with mp.get_context("fork").Pool(cfg.num_workers, _init_worker, (cfg, threads)) as pool:
            for stats in pool.imap_unordered(_run_job, jobs):
                done.append(stats)
                bar.update()
    elif jobs:
        worker = ShardTokenizer(cfg)
        for shard, out_path in jobs:
            done.append(worker.process(shard, Path(out_path)))
            bar.update()
    bar.close()

    all_stats = reused + done
    skipped = Counter()
    for s in all_stats:
        skipped.update(s["skipped"])
    report = {
        "raw": str(raw),
        "out_dir": str(out_dir),
        "shards": len(shards),
        "shards_processed": len(done),
        "shards_reused": len(reused),
        "written": sum(s["written"] for s in all_stats),
        "skipped": {r: skipped.get(r, 0) for r in SKIP_REASONS},
        "seconds": round(time.time() - t0, 2),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def summary_line(report: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items() if v) or "none"
    return (
        f"{report['out_dir']}: {report['written']} samples in {report['shards']} shards "
        f"({report['shards_processed']} new, {report['shards_reused']} reused), skipped: {skipped}, "
        f"{report['seconds']} s"
    )
