"""Builders of small SFT data sets for tests (test_sft_data.py, test_sft_train.py)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from cm3leon.data.preprocess import PreprocessConfig
from cm3leon.data.sft_shards import SPLITS, SftShardMaker, SftSource
from cm3leon.data.sft_world import SFT_TASKS
from project import SHIPPED_DIR

SHIPPED_VQ = SHIPPED_DIR / "world_vqgan.ckpt"
SHIPPED_BPE = SHIPPED_DIR / "world_bpe.json"
SEQ_LEN = 256  # the longest world SFT sequence is ~190 tokens
MIXTURE = {"max_repeat": 3.0, "min_keep": 0.3}  # the paper's caps (conf/data/sft/defaults.yaml)


@contextmanager
def one_thread():
    """Torch on one thread: the VQGAN's small convolutions do not gain from two, and a second
    thread competes with whatever else runs on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def world_sources(n_train: int, n_val: int) -> dict[str, dict]:
    """`data.sources` of every world task with these sizes."""
    return {t: {"kind": "world", "task": t, "weight": 1.0, "n_train": n_train, "n_val": n_val} for t in SFT_TASKS}


def make_sft_world_tokens(root: Path, n_train: int = 16, n_val: int = 8, shard_size: int = 8) -> Path:
    """SFT token shards of every world task (shipped tokenizers) in `root/sft_tokens`."""
    cfg = PreprocessConfig(image_tokenizer=str(SHIPPED_VQ), text_tokenizer=str(SHIPPED_BPE), num_workers=1)
    tokens = root / "sft_tokens"
    sources = [SftSource.from_config(n, s) for n, s in world_sources(n_train, n_val).items()]
    with one_thread():
        maker = SftShardMaker(tokens, cfg, SEQ_LEN, shard_size, progress=False)
        maker.make([(src, split) for src in sources for split in SPLITS])
    return tokens
