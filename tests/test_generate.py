"""src/generate.py on a tiny random checkpoint saved through CM3LeonLitModule: every task, the
decoding groups, CLIP re-ranking, retrieval, and the one-line error for a missing checkpoint."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from cm3leon.data.sequences import Document
from cm3leon.tokenizers.image_tokenizer import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
BPE = ROOT / "data" / "shipped" / "world_bpe.json"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random 2-layer LM checkpoint (Lightning format) whose data meta points at a random tiny
    VQGAN (64 px, 8x8 = 64 codes) and the shipped world BPE."""
    import lightning as L

    from cm3leon.lit.lm_module import CM3LeonLitModule
    from cm3leon.tokenizers.image_tokenizer import ImageTokenizer
    from cm3leon.tokenizers.text_tokenizer import TextTokenizer
    from cm3leon.vocab import Vocab

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gen")
    vq = ImageTokenizer.from_config("tiny")
    torch.save(vq.model.state_dict(), d / "vq.pt")
    (d / "vq.yaml").write_text((CONFIG_DIR / "tiny.yaml").read_text())
    vocab = Vocab(text_size=TextTokenizer.from_file(BPE).vocab_size, n_image_codes=vq.n_codes, n_sentinels=16)
    meta = {
        "image_tokenizer": {"path": str(d / "vq.pt")},
        "text_tokenizer": {"path": str(BPE)},
        "tokens_per_image": vq.tokens_per_image,
    }
    module = CM3LeonLitModule(
        model=dict(n_layer=2, d_model=32, n_head=2, max_seq_len=192, zero_init_residual_out=False, init_std=0.05),
        vocab=vocab.to_dict(),
        optim=dict(
            lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, warmup_steps=1, final_lr_ratio=0.1, max_steps=1
        ),
        data_meta=meta,
    )
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(d / "last.ckpt")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / "photo.png")
    return d / "last.ckpt"


def run_generate(*overrides: str) -> dict:
    import generate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        # one thread: tiny ops on a shared CPU only lose time synchronising threads
        cfg = compose("generate", overrides=["cpu_threads=1", *overrides])
    threads = torch.get_num_threads()
    try:
        return generate.run(cfg)
    finally:
        torch.set_num_threads(threads)  # run() sets the thread count; keep the test process as it was


def test_missing_checkpoint_is_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "src/generate.py",
            f"ckpt={tmp_path}/none.ckpt",
            "prompt=a red circle",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "none.ckpt not found" in lines[0] and "ckpt=PATH" in lines[0], r.stderr
    import generate

    # no ckpt=: the task's shipped model, whose absence names its recipe
    with pytest.raises(generate.UsageError, match="world_lm.safetensors is missing: `make world-model`"):
        run_generate("prompt=x", "ckpt=null", f"paths.shipped_dir={tmp_path}")
    with pytest.raises(generate.UsageError, match="needs prompt"):
        run_generate(f"ckpt={tmp_path}/none.ckpt")


@pytest.mark.parametrize("decoding", ["topp_cfg", "cdk", "mixed"])
def test_image_task_writes_each_sample_and_a_grid(tiny_ckpt, tmp_path, decoding):
    n = 4 if decoding == "topp_cfg" else 2
    out = tmp_path / "run"
    s = run_generate(
        f"ckpt={tiny_ckpt}",
        "prompt=a large red circle in the top left",
        f"n={n}",
        f"decoding={decoding}",
        f"out_dir={out}",
        "batch_size=2",
    )
    for i in range(n):
        assert Image.open(out / f"sample_{i:02d}.png").size == (64, 64)
    assert not (out / f"sample_{n:02d}.png").exists()
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 + n * 66, 2 + 66)  # make_grid: padding 2 around each 64 px image
    saved = json.loads((out / "samples.json").read_text())
    assert saved["decoding"]["strategy"] == {"topp_cfg": "topp", "cdk": "cdk", "mixed": "mixed"}[decoding]
    assert saved["decoding"]["guidance_scale"] == 3.0 and saved["n"] == n and s["grid"] == str(out / "grid.png")


def test_caption_and_vqa_print_the_infilled_text(tiny_ckpt, tmp_path, capsys):
    photo = tiny_ckpt.parent / "photo.png"
    s = run_generate(f"ckpt={tiny_ckpt}", "task=caption", f"image={photo}", "caption.max_len=5", f"out_dir={tmp_path}")
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(s["texts"]) == 1 and printed[0] == s["texts"][0]  # greedy: one caption, printed first
    assert json.loads(printed[-1])["task"] == "caption"
    s = run_generate(
        f"ckpt={tiny_ckpt}",
        "task=vqa",
        f"image={photo}",
        "question=what colour is the circle?",
        "caption.max_len=4",
        "caption.temperature=1.0",
        "n=3",
        f"out_dir={tmp_path}",
    )
    assert len(s["texts"]) == 3
    import generate

    with pytest.raises(generate.UsageError, match="needs image"):
        run_generate(f"ckpt={tiny_ckpt}", "task=caption")
    with pytest.raises(generate.UsageError, match="unknown keys"):
        run_generate(f"ckpt={tiny_ckpt}", "prompt=x", "+decoding.cfg_scale=3")


def test_edit_and_infill_tasks(tiny_ckpt, tmp_path):
    photo = tiny_ckpt.parent / "photo.png"
    run_generate(
        f"ckpt={tiny_ckpt}", "task=edit", f"image={photo}", "prompt=make it blue", "n=2", f"out_dir={tmp_path / 'edit'}"
    )
    assert (tmp_path / "edit" / "edit_01.png").is_file() and (tmp_path / "edit" / "grid.png").is_file()
    s = run_generate(
        f"ckpt={tiny_ckpt}",
        "task=infill",
        f"image={photo}",
        "infill.region=[4,0,8,8]",
        "n=2",
        f"out_dir={tmp_path / 'infill'}",
    )
    assert s["region"] == [4, 0, 8, 8] and (tmp_path / "infill" / "infill_00.png").is_file()
    assert Image.open(tmp_path / "infill" / "infill_01.png").size == (64, 64)


def test_clip_reranking_orders_samples(tiny_ckpt, tmp_path):
    import open_clip

    from cm3leon.retrieval.tiny_clip import TINY_CLIP, register_tiny_clip

    register_tiny_clip()
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    s = run_generate(
        f"ckpt={tiny_ckpt}",
        "prompt=a small blue square",
        "n=3",
        "rerank.enabled=true",
        f"rerank.model_name={TINY_CLIP}",
        f"rerank.pretrained={tmp_path / 'clip.pt'}",
        f"out_dir={tmp_path / 'run'}",
    )
    scores = s["clip_scores"]
    assert len(scores) == 3 and all(-1.0 <= x <= 1.0 for x in scores)
    best = int(np.argmax(scores))
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "run" / "best.png")),
        np.asarray(Image.open(tmp_path / "run" / f"sample_{best:02d}.png")),
    )
    # the scores are CLIP's own cosine similarities
    from cm3leon.generation.rerank import ClipReranker

    rr = ClipReranker(TINY_CLIP, str(tmp_path / "clip.pt"), device="cpu")
    images = [Image.open(tmp_path / "run" / f"sample_{i:02d}.png") for i in range(3)]
    np.testing.assert_allclose(rr.scores(images, ["a small blue square"] * 3), scores, atol=1e-2)
    order, sorted_scores = rr.rank(images, "a small blue square")
    assert order[0] == best and np.all(np.diff(sorted_scores) <= 0)


class FolderRetriever:
    """Stands in for cm3leon.retrieval.Retriever(folder, k, device) (the retrieval protocol's
    documents(queries, k, rng) -> list[list[Document]]); records the folder it was given."""

    folders: ClassVar[list] = []

    def __init__(self, folder, k: int = 2, device: str = "cpu", tokenizers=None, n_codes: int = 512, tokens: int = 64):
        self.folder, self.k, self.n_codes, self.tokens = Path(folder), k, n_codes, tokens
        FolderRetriever.folders.append(Path(folder))

    def documents(self, queries, k: int, rng=None) -> list[list[Document]]:
        assert all(q.text for q in queries)  # inference retrieves by the prompt text
        rng = np.random.default_rng(0)
        return [
            [Document(np.array([40, 41]), rng.integers(0, self.n_codes, self.tokens)) for _ in range(k)]
            for _ in queries
        ]


def test_retrieved_documents_are_used(tiny_ckpt, tmp_path, monkeypatch):
    import cm3leon.retrieval.retriever as retriever_module
    import generate

    monkeypatch.setattr(retriever_module, "Retriever", FolderRetriever)
    bank = tmp_path / "bank"
    bank.mkdir()
    s = run_generate(
        f"ckpt={tiny_ckpt}",
        "prompt=a red circle",
        "n=2",
        f"retrieval.dir={bank}",
        "retrieval.k=1",
        f"out_dir={tmp_path}",
    )
    assert s["n_retrieved"] == 1 and (tmp_path / "sample_01.png").is_file() and FolderRetriever.folders[-1] == bank
    with pytest.raises(generate.UsageError, match="build_index"):
        run_generate(
            f"ckpt={tiny_ckpt}", "prompt=x", f"retrieval.dir={tmp_path}/none", "retrieval.k=1", f"out_dir={tmp_path}"
        )
    with pytest.raises(generate.UsageError, match="trained without retrieval"):
        run_generate(f"ckpt={tiny_ckpt}", "prompt=x", "retrieval.k=1", f"out_dir={tmp_path}")


def test_a_bank_of_other_tokenizers_is_refused(tiny_ckpt, tiny_bank, tmp_path):
    """The bank's documents are image codes of the world VQGAN: a model reading another codebook
    gets a one-line refusal, a model of the same tokenizers its documents."""
    import generate
    from cm3leon.generation.pipeline import load_pipeline
    from project import SHIPPED_DIR

    with pytest.raises(generate.UsageError, match="another image_tokenizer") as e:
        run_generate(
            f"ckpt={tiny_ckpt}", "prompt=x", f"retrieval.dir={tiny_bank}", "retrieval.k=1", f"out_dir={tmp_path}"
        )
    assert "\n" not in str(e.value) and str(tiny_bank) in str(e.value)
    pipe = load_pipeline(SHIPPED_DIR / "world_lm.safetensors", retrieval={"k": 1, "dir": str(tiny_bank)})
    docs = pipe.retrieve(["a large red circle in the top left"])
    assert pipe.retrieval_k == 1 and len(docs[0]) == 1 and len(docs[0][0].codes) == pipe.tokens_per_image


@pytest.mark.slow
def test_cli_end_to_end(tiny_ckpt, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "src/generate.py",
            f"ckpt={tiny_ckpt}",
            "prompt=a red circle",
            "n=2",
            "decoding=mixed",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "sample_01.png").is_file()


def test_checkpoint_trained_with_retrieval_uses_its_memory_bank(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """train.py records the memory bank of a retrieval=ra run in the checkpoint; generate.py uses
    it when no retrieval is configured, and says so when that bank is gone."""
    import cm3leon.retrieval.retriever as retriever_module

    bank = tmp_path / "tokens" / "retrieval"
    bank.mkdir(parents=True)
    ck = torch.load(tiny_ckpt, map_location="cpu", weights_only=False)
    ck["hyper_parameters"]["data_meta"]["retrieval"] = {"k": 2, "folder": str(bank)}
    ra_ckpt = tmp_path / "ra.ckpt"
    torch.save(ck, ra_ckpt)
    monkeypatch.setattr(retriever_module, "Retriever", FolderRetriever)

    s = run_generate(f"ckpt={ra_ckpt}", "prompt=a red circle", "n=1", "retrieval.k=1", f"out_dir={tmp_path / 'a'}")
    assert s["n_retrieved"] == 1 and FolderRetriever.folders[-1] == bank
    assert f"retrieved documents from {bank}" in capsys.readouterr().out

    shutil.rmtree(bank)
    s = run_generate(f"ckpt={ra_ckpt}", "prompt=a red circle", "n=1", f"out_dir={tmp_path / 'b'}")
    assert s["n_retrieved"] == 0
    err = capsys.readouterr().err
    assert "trained with retrieval" in err and "is gone" in err


def test_image_generation_shows_progress_over_image_tokens(tiny_ckpt, tmp_path, capfd):
    """A tqdm bar over n x tokens_per_image image tokens (progress=true, the default); progress=false: none."""
    base = [f"ckpt={tiny_ckpt}", "prompt=a large red circle in the top left", "n=2", "batch_size=1"]
    run_generate(*base, f"out_dir={tmp_path / 'a'}")
    err = capfd.readouterr().err
    assert "generate: 100%" in err and "128/128" in err  # 2 images x 64 tokens
    run_generate(*base, f"out_dir={tmp_path / 'b'}", "progress=false")
    assert "generate:" not in capfd.readouterr().err


def test_the_shipped_world_model_is_the_default_and_draws_its_caption(tmp_path):
    """A fresh clone samples without training: `python src/generate.py prompt=...` uses the shipped
    weights-only world model (data/shipped/world_lm.safetensors) and its recorded tokenizers."""
    from cm3leon.data.checker import check

    caption = "a large red circle in the center on a white background"
    out = run_generate(f"prompt={caption}", "n=4", "batch_size=4", "decoding.top_p=0.3", f"out_dir={tmp_path}")
    assert out["ckpt"].endswith("data/shipped/world_lm.safetensors")
    images = [np.asarray(Image.open(tmp_path / f"sample_{i:02d}.png").convert("RGB")) for i in range(4)]
    # the shipped model draws this one-shape caption right most of the time: at least one of 4
    assert any(check(im, caption).correct for im in images)


def test_sft_tasks_default_to_the_shipped_instruction_tuned_model(tmp_path):
    """`generate.py task=vqa ...` without ckpt= uses the shipped SFT model
    (data/shipped/world_sft.safetensors, `make sft`), which answers world questions; a missing
    shipped model is one line naming its recipe."""
    from cm3leon.data.sft_world import sample_images, sft_sample
    from cm3leon.errors import UsageError

    right = 0
    for i in range(8):
        s = sft_sample(0, "vqa", "val", i)
        photo = tmp_path / f"scene{i}.png"
        Image.fromarray(sample_images(s)["image"]).save(photo)
        out = run_generate(
            "task=vqa", f"image={photo}", f'question="{s.sft.fields["q"]}"', f"out_dir={tmp_path / str(i)}"
        )
        assert out["ckpt"].endswith("data/shipped/world_sft.safetensors")
        right += out["texts"][0] == s.sft.fields["a"]
    assert right >= 3, right  # greedy: the shipped SFT model answers about half (README: 0.53 on 500)
    with pytest.raises(UsageError, match="make sft") as e:
        run_generate("task=vqa", f"image={photo}", "question=what?", f"paths.shipped_dir={tmp_path}")
    assert "\n" not in str(e.value)
