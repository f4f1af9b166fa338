"""Every writer validates its inputs before touching its output, writes atomically, refuses to
replace another input's output unless told, and reuses an output only when its inputs are the same
(issue 14 items 1, 2 and 9 for make_shards)."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cm3leon.data.make_shards import make_shards
from cm3leon.errors import UsageError


def save(path, seed: int, caption: str | None = None, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, format=fmt)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def keys_of(folder) -> list[str]:
    keys = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tf:
            keys += [m.name.split(".", 1)[0] for m in tf if m.name.endswith(".txt")]
    return keys


@pytest.fixture
def two_inputs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(3):
        save(a / f"{i}.png", i, f"a caption {i}")
        save(b / f"{i}.png", 10 + i, f"b caption {i}")
    return a, b


# ---- make_shards -----------------------------------------------------------------------------
def test_make_shards_checks_its_input_before_touching_out_dir(two_inputs, tmp_path):
    """Item 1: a typo in input= or a CSV without the caption column leaves earlier shards intact."""
    a, _ = two_inputs
    out = tmp_path / "out"
    make_shards(a, out, shard_size=2)
    before = snapshot(out)
    with pytest.raises((UsageError, FileNotFoundError), match="typo"):
        make_shards(tmp_path / "typo", out, shard_size=2)
    assert snapshot(out) == before
    (tmp_path / "pairs.csv").write_text("image,text\na/0.png,zero\n")
    with pytest.raises((UsageError, ValueError), match="caption"):
        make_shards(tmp_path / "pairs.csv", out, shard_size=2)
    assert snapshot(out) == before


def test_make_shards_refuses_another_inputs_output_unless_overwrite(two_inputs, tmp_path):
    """Item 1: shards of another input are replaced only with overwrite=True; a folder that
    make_shards did not make is never emptied; a failure mid-way leaves the old shards and no temp."""
    a, b = two_inputs
    out = tmp_path / "out"
    make_shards(a, out)
    before = snapshot(out)
    with pytest.raises(UsageError, match="overwrite=true") as e:
        make_shards(b, out)
    assert "\n" not in str(e.value) and snapshot(out) == before

    import cm3leon.data.make_shards as ms

    real, calls = ms.image_member, []

    def fail_on_second(data):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(data)

    ms.image_member = fail_on_second
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            make_shards(b, out, overwrite=True)
    finally:
        ms.image_member = real
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]

    manifest = make_shards(b, out, overwrite=True)
    assert manifest["counts"]["written"] == 3 and snapshot(out) != before
    assert json.loads((out / "manifest.json").read_text())["input"] == str(b)

    mine = tmp_path / "mine"
    save(mine / "holiday.png", 7)
    for flag in (False, True):
        with pytest.raises(UsageError, match="not made by make_shards"):
            make_shards(a, mine, overwrite=flag)
    assert (mine / "holiday.png").is_file()


def test_make_shards_reuses_same_inputs_and_remakes_changed_ones(two_inputs, tmp_path):
    """Item 2: a rerun with the same inputs writes nothing; a changed image is noticed."""
    a, _ = two_inputs
    out = tmp_path / "out"
    make_shards(a, out)
    stamp = (out / "000000.tar").stat().st_mtime_ns
    again = make_shards(a, out)
    assert again["reused"] and (out / "000000.tar").stat().st_mtime_ns == stamp
    old = (out / "000000.tar").read_bytes()
    save(a / "1.png", 99)  # the image changes, its path does not
    changed = make_shards(a, out)
    assert changed["remade"] and not changed["reused"] and (out / "000000.tar").read_bytes() != old


def test_make_shards_keys_follow_paths_and_collisions_name_both(tmp_path):
    """Item 2: keys come from the relative path (same stems in two folders do not collide, adding a
    file renames no other), inputs of the same name elsewhere get other keys, and two files that
    would share a key are refused with both named."""
    root = tmp_path / "x" / "images"
    save(root / "a" / "001.png", 0, "one in a")
    save(root / "b" / "001.png", 1, "one in b")
    make_shards(root, tmp_path / "o1")
    first = keys_of(tmp_path / "o1")
    assert len(set(first)) == 2 and first[0].endswith("a_001") and first[1].endswith("b_001")
    save(root / "a" / "000.png", 2, "zero in a")  # sorts before the others
    make_shards(root, tmp_path / "o2")
    assert set(first) <= set(keys_of(tmp_path / "o2"))

    twin = tmp_path / "y" / "images"  # same folder name, another place
    save(twin / "a" / "001.png", 3, "elsewhere")
    make_shards(twin, tmp_path / "o3")
    assert not set(keys_of(tmp_path / "o3")) & set(keys_of(tmp_path / "o2"))

    save(root / "b" / "001.jpg", 4, None, fmt="JPEG")  # same stem as b/001.png: one key, one caption
    with pytest.raises(UsageError, match=r"b/001\.(png|jpg) and b/001\.(png|jpg)"):
        make_shards(root, tmp_path / "o4")
    assert not (tmp_path / "o4").exists()


def test_make_shards_shows_progress(two_inputs, tmp_path, capsys):
    """Item 9: a progress line with samples written and skipped."""
    a, _ = two_inputs
    save(a / "nocap.png", 5)
    make_shards(a, tmp_path / "out")
    err = capsys.readouterr().err
    assert "make_shards" in err and "written=3" in err and "skipped=1" in err


# ---- preprocess ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A random-initialised tiny VQGAN (tests only) and the shipped BPE: a PreprocessConfig."""
    import torch

    from cm3leon.data.preprocess import PreprocessConfig
    from cm3leon.tokenizers.image_tokenizer import CONFIG_DIR, resolve_config
    from cm3leon.tokenizers.vqgan import VQModel
    from world_fixtures import SHIPPED_BPE

    torch.manual_seed(0)
    vq = tmp_path_factory.mktemp("vq") / "vq.ckpt"
    torch.save(VQModel(resolve_config("tiny")).state_dict(), vq)
    vq.with_suffix(".yaml").write_text((CONFIG_DIR / "tiny.yaml").read_text())
    return PreprocessConfig(image_tokenizer=str(vq), text_tokenizer=str(SHIPPED_BPE), num_workers=1)


def raw_shard(path, keys, caption="a red circle", seed=0):
    """A raw shard of 32 px random images with the given keys."""
    from cm3leon.data.raw_shards import encode_png, write_shard

    rng = np.random.default_rng(seed)
    samples = [
        {"__key__": k, "png": encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "txt": f"{caption} {k}"}
        for k in keys
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_shard(path, samples)


def captions_of(token_shard) -> list[str]:
    from cm3leon.data.token_shards import decode_sample
    from cm3leon.data.token_stream import read_token_shard

    return [decode_sample(r).caption for r in read_token_shard(str(token_shard))]


def test_preprocess_remakes_changed_raw_shards_and_says_so(tmp_path, tokenizers):
    """Item 2: a raw shard that changed since its token shard was made is tokenized again."""
    from cm3leon.data.preprocess import preprocess_split, summary_line

    raw, tok = tmp_path / "raw", tmp_path / "tok"
    raw_shard(raw / "000000.tar", ["k0", "k1"])
    raw_shard(raw / "000001.tar", ["k2", "k3"])
    preprocess_split(str(raw), tok, tokenizers, progress=False)
    raw_shard(raw / "000001.tar", ["k2", "k3"], caption="a blue square")  # new content, same name
    report = preprocess_split(str(raw), tok, tokenizers, progress=False)
    assert report["shards_reused"] == 1 and report["shards_processed"] == 1 and report["shards_remade"] == 1
    assert "re-made 1 shards whose raw input changed" in summary_line(report)
    assert captions_of(tok / "000001.tar") == ["a blue square k2", "a blue square k3"]


def test_preprocess_names_both_sources_of_a_collision(tmp_path, tokenizers):
    """Item 2: two raw shards that would make one token shard, and one sample key in two raw
    shards, stop the run with both sources named."""
    from cm3leon.data.preprocess import preprocess_split

    raw_shard(tmp_path / "a" / "000000.tar", ["a0", "a1"])
    raw_shard(tmp_path / "b" / "000000.tar", ["b0", "b1"])
    with pytest.raises(UsageError) as e:
        preprocess_split(f"{tmp_path}/{{a,b}}/000000.tar", tmp_path / "tok", tokenizers, progress=False)
    assert str(tmp_path / "a" / "000000.tar") in str(e.value) and str(tmp_path / "b" / "000000.tar") in str(e.value)
    assert not (tmp_path / "tok" / "000000.tar").exists()

    raw_shard(tmp_path / "c" / "000000.tar", ["k0", "k1"])
    raw_shard(tmp_path / "c" / "000001.tar", ["k1", "k2"])  # k1 again
    with pytest.raises(UsageError, match="'k1'") as e:
        preprocess_split(str(tmp_path / "c"), tmp_path / "tok2", tokenizers, progress=False)
    assert "c/000000.tar" in str(e.value) and "c/000001.tar" in str(e.value) and "\n" not in str(e.value)


def test_preprocess_refuses_other_inputs_output_unless_overwrite(tmp_path, tokenizers):
    """Item 1: token shards of a raw shard no longer in the input, or of another tokenizer, are
    replaced only with overwrite=True."""
    from dataclasses import replace

    import torch

    from cm3leon.data.preprocess import preprocess_split

    raw, tok = tmp_path / "raw", tmp_path / "tok"
    for s in range(3):
        raw_shard(raw / f"{s:06d}.tar", [f"k{s}"])
    preprocess_split(str(raw), tok, tokenizers, progress=False)
    (raw / "000002.tar").unlink()
    before = snapshot(tok)
    with pytest.raises(UsageError, match="overwrite=true"):
        preprocess_split(str(raw), tok, tokenizers, progress=False)
    assert snapshot(tok) == before
    report = preprocess_split(str(raw), tok, tokenizers, progress=False, overwrite=True)
    assert report["shards"] == 2 and report["shards_removed"] == 1 and not (tok / "000002.tar").exists()

    other = tmp_path / "other.ckpt"
    sd = torch.load(tokenizers.image_tokenizer, weights_only=True)
    torch.save({k: v + 1 for k, v in sd.items()}, other)
    other.with_suffix(".yaml").write_text(Path(tokenizers.image_tokenizer).with_suffix(".yaml").read_text())
    cfg2 = replace(tokenizers, image_tokenizer=str(other))
    before = snapshot(tok)
    with pytest.raises(UsageError, match="another image_tokenizer.*overwrite=true"):
        preprocess_split(str(raw), tok, cfg2, progress=False)
    assert snapshot(tok) == before
    report = preprocess_split(str(raw), tok, cfg2, progress=False, overwrite=True)
    assert report["shards_processed"] == 2 and snapshot(tok)["000000.tar"] != before["000000.tar"]


# ---- make_world ------------------------------------------------------------------------------
def test_make_world_refuses_another_world_and_foreign_folders(tmp_path, capsys):
    """Item 1 (and 9): another world's shards are replaced only with overwrite=True, a folder that is
    not a world never; generation shows progress; a failure mid-way leaves the old world whole."""
    from cm3leon.data import world
    from cm3leon.data.world import WorldConfig, generate_world

    kw = dict(out_dir=str(tmp_path / "raw"), n_train=6, n_val=2, shard_size=4, num_workers=1)
    generate_world(WorldConfig(**kw))
    assert "world" in capsys.readouterr().err  # the progress bar
    before = snapshot(tmp_path / "raw")
    with pytest.raises(UsageError, match="n_train.*overwrite=true"):
        generate_world(WorldConfig(**{**kw, "n_train": 7}))
    assert snapshot(tmp_path / "raw") == before

    real = world.sample_for

    def fail(seed, split, index, image_size=64):
        if index == 5:
            raise RuntimeError("disk full")
        return real(seed, split, index, image_size)

    world.sample_for = fail
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            generate_world(WorldConfig(**{**kw, "n_train": 7}), overwrite=True)
    finally:
        world.sample_for = real
    assert snapshot(tmp_path / "raw") == before and sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    assert generate_world(WorldConfig(**{**kw, "n_train": 7}), overwrite=True)["counts"]["train"] == 7

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    for flag in (False, True):
        with pytest.raises(UsageError, match="not made by make_world"):
            generate_world(WorldConfig(**{**kw, "out_dir": str(mine)}), overwrite=flag)
    assert (mine / "holiday.jpg").read_bytes() == b"precious"


# ---- train_bpe and the tokenizer exports -----------------------------------------------------
def test_train_bpe_refuses_an_existing_out_before_training(tmp_path):
    """Item 1: train_bpe stops with one line (exit 2), before training, when out= exists."""
    import subprocess
    import sys

    from cm3leon.data.raw_shards import write_shard
    from project import PROJECT_ROOT

    (tmp_path / "raw").mkdir()
    write_shard(tmp_path / "raw" / "000000.tar", [{"__key__": f"k{i}", "txt": f"a red circle {i}"} for i in range(8)])
    out = tmp_path / "bpe.json"
    out.write_text("keep me")
    cmd = [sys.executable, str(PROJECT_ROOT / "src" / "train_bpe.py"), f"input={tmp_path / 'raw'}", f"out={out}",
           "vocab_size=300", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "overwrite=true" in refused.stderr and out.read_text() == "keep me"
    assert not (tmp_path / "bpe.json.tmp").exists()  # overwrite=True: test_text_tokenizer_save_refuses_...


def test_text_tokenizer_save_refuses_an_existing_file(tmp_path):
    from cm3leon.tokenizers.text_tokenizer import train_bpe

    tok = train_bpe(["a red circle", "a blue square"] * 4, vocab_size=280)
    (tmp_path / "bpe.json").write_text("keep me")
    with pytest.raises(UsageError, match="overwrite=true"):
        tok.save(tmp_path / "bpe.json")
    assert (tmp_path / "bpe.json").read_text() == "keep me"
    tok.save(tmp_path / "bpe.json", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.json"]


def test_save_vqgan_refuses_an_existing_export_and_writes_atomically(tmp_path, monkeypatch):
    """Item 1: train_tokenizer's export replaces an existing .ckpt only with overwrite=True; a
    failed write leaves the old one whole and no temporary file."""
    import torch

    from cm3leon.tokenizers.image_tokenizer import ImageTokenizer, resolve_config, save_vqgan
    from cm3leon.tokenizers.vqgan import VQModel

    model = VQModel(resolve_config("tiny"))
    path = tmp_path / "vq.ckpt"
    path.write_bytes(b"an earlier export")
    with pytest.raises(UsageError, match="overwrite=true"):
        save_vqgan(model, path)
    assert path.read_bytes() == b"an earlier export" and not path.with_suffix(".yaml").exists()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_vqgan(model, path, overwrite=True)
    assert path.read_bytes() == b"an earlier export" and not (tmp_path / "vq.ckpt.tmp").exists()
    monkeypatch.undo()
    save_vqgan(model, path, overwrite=True)
    assert ImageTokenizer.from_checkpoint(path).n_codes == model.cfg.n_embed
