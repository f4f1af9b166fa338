"""SFT inference (issue 18 part 3): src/generate.py task=edit|control|grounded|vqa|caption and
cm3leon.generation.sft on a tiny random checkpoint. The numbers mean nothing; what is tested is
that every task runs and writes its outputs, that the prompts are the SFT templates' own
(`sft_prompt` of the same sample: training and inference cannot drift), the guidance streams,
and the one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from cm3leon.data.sft_templates import sft_prompt
from cm3leon.data.sft_world import sample_images, sft_sample
from project import CONF_DIR, PROJECT_ROOT


@pytest.fixture(scope="module")
def sft_ckpt(tiny_eval_run) -> Path:
    """A random 2-layer LM with a 256-token context (an edit prompt holds two 64-code images) and
    world images on disk: a photo and a canny control map."""
    from eval_builders import make_tiny_lm

    root = tiny_eval_run["root"]
    ckpt = root / "sft_lm256.ckpt"
    if not ckpt.is_file():
        make_tiny_lm(ckpt, tiny_eval_run["vqgan"], max_seq_len=256)
    s = sft_sample(0, "control", "val", 0)
    images = sample_images(s)
    Image.fromarray(images["image"]).save(root / "photo.png")
    Image.fromarray(images["control image"]).save(root / "canny.png")
    return ckpt


def run_generate(*overrides: str) -> dict:
    import generate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("generate", overrides=["cpu_threads=1", "progress=false", *overrides])
    threads = torch.get_num_threads()
    try:
        return generate.run(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def recorded(monkeypatch) -> list:
    """The prompts of every DecodeSession the generation tasks open: [(prompts, n_streams), ...]."""
    import cm3leon.generation.tasks as tasks

    calls = []

    class Recording(tasks.DecodeSession):
        def __init__(self, model, prompts, n_streams=1, *args, **kwargs):
            calls.append(([list(map(int, p)) for p in prompts], n_streams))
            super().__init__(model, prompts, n_streams, *args, **kwargs)

    monkeypatch.setattr(tasks, "DecodeSession", Recording)
    return calls


def test_every_sft_task_writes_its_outputs(sft_ckpt, tmp_path, capsys):
    root = sft_ckpt.parent
    base = [f"ckpt={sft_ckpt}", "n=2", "batch_size=2"]
    cases = {
        "edit": ["task=edit", f"image={root / 'photo.png'}", "instruction=make the red circle blue"],
        "edit_old_name": ["task=edit", f"image={root / 'photo.png'}", "prompt=make the red circle blue"],
        "control": [
            "task=control",
            f"image={root / 'canny.png'}",
            "kind=canny",
            "prompt=a large red circle in the center on a white background",
        ],
        "grounded": [
            "task=grounded",
            "prompt=a large red circle in the center on a white background",
            "boxes=[[red circle,88,88,168,168]]",
        ],
        "grounded_text": [
            "task=grounded",
            "prompt=a large red circle in the center on a white background",
            "boxes='red circle at (88, 88) -> (168, 168)'",
        ],
    }
    for name, args in cases.items():
        out = tmp_path / name
        s = run_generate(*base, *args, f"out_dir={out}")
        task = args[0].split("=")[1]
        assert [Image.open(out / f"{task}_{i:02d}.png").size for i in range(2)] == [(64, 64)] * 2, name
        saved = json.loads((out / "samples.json").read_text())
        assert saved["task"] == task and saved["template"] == task and s["grid"] == str(out / "grid.png")
    saved = json.loads((tmp_path / "edit" / "samples.json").read_text())
    assert saved["decoding"]["image_weight"] == 1.5 and saved["decoding"]["text_weight"] == 7.5  # instruct-CFG
    assert "make the red circle blue" in saved["request"]
    grounded = json.loads((tmp_path / "grounded" / "samples.json").read_text())
    assert "red circle at (88, 88) -> (168, 168)" in grounded["request"]
    assert grounded["decoding"]["guidance_scale"] == 3.0
    assert grounded["request"] == json.loads((tmp_path / "grounded_text" / "samples.json").read_text())["request"]

    photo = root / "photo.png"
    for args, template in (
        (["task=vqa", "question=What colour is the circle?"], "vqa"),
        (["task=vqa", "question=What colour is the circle?", "vqa.template=vqa_image_first"], "vqa_image_first"),
        (["task=caption"], "caption"),
        (["task=caption", "caption.describe=true"], "caption_describe"),
    ):
        out = tmp_path / template
        capsys.readouterr()
        s = run_generate(f"ckpt={sft_ckpt}", *args, f"image={photo}", "caption.max_len=4", f"out_dir={out}")
        saved = json.loads((out / "samples.json").read_text())
        assert saved["template"] == template and len(saved["texts"]) == 1 == len(s["texts"])  # greedy: one
        assert capsys.readouterr().out.splitlines()[0] == s["texts"][0]
    assert json.loads((tmp_path / "caption_describe" / "samples.json").read_text())["request"].startswith(
        "Describe the given picture."
    )


def _world_inputs(task: str, index: int = 0, image_tokenizer=None):
    """A world sample, its input codes (the target slot left out) and every slot's codes."""
    from cm3leon.generation.sft import input_slots

    s = sft_sample(0, task, "val", index)
    images = sample_images(s)
    slots = list(images)
    codes = dict(zip(slots, image_tokenizer.encode([images[k] for k in slots]).numpy()))
    return s, {k: codes[k] for k in input_slots(s.sft)}, codes


@pytest.fixture(scope="module")
def loaded(sft_ckpt):
    from cm3leon.generation.pipeline import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared CPU only lose time synchronising threads
    yield load_pipeline(sft_ckpt, "cpu")
    torch.set_num_threads(threads)


@pytest.mark.parametrize("n_docs", [0, 1])
@pytest.mark.parametrize("task", ["edit", "control", "grounded", "vqa", "caption"])
def test_prompts_are_the_templates_own(loaded, recorded, task, n_docs):
    """The conditional stream of every task is `sft_prompt` of the sample, i.e. the training
    sequence cut where the target starts; the other streams are the documented ones. Retrieved
    documents come first in every stream."""
    from cm3leon.data.sequences import Document, retrieved_prefix, unconditional_prompt
    from cm3leon.generation.sft import sft_images, sft_texts

    pipe, encode, vocab = loaded, loaded.text_tokenizer.encode, loaded.vocab
    # VQA / caption: every template variant; the others: two samples in one batch
    indices = range(6) if task in ("vqa", "caption") else range(2)
    inputs = [_world_inputs(task, i, pipe.image_tokenizer) for i in indices]
    samples, codes = [x[0].sft for x in inputs], [x[1] for x in inputs]
    docs = [[Document(np.array([40 + i, 41]), (np.arange(64) + i) % vocab.n_image_codes)] * n_docs for i in indices]
    if task in ("vqa", "caption"):
        assert len({s.template for s in samples}) > 1
        out = sft_texts(pipe.model, vocab, encode, samples, codes, max_len=3, retrieved=docs)
        assert len(out) == len(samples)
    else:
        from cm3leon.generation.sampling import DecodingConfig

        dec = DecodingConfig(guidance_scale=3.0)
        out = sft_images(pipe.model, vocab, encode, samples, codes, 64, decoding=dec, retrieved=docs)
        assert out.shape == (len(samples), 64) and int(out.min()) >= 0 and int(out.max()) < vocab.n_image_codes
    ((prompts, n_streams),) = recorded  # one batch
    B = len(samples)
    wanted = [sft_prompt(s, vocab, encode, x[2], d) for s, x, d in zip(samples, inputs, docs)]
    assert prompts[:B] == wanted
    if n_docs:
        assert all(p[: len(retrieved_prefix(d, vocab))] == retrieved_prefix(d, vocab) for p, d in zip(prompts, docs))
    s0, brk = vocab.sentinel_id(0), vocab.break_id
    if task == "edit":  # instruct-CFG: full, image-only (instruction dropped), unconditional
        assert n_streams == 3
        source = vocab.codes_to_ids(inputs[0][2]["image1"]).tolist()
        assert prompts[B][-len(source) - 3 :] == [*source, brk, s0, brk]
        assert prompts[2 * B] == unconditional_prompt(vocab, docs[0])
    elif task == "control":  # CFG: the documents, prefix and control image kept, the caption dropped
        control = vocab.codes_to_ids(inputs[0][2]["control image"]).tolist()
        assert n_streams == 2 and prompts[B][-len(control) - 3 :] == [*control, brk, s0, brk]
        assert prompts[B][: len(retrieved_prefix(docs[0], vocab))] == retrieved_prefix(docs[0], vocab)
    elif task == "grounded":  # CFG: the whole text dropped
        assert n_streams == 2 and prompts[B] == unconditional_prompt(vocab, docs[0])
    else:
        assert n_streams == 1


def test_generate_script_prompts_with_the_templates(sft_ckpt, recorded, tmp_path):
    """src/generate.py's edit and VQA prompts are sft_prompt of the request built from the command line."""
    from cm3leon.generation import sft
    from cm3leon.generation.pipeline import load_pipeline

    photo = sft_ckpt.parent / "photo.png"
    run_generate(
        f"ckpt={sft_ckpt}", "task=edit", f"image={photo}", "instruction=make it blue", "n=1", f"out_dir={tmp_path}"
    )
    run_generate(
        f"ckpt={sft_ckpt}",
        "task=vqa",
        f"image={photo}",
        "question=What shape?",
        "caption.max_len=2",
        f"out_dir={tmp_path}",
    )
    pipe = load_pipeline(sft_ckpt, "cpu")
    codes = pipe.image_tokenizer.encode([Image.open(photo).convert("RGB")])[0].numpy()
    empty = np.zeros(0, dtype=np.int64)
    enc = pipe.text_tokenizer.encode
    edit = sft_prompt(sft.edit_request("make it blue"), pipe.vocab, enc, {"image1": codes, "image2": empty})
    vqa = sft_prompt(sft.vqa_request("What shape?"), pipe.vocab, enc, {"image": codes})
    assert recorded[0][0][0] == edit and recorded[1][0][0] == vqa


def test_missing_inputs_are_one_line(sft_ckpt, tmp_path):
    import generate

    photo = sft_ckpt.parent / "photo.png"
    ck = f"ckpt={sft_ckpt}"
    for args, match in (
        (["task=edit", f"image={photo}"], "needs instruction="),
        (["task=edit", "instruction=make it blue"], "needs image="),
        (["task=vqa", f"image={photo}"], "needs question="),
        (["task=vqa", f"image={photo}", "question=q?", "vqa.template=nope"], "VQA template"),
        (["task=control", f"image={photo}", "prompt=a caption"], "needs kind="),
        (["task=control", f"image={photo}", "prompt=a caption", "kind=sketch"], "control kind"),
        (["task=control", f"image={photo}", "kind=canny"], "needs prompt="),
        (["task=grounded", "prompt=a caption"], "needs boxes="),
        (["task=grounded", "prompt=a caption", "boxes=[[red circle,10,10,5,5]]"], "0 <= x1 < x2"),
        (["task=grounded", "prompt=a caption", "boxes='red circle at 3'"], "is not 'NAME at"),
        (["task=caption", f"image={tmp_path / 'none.png'}"], "not found"),
    ):
        with pytest.raises(generate.UsageError, match=match):
            run_generate(ck, *args, f"out_dir={tmp_path}")
    r = subprocess.run(
        [sys.executable, "src/generate.py", ck, "task=grounded", "prompt=a caption", f"hydra.run.dir={tmp_path}/run"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "needs boxes=" in r.stderr, r.stderr


def test_sft_retrieval_asks_with_the_prompt_text(loaded):
    """A pipeline that retrieves asks with each request's prompt text (never for captioning, whose
    prompt is only an image); one without a retriever gives None."""
    import dataclasses

    from cm3leon.data.sequences import Document
    from cm3leon.generation.sft import caption_request, edit_request, sft_retrieved, vqa_request

    asked = []

    class Recording:
        k = 2

        def documents(self, queries, k, rng=None):
            asked.extend(q.text for q in queries)
            return [[Document(np.array([40]), np.arange(64))] * k for _ in queries]

    requests = [vqa_request("what colour?"), caption_request(), edit_request("make it blue")]
    assert sft_retrieved(loaded, requests) is None  # the tiny checkpoint was trained without retrieval
    docs = sft_retrieved(dataclasses.replace(loaded, retriever=Recording(), retrieval_k=2), requests)
    assert asked == ["what colour?", "make it blue"] and [len(d) for d in docs] == [2, 0, 2]
