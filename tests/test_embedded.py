"""`ensure_embedded_tokens`: the embedded world is tokenized on first use, reused while the shipped
tokenizers are unchanged, and tokenized again (not silently reused) when they change."""

import shutil

import torch

from cm3leon.data.embedded import ensure_embedded_tokens
from cm3leon.data.token_shards import file_sha256, read_meta
from world_fixtures import SHIPPED_BPE, SHIPPED_VQ

SMALL = dict(n_train=32, n_val=16, shard_size=16)


def test_tokens_made_once_then_remade_when_the_shipped_vqgan_changes(tmp_path, capsys):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for f in (SHIPPED_VQ, SHIPPED_VQ.with_suffix(".yaml"), SHIPPED_BPE):
        shutil.copy(f, shipped / f.name)
    world = tmp_path / "world"

    tokens = ensure_embedded_tokens(world, shipped, num_workers=1, **SMALL)
    assert "tokenizing" in capsys.readouterr().out
    first = file_sha256(tokens / "train" / "000000.tar")

    ensure_embedded_tokens(world, shipped, num_workers=1, **SMALL)
    assert "tokenizing" not in capsys.readouterr().out  # complete and current: reused as is

    # Another VQGAN with the same architecture (one weight changed) is shipped.
    ck = torch.load(shipped / SHIPPED_VQ.name, map_location="cpu", weights_only=True)
    sd = ck.get("state_dict", ck)
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"].flip(0).contiguous()
    torch.save(ck, shipped / SHIPPED_VQ.name)

    ensure_embedded_tokens(world, shipped, num_workers=1, **SMALL)
    out = capsys.readouterr().out
    assert "made with other tokenizers" in out and "tokenizing" in out
    for split in ("train", "val"):
        assert read_meta(tokens / split)["image_tokenizer"]["sha256"] == file_sha256(shipped / SHIPPED_VQ.name)
    assert file_sha256(tokens / "train" / "000000.tar") != first
