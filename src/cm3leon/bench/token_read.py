"""Token-shard read throughput: our training stream vs plain webdataset on the same shards.

Ours reads, decodes, lays out the sequence and applies the CM3 transform (the full per-example
work of a DataLoader worker); the peer (`webdataset.WebDataset(...).decode()`) only reads and
decodes the members, so a ratio near or above 1 means the extra work is free.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from cm3leon.data.sequences import Document, build_sequence
from cm3leon.data.token_shards import TokenSample, encode_sample
from cm3leon.data.token_stream import TokenShardStream
from cm3leon.objective import cm3_transform
from cm3leon.vocab import Vocab


def write_synthetic_token_shards(
    root: Path, n_shards: int, per_shard: int, tokens_per_image: int, vocab: Vocab
) -> list[str]:
    """Token shards of random captions (~24 BPE ids) and images, in the preprocess format."""
    rng = np.random.default_rng(0)
    paths = []
    for s in range(n_shards):
        path = root / f"{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                text = rng.integers(4, vocab.text_size, rng.integers(16, 32)).astype(np.uint16)
                codes = rng.integers(0, vocab.n_image_codes, tokens_per_image).astype(np.uint16)
                sink.write(encode_sample(TokenSample(f"s{s}_{i}", "caption", text, codes)))
        paths.append(str(path))
    return paths


def bench_token_read(n_shards: int = 4, per_shard: int = 1000, tokens_per_image: int = 1024) -> dict:
    """Samples/s and tokens/s of one reader process (paper vocabulary and 1024-token images by default)."""
    vocab = Vocab.paper()
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_synthetic_token_shards(Path(tmp), n_shards, per_shard, tokens_per_image, vocab)
        n = n_shards * per_shard

        def example(sample: TokenSample, rng: np.random.Generator) -> np.ndarray:
            ids, _ = build_sequence(Document(sample.text_ids, sample.codes), [], vocab, 4096)
            return cm3_transform(ids, vocab, rng, seq_len=4096).ids

        t0 = time.perf_counter()
        tokens = sum(len(x) for x in TokenShardStream(shards, example, train=False))
        ours = time.perf_counter() - t0

        t0 = time.perf_counter()
        peer_n = sum(1 for _ in wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode())
        peer = time.perf_counter() - t0
    assert peer_n == n
    return {
        "samples": n,
        "ours_samples_per_s": round(n / ours, 1),
        "ours_tokens_per_s": round(tokens / ours, 1),
        "webdataset_decode_samples_per_s": round(n / peer, 1),
        "ratio_vs_webdataset": round(peer / ours, 3),
    }
