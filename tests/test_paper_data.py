"""Paper-shaped synthetic data (cm3leon.data.paper_shaped): format, shapes, retrieval, a 2-step run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cm3leon.data.paper_shaped import (
    CAPTION_MAX,
    CAPTION_MIN,
    SYNTHETIC_ENCODER,
    TOKENS_PER_IMAGE,
    make_paper_data,
    train_overrides,
)
from cm3leon.data.raw_shards import list_shards
from cm3leon.data.token_shards import decode_sample, read_meta
from cm3leon.data.token_stream import read_token_shard
from cm3leon.vocab import PAPER_IMAGE_CODES, PAPER_TEXT_SIZE

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL = {"k": 2, "encoder": {k: SYNTHETIC_ENCODER[k] for k in ("model_name", "pretrained")}}


@pytest.fixture(scope="module")
def paper_tokens(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper_shaped")
    make_paper_data(out, n_train=64, n_val=16, seed=3, shard_size=32)
    return out


def _samples(split_dir: Path):
    return [decode_sample(r) for s in list_shards(split_dir) for r in read_token_shard(s)]


def test_shards_have_the_paper_shapes(paper_tokens, tmp_path):
    meta = read_meta(paper_tokens / "train")
    assert meta["tokens_per_image"] == TOKENS_PER_IMAGE == 1024
    assert meta["vocab"] == {"text_size": PAPER_TEXT_SIZE, "n_image_codes": PAPER_IMAGE_CODES}
    assert meta["text_tokenizer"]["synthetic"] and "synthetic" in meta["image_tokenizer"]["sha256"]
    train, val = _samples(paper_tokens / "train"), _samples(paper_tokens / "val")
    assert len(train) == 64 and len(val) == 16
    keys = [s.key for s in train + val]
    assert len(set(keys)) == len(keys)
    lengths = np.array([len(s.text_ids) for s in train + val])
    assert lengths.min() >= CAPTION_MIN and lengths.max() <= CAPTION_MAX and 12 <= np.median(lengths) <= 30
    for s in train:
        assert s.codes.dtype == np.uint16 and s.codes.shape == (1024,) and s.codes.max() < PAPER_IMAGE_CODES
        assert s.text_ids.dtype == np.uint16 and s.text_ids.min() > 3 and s.text_ids.max() < PAPER_TEXT_SIZE
    # deterministic by seed
    again = tmp_path / "again"
    make_paper_data(again, n_train=64, n_val=16, seed=3, shard_size=32)
    for a, b in zip(train, _samples(again / "train")):
        assert a.key == b.key and np.array_equal(a.codes, b.codes) and np.array_equal(a.text_ids, b.text_ids)
    nb_a = np.load(paper_tokens / "retrieval" / "train" / "neighbours.npy")
    assert np.array_equal(nb_a, np.load(again / "retrieval" / "train" / "neighbours.npy"))
    assert (nb_a != np.arange(64)[:, None]).all() and (nb_a >= 0).all()  # full pools, never the query itself
    manifest = json.loads((paper_tokens / "retrieval" / "manifest.json").read_text())
    assert "random" in manifest["synthetic"] and manifest["encoder"]["model_name"] == "synthetic-random"


def test_datamodule_batches_hold_k_retrieved_paper_documents(paper_tokens):
    from cm3leon.data.datamodule import CM3DataModule

    dm = CM3DataModule(
        tokens_dir=str(paper_tokens),
        seq_len=4096,
        micro_batch_size=4,
        num_workers=0,
        retrieval=RETRIEVAL,
        embedded_world=False,
        vocab={"base_size": 65536, "n_sentinels": 514},
    )
    dm.prepare_data()  # the staleness check accepts the synthetic bank
    dm.setup("fit")
    vocab = dm.vocab
    batch = next(iter(dm.train_dataloader()))
    assert batch["n_retrieved"].tolist() == [2, 2, 2, 2]
    ids = batch["input_ids"]
    assert ids.shape[0] == 4 and 3 * 1024 < ids.shape[1] < 4096
    n_image = ((ids >= vocab.image_offset) & (ids < vocab.base_size)).sum(1)
    assert (n_image >= 3 * 1024 - 1).all(), n_image  # k=2 retrieved images + the query's (last may be shifted off)


@pytest.mark.slow  # ~65 s: three training runs of 4,096-token rows (the recipes' composition and dry run are in the default suite)
def test_each_paper_recipe_trains_two_steps_on_paper_shaped_data(paper_tokens, tmp_path):
    """Issue 15: experiment=paper_350m / paper_760m / paper_7b as composed (retrieval k=2, packing
    split, CM3, the recipe's optimizer and schedule), the model shrunk by override and the cluster
    trainer put on one CPU: 2 steps each, as one Hydra multirun (one process, jobs in sequence)."""
    import csv

    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "experiment=paper_350m,paper_760m,paper_7b",
        *train_overrides(paper_tokens),
        f"hydra.sweep.dir={sweep}",
        "data.micro_batch_size=1",  # one packed row of 4,096 tokens per step
        "data.num_workers=0",
        "model.n_layer=2",
        "model.d_model=64",
        "model.n_head=2",
        "trainer.max_steps=2",
        "global_batch_tokens=null",  # else 8M tokens per step = 2,048 micro-batches of 4,096
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "++trainer.num_nodes=1",
        "++trainer.strategy=auto",  # FSDP needs GPUs
        "trainer.precision=32-true",
        "+trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "callbacks=minimal",
        "+callbacks.tokens._target_=cm3leon.lit.callbacks.TokenAccounting",
        "+callbacks.keys._target_=cm3leon.lit.callbacks.BatchKeysRecorder",
        "trainer.enable_progress_bar=false",
    ]
    t0 = time.time()
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *args], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"run_dir"')]
    assert [s["global_step"] for s in summaries] == [2, 2, 2], proc.stdout[-2000:]
    for job, size in enumerate(("350m", "760m", "7b")):
        run = sweep / str(job)
        cfg = (run / ".hydra" / "config.yaml").read_text()
        assert f"name: {size}" in cfg and "packing: split" in cfg and "poisson_lambda: 1.0" in cfg
        batches = [json.loads(line) for line in (run / "batch_keys.jsonl").read_text().splitlines()]
        assert len(batches) == 2 and all(n == 2 for b in batches for n in b["n_retrieved"])  # k=2 kept
        rows = [r for r in csv.DictReader((run / "csv" / "metrics.csv").open()) if r.get("train/pad_fraction")]
        assert len(rows) == 2 and all(float(r["train/pad_fraction"]) < 0.05 for r in rows), rows
    print(f"3 paper recipes x 2 steps: {time.time() - t0:.1f} s")


def test_data_path_bench_reports_rates_and_pad_fractions():
    from cm3leon.bench.data_path import bench_data_path

    out = bench_data_path(n_train=64, n_seq=16, micro_batch=4)
    table = out["by_setting"]
    assert set(table) == {f"k{k}_{m}" for k in (2, 0) for m in ("none", "whole", "split")}
    assert all(r["seq_per_s"] > 0 for r in table.values())
    assert out["ratio_to_gpu"] == round(out["seq_per_s_per_core"] / out["gpu_seq_per_s"], 2)
    # one ~3.1k-token example per 4,096 row when kept whole; rows filled to the last token when split
    assert table["k2_whole"]["pad_fraction"] > 0.2 and table["k2_split"]["pad_fraction"] < 0.01
    assert table["k0_split"]["pad_fraction"] < 0.01 and table["k2_split"]["mean_row_len"] == 4096
    assert table["k2_none"]["real_tokens_per_seq"] > 3 * 1024 > table["k0_none"]["real_tokens_per_seq"]
