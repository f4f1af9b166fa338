"""The training stream is deterministic, split by rank and worker, and resumes without repeats."""

import json

import numpy as np
import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from cm3leon.data.token_shards import TokenSample, encode_sample
from cm3leon.data.token_stream import TokenShardStream


def write_shards(root, n_shards=6, per_shard=10, sidecar=True):
    paths = []
    for s in range(n_shards):
        path = root / f"{s:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(per_shard):
                key = f"s{s}_{i}"
                w.write(encode_sample(TokenSample(key, key, np.array([5, 6], np.uint16), np.array([1, 2], np.uint16))))
        if sidecar:
            (root / f"{s:06d}.stats.json").write_text(json.dumps({"written": per_shard}))
        paths.append(str(path))
    return paths


def keys_of(sample, rng):
    return {"key": sample.key, "r": float(rng.random())}


def collate(batch):
    return [b["key"] for b in batch], [b["r"] for b in batch]


def batches(shards, workers, n, start=0, batch_size=4, seed=7):
    stream = TokenShardStream(shards, keys_of, seed=seed, train=True, batch_size=batch_size)
    stream.start_batch = start
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    out = []
    for i, b in enumerate(loader):
        if i == n:
            break
        out.append(b)
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("sidecar", [True, False])
def test_resume_continues_exactly(tmp_path, workers, sidecar):
    shards = write_shards(tmp_path, sidecar=sidecar)
    full = batches(shards, workers, 25)  # 100 samples: crosses an epoch boundary (60 per epoch)
    resumed = batches(shards, workers, 25 - 9, start=9)
    assert resumed == full[9:]  # same keys and same per-sample randomness


def test_epoch_covers_every_sample_once_then_reshuffles(tmp_path):
    shards = write_shards(tmp_path)
    keys = [k for b in batches(shards, 0, 30) for k in b[0]]
    first, second = keys[:60], keys[60:120]
    assert sorted(first) == sorted(second) and len(set(first)) == 60
    assert first != second


def test_ranks_read_disjoint_shards(tmp_path, monkeypatch):
    shards = write_shards(tmp_path)
    seen = []
    for rank in range(2):
        monkeypatch.setattr("cm3leon.data.token_stream._dist_rank_world", lambda r=rank: (r, 2))
        seen.append({k.split("_")[0] for b in batches(shards, 0, 7) for k in b[0]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_too_few_shards_is_a_clear_error(tmp_path, monkeypatch):
    shards = write_shards(tmp_path, n_shards=1)
    monkeypatch.setattr("cm3leon.data.token_stream._dist_rank_world", lambda: (0, 2))
    with pytest.raises(ValueError, match="1 training shards < 2 readers"):
        next(iter(TokenShardStream(shards, keys_of, train=True)))


def test_validation_is_one_ordered_pass(tmp_path):
    shards = write_shards(tmp_path, n_shards=2, per_shard=3)
    stream = TokenShardStream(shards, keys_of, train=False)
    keys = [x["key"] for x in stream]
    assert keys == [f"s{s}_{i}" for s in range(2) for i in range(3)]
    assert [x["r"] for x in stream] == [x["r"] for x in TokenShardStream(shards, keys_of, train=False)]
