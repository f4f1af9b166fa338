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


def test_two_training_steps_on_paper_shaped_data(paper_tokens, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "model=350m",
        *train_overrides(paper_tokens),
        "retrieval.k=2",
        f"hydra.run.dir={run_dir}",
        "data.micro_batch_size=2",
        "data.num_workers=0",
        "data.val_max_samples=4",
        "model.n_layer=2",
        "model.d_model=64",
        "model.n_head=2",
        "trainer.max_steps=2",
        "global_batch_tokens=null",  # else 8M tokens per step = 1,024 micro-batches of 2 x 4,096
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "+trainer.limit_val_batches=1",
        "logger=csv",
        "callbacks=minimal",
        "trainer.enable_progress_bar=false",
    ]
    t0 = time.time()
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["global_step"] == 2 and summary["train/loss"] > 0, summary
    print(f"2-step paper-shaped run: {time.time() - t0:.1f} s")


def test_data_path_bench_reports_rates():
    from cm3leon.bench.data_path import bench_data_path

    out = bench_data_path(n_train=64, n_seq=16, micro_batch=4)
    assert out["seq_per_s_per_core"] > 0 and out["seq_per_s_no_retrieval"] > 0
    assert out["mean_real_tokens"] > 3 * 1024 > out["mean_real_tokens_no_retrieval"]
    assert out["ratio_to_gpu"] == round(out["seq_per_s_per_core"] / out["gpu_seq_per_s"], 2)
