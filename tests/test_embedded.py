"""The embedded world's data: `ensure_embedded_tokens` tokenizes it on first use, reuses it while the
shipped tokenizers are unchanged, and tokenizes it again (not silently reused) when they change; the
DataModule of `conf/data/world.yaml` prepares all of it (world, token shards, retrieval files) itself."""

import shutil

import hydra
import pytest
import torch

from cm3leon.data.embedded import ensure_embedded_tokens
from cm3leon.data.token_shards import read_meta
from cm3leon.utils import file_sha256
from world_fixtures import SHIPPED_BPE, SHIPPED_VQ

SMALL = dict(n_train=32, n_val=16, shard_size=16)


def test_tokens_made_once_then_remade_when_the_shipped_vqgan_changes(tmp_path, capsys):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for f in (SHIPPED_VQ, SHIPPED_VQ.with_suffix(".yaml"), SHIPPED_BPE):
        shutil.copy(f, shipped / f.name)
    world = {"out_dir": str(tmp_path / "world" / "raw"), **SMALL}
    tokens_dir = tmp_path / "world" / "tokens"

    tokens = ensure_embedded_tokens(world, tokens_dir, shipped, num_workers=1)
    assert tokens == tokens_dir
    assert "tokenizing" in capsys.readouterr().out
    first = file_sha256(tokens / "train" / "000000.tar")

    ensure_embedded_tokens(world, tokens_dir, shipped, num_workers=1)
    assert "tokenizing" not in capsys.readouterr().out  # complete and current: reused as is

    # Another VQGAN with the same architecture (one weight changed) is shipped.
    ck = torch.load(shipped / SHIPPED_VQ.name, map_location="cpu", weights_only=True)
    sd = ck.get("state_dict", ck)
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"].flip(0).contiguous()
    torch.save(ck, shipped / SHIPPED_VQ.name)

    ensure_embedded_tokens(world, tokens_dir, shipped, num_workers=1)
    out = capsys.readouterr().out
    assert "made with other tokenizers" in out and "tokenizing" in out
    for split in ("train", "val"):
        assert read_meta(tokens / split)["image_tokenizer"]["sha256"] == file_sha256(shipped / SHIPPED_VQ.name)
    assert file_sha256(tokens / "train" / "000000.tar") != first


def test_datamodule_prepares_the_embedded_world_and_its_retrieval(tmp_path, capsys, compose_config):
    """`data=world retrieval=ra` as composed: prepare_data makes a small world, its token shards and
    retrieval files; setup opens them; every training sequence holds retrieval.k documents, and the
    data meta for the checkpoint names the memory bank."""
    world_dir = tmp_path / "world"
    cfg = compose_config("train", [
        "retrieval=ra", "retrieval.k=2", "retrieval.index.kind=flat", "retrieval.encoder.device=cpu",
        f"paths.world_dir={world_dir}", "+data.world.n_train=48", "+data.world.n_val=16",
        "+data.world.shard_size=16", "data.num_workers=1", "data.micro_batch_size=4",
    ])  # fmt: skip
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.vocab is None and not world_dir.exists()  # nothing is read or made before prepare_data
    dm.prepare_data()
    out = capsys.readouterr().out
    assert "[world] generating" in out and "tokenizing" in out and "[retrieval] building" in out
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["n_retrieved"].tolist() == [2] * 4
    bank = world_dir / "tokens" / "retrieval"
    assert dm.data_meta()["retrieval"] == {"k": 2, "folder": str(bank.resolve())}
    assert dm.data_meta()["tokens_per_image"] == dm.tokens_per_image
    dm.prepare_data()  # everything current: nothing made again
    assert capsys.readouterr().out == ""


def test_user_token_shards_must_exist_when_the_datamodule_is_made(tmp_path):
    from cm3leon.data.datamodule import CM3DataModule

    with pytest.raises(FileNotFoundError, match="Bring your own data") as e:
        CM3DataModule(str(tmp_path / "none"))  # embedded_world=false: nothing to prepare, so it must exist
    assert str(tmp_path / "none" / "train") in str(e.value) and "\n" not in str(e.value)


def test_world_generation_shows_progress(tmp_path, capfd):
    """generate_world: a bar over its shards (make_world and first use take minutes)."""
    from cm3leon.data.world import WorldConfig, generate_world

    generate_world(WorldConfig(out_dir=str(tmp_path / "raw"), n_train=8, n_val=4, shard_size=4, num_workers=1))
    err = capfd.readouterr().err
    assert "world: 100%" in err and "3/3" in err  # 2 train + 1 val shards
    generate_world(WorldConfig(out_dir=str(tmp_path / "raw2"), n_train=8, n_val=4, shard_size=4), progress=False)
    assert "world:" not in capfd.readouterr().err
