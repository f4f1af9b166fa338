"""SFT evaluation (issue 18 part 4): src/eval_sft.py / cm3leon.eval.sft on a tiny random checkpoint,
3 samples per task. The numbers mean nothing; tested: every task runs end to end and writes its
per-sample outcomes, a rerun resumes without generating, the trivial baselines are scored (copying
the source image never edits; the VQA majority is a hand count), the box check on rendered scenes,
the comparison table and PNG, and the one-line errors."""

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cm3leon.data.sft_world import SFT_TASKS, sample_images, sft_samples
from cm3leon.errors import UsageError
from cm3leon.generation.sft import sft_generate as real_sft_generate
from project import CONF_DIR, PROJECT_ROOT

N = 3
VQA_TRAIN_N = 40


@pytest.fixture(scope="module")
def sft_ckpt(tiny_eval_run) -> Path:
    """A random 2-layer LM with a 256-token context (an edit prompt holds two 64-code images)."""
    from eval_builders import make_tiny_lm

    ckpt = tiny_eval_run["root"] / "sft_lm256.ckpt"
    if not ckpt.is_file():
        make_tiny_lm(ckpt, tiny_eval_run["vqgan"], max_seq_len=256)
    return ckpt


def eval_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "eval_sft",
            overrides=[
                f"n={N}",
                f"baselines.vqa_train_n={VQA_TRAIN_N}",
                "cpu_threads=1",
                "progress=false",
                "max_rows=6",  # edit: 2 samples per forward, so 3 samples take two batches
                *overrides,
            ],
        )


def run_eval(*overrides: str) -> dict:
    from cm3leon.eval.sft import run

    threads = torch.get_num_threads()
    try:
        return run(eval_cfg(*overrides))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def evaluated(sft_ckpt, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sft_eval") / "base"
    return out, run_eval(f"ckpt={sft_ckpt}", f"out_dir={out}")


def test_every_task_is_scored_per_sample(evaluated):
    out, result = evaluated
    assert list(result["tasks"]) == list(SFT_TASKS)
    saved = json.loads((out / "sft_eval.json").read_text())
    assert saved["tasks"].keys() == result["tasks"].keys() and (out / "sft_eval.md").is_file()
    for task, summary in saved["tasks"].items():
        rows = [json.loads(line) for line in (out / task / "outcomes.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == list(range(N)) and summary["n"] == N
        assert summary["generated_now"] == N and summary["elapsed_s"] >= 0
        assert summary["accuracy"] == np.mean([r["correct"] for r in rows])
        if task in ("edit", "control", "grounded"):
            assert all((out / r["image"]).is_file() for r in rows)
    table = (out / "sft_eval.md").read_text()
    assert all(f"| {t} |" in table for t in SFT_TASKS)


def test_trivial_baselines(evaluated):
    out, result = evaluated
    # copying the source image never shows the target scene: every world edit changes the scene
    edit = [json.loads(line) for line in (out / "edit" / "outcomes.jsonl").read_text().splitlines()]
    assert result["tasks"]["edit"]["baseline_accuracy"] == 0.0 and not any(r["baseline_correct"] for r in edit)
    # the VQA majority: counted by hand on the same training samples (ties: alphabetical)
    counts: dict = {}
    for s in sft_samples("vqa", "train", VQA_TRAIN_N):
        counts.setdefault(s.question_type, Counter())[s.answer] += 1
    hand = {q: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for q, c in counts.items()}
    assert result["baselines"]["vqa_majority"] == hand
    vqa = [json.loads(line) for line in (out / "vqa" / "outcomes.jsonl").read_text().splitlines()]
    for r, s in zip(vqa, sft_samples("vqa", "val", N)):
        assert r["baseline_prediction"] == hand[s.question_type]
        assert r["baseline_correct"] == (hand[s.question_type] == s.answer)
    assert result["tasks"]["vqa"]["baseline_accuracy"] == np.mean([r["baseline_correct"] for r in vqa])


def pixel_blocks(image) -> np.ndarray:
    """uint8 [64, 64, 3] -> its 8 x 8 pixel blocks, row-major: [64, 192]."""
    return np.asarray(image).reshape(8, 8, 8, 8, 3).swapaxes(1, 2).reshape(64, -1)


class BlockTokenizer:
    """A tokenizer with local codes: one code per 8 x 8 pixel block, equal iff the blocks are."""

    def encode(self, images) -> torch.Tensor:
        return torch.tensor([[hash(b.tobytes()) % 2**31 for b in pixel_blocks(im)] for im in images])


def test_edit_token_overlap_pairs_each_source_with_its_target(evaluated):
    from cm3leon.eval.sft import edit_token_overlap

    samples = list(sft_samples("edit", "val", 7))
    pixels = [sample_images(s) for s in samples]
    assert pixels[0]["image1"].shape == (64, 64, 3)
    # reference: the share of 8 x 8 blocks that no pixel of the edit changes, from the pixels
    kept = [float(np.mean((pixel_blocks(p["image1"]) == pixel_blocks(p["image2"])).all(-1))) for p in pixels]
    got = edit_token_overlap(BlockTokenizer(), samples, batch=3)  # three batches, the last one short
    assert got["mean"] == pytest.approx(np.mean(kept)) and 0 < got["mean"] < 1
    by_op: dict = {}
    for s, k in zip(samples, kept):
        by_op.setdefault(s.op, []).append(k)
    assert got["by_op"] == pytest.approx({op: np.mean(v) for op, v in by_op.items()})
    # the evaluation reports it for the tokenizer it ran with, in the json and the table
    out, result = evaluated
    overlap = result["tasks"]["edit"]["source_target_token_overlap"]
    assert 0 <= overlap["mean"] <= 1 and set(overlap["by_op"]) <= {s.op for s in sft_samples("edit", "val", N)}
    assert "share" in (out / "sft_eval.md").read_text()


def test_resume_reuses_outcomes_and_images(evaluated, sft_ckpt, tmp_path, monkeypatch):
    import cm3leon.generation.sft as sft

    src, first = evaluated
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    # a run killed after saving an image but before its outcome line: the image is scored, not redrawn
    lines = (out / "control" / "outcomes.jsonl").read_text().splitlines()
    (out / "control" / "outcomes.jsonl").write_text("\n".join(lines[:-1]) + "\n")

    def refuse(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(sft, "sft_generate", refuse)
    again = run_eval(f"ckpt={sft_ckpt}", f"out_dir={out}")
    for task in SFT_TASKS:
        assert again["tasks"][task]["accuracy"] == first["tasks"][task]["accuracy"]
        assert again["tasks"][task]["generated_now"] == 0 and again["tasks"][task]["reused"] == N

    made = Counter()

    def counting(pipe, samples, images, **kwargs):
        made[samples[0].task] += len(samples)
        return real_sft_generate(pipe, samples, images, **kwargs)

    monkeypatch.setattr(sft, "sft_generate", counting)
    # a VQA outcome line torn by a kill: that sample is answered again, its half line ignored
    vqa = out / "vqa" / "outcomes.jsonl"
    lines = vqa.read_text().splitlines()
    vqa.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    more = run_eval(f"ckpt={sft_ckpt}", f"out_dir={out}", f"n={N + 1}", "tasks=[edit,vqa]")
    assert made == {"edit": 1, "vqa": 2} and more["tasks"]["edit"]["n"] == N + 1 == more["tasks"]["vqa"]["n"]
    with pytest.raises(UsageError, match="other settings"):
        run_eval(f"ckpt={sft_ckpt}", f"out_dir={out}", "seed=1")


def test_boxes_are_checked_from_pixels():
    from cm3leon.eval.sft import box_iou, boxes_respected, drawn_box

    samples = list(sft_samples("grounded", "val", 20))
    images = [sample_images(s)["image"] for s in samples]
    assert all(all(boxes_respected(im, s.sft.objects)) for s, im in zip(samples, images))
    name, box = samples[0].sft.objects[0]
    assert box_iou(drawn_box(images[0], name, box), box) > 0.9  # a crisp render: the box, to a 64 px pixel
    shifted = [(n, (b[0] + 85, b[1], b[2] + 85, b[3])) for n, b in samples[0].sft.objects if b[2] + 85 <= 256]
    assert not any(boxes_respected(images[0], shifted))  # the box moved one cell: nothing drawn there


def test_comparison_table_and_figure(evaluated, tmp_path):
    base, _ = evaluated
    sft_dir = tmp_path / "sft"
    shutil.copytree(base, sft_dir)
    for task in SFT_TASKS:  # an "SFT model" that gets everything right
        path = sft_dir / task / "outcomes.jsonl"
        rows = [json.loads(line) | {"correct": True} for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = tmp_path / "figures"
    result = run_eval(f"compare=[{base},{sft_dir}]", f"compare_dir={figures}")
    for ext in ("png", "json", "md"):
        assert (figures / f"sft.{ext}").is_file()
    rows = {r["task"]: r for r in result["rows"]}
    assert list(rows) == list(SFT_TASKS) and all(r["sft"] == 1.0 and r["n"] == N for r in rows.values())
    assert rows["edit"]["baseline"] == 0.0 and rows["edit"]["p_sft_vs_baseline"] == 0.25  # 3 of 3 discordant
    assert rows["control"]["baseline"] is None and rows["vqa"]["p_sft_vs_baseline"] is not None
    md = (figures / "sft.md").read_text()
    assert "| task | base | sft | baseline | n | p_sft_vs_base | p_sft_vs_baseline |" in md
    assert "NOT REPRODUCED" in md or "MIXED" in md  # 3 samples are never significant at 0.01
    with pytest.raises(UsageError, match="two eval_sft output folders"):
        run_eval(f"compare=[{base}]")
    with pytest.raises(UsageError, match="not an eval_sft output folder"):
        run_eval(f"compare=[{base},{tmp_path}]")


def test_bad_inputs_are_one_line(sft_ckpt, tmp_path):
    with pytest.raises(UsageError, match="each task is one of"):
        run_eval(f"ckpt={sft_ckpt}", "tasks=[edit,paint]")
    with pytest.raises(UsageError, match="no checkpoint given"):
        run_eval("ckpt=null")
    r = subprocess.run(
        [sys.executable, "src/eval_sft.py", f"ckpt={tmp_path}/none.ckpt", f"hydra.run.dir={tmp_path}/run"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "none.ckpt not found" in lines[0], r.stderr
