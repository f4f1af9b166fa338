"""The claims' figures (`src/figures.py`, `cm3leon.figures`): the paired tests against scipy and
hand computations, the mixture's sample choice, the image NLL against the model's logits, and the
real script end to end on a random checkpoint (guidance and decoding), then resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cm3leon.figures import stats
from cm3leon.figures.decoding import pick
from project import PROJECT_ROOT, SRC_DIR


# ---- paired tests ------------------------------------------------------------------------------
def test_accuracy_test_is_mcnemar_on_discordant_pairs():
    a = [True] * 10 + [False] * 30 + [True] * 2
    b = [True] * 10 + [True] * 30 + [False] * 2
    t = stats.accuracy_test(a, b)
    assert (t["only_a"], t["only_b"]) == (2, 30)
    from scipy.stats import binomtest

    assert t["mcnemar_exact_p"] == pytest.approx(binomtest(30, 32, 0.5).pvalue)
    assert t["expected_direction"] and stats.significant(t, 0.01)
    assert not stats.accuracy_test(a, b, better="a")["expected_direction"]


def test_loss_test_direction_and_p():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 0.5, 200)
    t = stats.loss_test(a, a - 0.2 + rng.normal(0, 0.05, 200))
    assert t["expected_direction"] and t["wilcoxon_p"] < 1e-10
    assert t["mean_diff_b_minus_a"] == pytest.approx(-0.2, abs=0.02)
    same = stats.loss_test(a, a)
    assert same["wilcoxon_p"] == 1.0 and not stats.significant(same, 0.05)
    with pytest.raises(ValueError, match="paired"):
        stats.loss_test(a, a[:10])


def test_frechet_test_finds_the_closer_set_and_not_a_tie():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (300, 8))
    near = ref + rng.normal(0, 0.1, ref.shape)
    far = ref * 1.5 + 1.0
    t = stats.frechet_test(far, near, ref, n_boot=100)
    assert t["fd_b"] < t["fd_a"] and t["expected_direction"] and t["bootstrap_p"] < 0.05
    tie = stats.frechet_test(near, near, ref, n_boot=100)
    assert tie["bootstrap_p"] == 1.0
    assert stats.frechet(ref, ref) == pytest.approx(0.0, abs=1e-3)


def test_verdict():
    yes = {"expected_direction": True, "mcnemar_exact_p": 1e-4}
    weak = {"expected_direction": True, "wilcoxon_p": 0.2}
    wrong = {"expected_direction": False, "bootstrap_p": 1e-6}
    assert stats.verdict([yes, yes], 0.01) == "reproduced"
    assert stats.verdict([yes, weak], 0.01) == "mixed"
    assert stats.verdict([weak, wrong], 0.01) == "not reproduced"


# ---- the mixture's choice ----------------------------------------------------------------------
def test_pick_takes_the_best_of_the_first_n_and_the_mixture_splits_half_half():
    scores = {
        "topp": np.array([[0.1, 0.9, 0.5, 0.0], [0.3, 0.2, 0.1, 0.0]]),
        "cdk": np.array([[0.2, 0.0, 0.95, 0.0], [0.8, 0.1, 0.0, 0.0]]),
    }
    src, j = pick(scores, 1, "topp")
    assert src.tolist() == [0, 0] and j.tolist() == [0, 0]
    src, j = pick(scores, 3, "cdk")
    assert src.tolist() == [1, 1] and j.tolist() == [2, 0]
    # n=3: top-p samples 0,1 and CD-K sample 0
    src, j = pick(scores, 3, "mixed")
    assert src.tolist() == [0, 1] and j.tolist() == [1, 0]
    src, j = pick(scores, 1, "mixed")  # one sample: top-p's first
    assert src.tolist() == [0, 0] and j.tolist() == [0, 0]


# ---- image NLL ---------------------------------------------------------------------------------
def test_image_nll_equals_the_logits_cross_entropy(tiny_eval_run):
    from cm3leon.data.sequences import text_to_image_prompt
    from cm3leon.eval.image_nll import image_nll
    from cm3leon.generation.pipeline import load_pipeline

    pipe = load_pipeline(tiny_eval_run["ckpt"], retrieval={"k": 0})
    captions = ["a large red circle in the top left", "a small blue square in the center on a white background"]
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, pipe.image_tokenizer.n_codes, (2, pipe.tokens_per_image), generator=g)
    got = image_nll(pipe, captions, codes, batch_size=2)  # padded to the longer caption
    for i, text_ids in enumerate(pipe.encode_captions(captions)):
        prompt = text_to_image_prompt(text_ids, pipe.vocab)
        image = pipe.vocab.codes_to_ids(codes[i].numpy()).tolist()
        ids = torch.tensor([prompt + image])
        with torch.no_grad():
            logp = torch.log_softmax(pipe.model(ids).double(), -1)[0]
        p = len(prompt)
        want = -logp[p - 1 : p - 1 + len(image)].gather(1, ids[0, p:, None]).mean()
        assert got[i] == pytest.approx(float(want), abs=1e-4)
    with pytest.raises(ValueError, match="codes"):
        image_nll(pipe, captions, codes[:1])


# ---- the script ----------------------------------------------------------------------------------
def run_figures(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SRC_DIR / "figures.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=PROJECT_ROOT,
    )


def figure_args(tiny_eval_run, tmp_path, figures: str) -> list[str]:
    """A random checkpoint stands in for the shipped model: the numbers mean nothing, the files,
    tests, W&B run and the resume are what is checked."""
    return [
        f"figures=[{figures}]",
        f"shipped_ckpt={tiny_eval_run['ckpt']}",
        f"out_dir={tmp_path / 'docs'}",
        f"work_dir={tmp_path / 'work'}",
        f"cache_dir={tmp_path / 'cache'}",
        "eval.n_captions=4",
        "guidance.weights=[1,2]",
        "guidance.test_weight=2",
        "guidance.top_ps=[0.3]",
        "decoding_figure.max_samples=2",
        "quiet=true",
    ]


def check_outputs(tmp_path, name: str) -> dict:
    res = json.loads((tmp_path / "docs" / f"{name}.json").read_text())
    assert (tmp_path / "docs" / f"{name}.png").stat().st_size > 1000
    assert res["verdict"] in ("reproduced", "mixed", "not reproduced")
    md = (tmp_path / "docs" / f"{name}.md").read_text()
    assert res["verdict"].upper() in md and "p = " in md
    return res


def test_guidance_figure_end_to_end_and_resume(tiny_eval_run, tmp_path):
    args = figure_args(tiny_eval_run, tmp_path, "guidance")
    proc = run_figures(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.strip().splitlines() if x.startswith("{")]
    assert [x["figure"] for x in lines] == ["guidance"]
    guidance = check_outputs(tmp_path, "guidance")
    assert [r["guidance_scale"] for r in guidance["rows"]] == [1.0, 2.0]
    assert all(t["n"] == 4 for t in guidance["tests"].values())
    assert list((tmp_path / "work" / "wandb").glob("offline-run-*"))
    # rerun: every evaluation is found done, nothing is generated again
    logs = sorted((tmp_path / "work" / "eval").glob("*.log"))
    sizes = [p.stat().st_size for p in logs]
    again = run_figures(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.stat().st_size for p in logs] == sizes
    assert json.loads((tmp_path / "docs" / "guidance.json").read_text())["rows"] == guidance["rows"]


@pytest.mark.slow  # the guidance figure covers the runner and the report; this adds the kept samples
def test_decoding_figure_end_to_end(tiny_eval_run, tmp_path):
    proc = run_figures(figure_args(tiny_eval_run, tmp_path, "decoding"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    decoding = check_outputs(tmp_path, "decoding")
    assert sorted({(r["strategy"], r["samples"]) for r in decoding["rows"]}) == sorted(
        (s, n) for s in ("topp", "cdk", "mixed") for n in (1, 2)
    )
    # n=1: the mixture is top-p's first sample
    row = {(r["strategy"], r["samples"]): r for r in decoding["rows"]}
    assert row[("mixed", 1)]["fd_tiny_clip"] == pytest.approx(row[("topp", 1)]["fd_tiny_clip"])


def test_figures_refuses_an_unknown_figure_and_a_missing_shipped_model(tmp_path):
    proc = run_figures(["figures=[colour]"], timeout=120)
    assert proc.returncode == 2 and "not among" in proc.stderr
    proc = run_figures(["figures=[guidance]", f"shipped_ckpt={tmp_path / 'nope.safetensors'}"], timeout=120)
    assert proc.returncode == 2 and "make world-model" in proc.stderr
