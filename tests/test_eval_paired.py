"""src/eval_paired.py: caption-by-caption comparison of two world evaluations (McNemar)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cm3leon.data.world import caption, render, scene_for
from cm3leon.eval.prompts import image_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "src" / "eval_paired.py"
N = 6


def _eval_folder(folder: Path, right: set[int], n: int = N) -> Path:
    """An eval_fid-like folder: the true rendering for indices in `right`, elsewhere a plain canvas of
    another background colour (wrong for every caption: no shape and the wrong background)."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        scene = scene_for(0, "val", i)
        image = render(scene)
        if i not in right:
            image = np.full_like(image, 255 if scene.background == "black" else 0)
        Image.fromarray(image).save(image_path(folder / "images", i))
        lines.append(json.dumps({"index": i, "caption": caption(scene), "reference": None}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_discordant_counts_and_exact_p_match_the_formula(tmp_path):
    a = _eval_folder(tmp_path / "a", right={0, 1, 2, 3, 4})
    b = _eval_folder(tmp_path / "b", right={0, 1, 5})
    out = _run(a, b, a, b)
    assert out.returncode == 0, out.stderr
    first, second, pooled = (json.loads(line) for line in out.stdout.splitlines())
    assert first == {**second, "a": first["a"], "b": first["b"]}
    assert (first["n"], first["only_a"], first["only_b"]) == (N, 3, 1)
    assert math.isclose(first["accuracy_a"], 5 / N) and math.isclose(first["accuracy_b"], 3 / N)
    # exact two-sided binomial test of 1 success in 4 at p = 1/2: 2 * (C(4,0) + C(4,1)) / 2^4
    assert math.isclose(first["mcnemar_exact_p"], 2 * (1 + 4) / 16)
    assert pooled["pooled"] == 2 and (pooled["n"], pooled["only_a"], pooled["only_b"]) == (2 * N, 6, 2)
    assert math.isclose(pooled["mcnemar_exact_p"], 2 * sum(math.comb(8, i) for i in range(3)) / 2**8)


def test_identical_folders_have_no_discordant_caption(tmp_path):
    a = _eval_folder(tmp_path / "a", right={0, 2})
    out = _run(a, a)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["only_a"], result["only_b"], result["mcnemar_exact_p"]) == (0, 0, 1.0)


def test_image_naming_is_eval_fids():
    """eval_paired reads images through cm3leon.eval.prompts.image_path: the very function eval_fid's
    generation writes them through (one naming, and no Lightning import to read a folder)."""
    from cm3leon.eval import generation

    assert image_path is generation.image_path
    assert "cm3leon.eval.prompts import image_path" in (ROOT / "src" / "cm3leon" / "eval" / "paired.py").read_text()


def test_bad_input_is_one_clear_line(tmp_path):
    a = _eval_folder(tmp_path / "a", right={0})
    other = _eval_folder(tmp_path / "other", right={0}, n=N - 1)
    missing_image = _eval_folder(tmp_path / "m", right={0})
    (missing_image / "images" / "000003.png").unlink()
    for args, needle in [
        ((a, other), "different captions"),
        ((a, tmp_path / "nope"), "prompts.jsonl: missing"),
        ((a, missing_image), "000003.png: missing image"),
        ((a,), ""),
    ]:
        out = _run(*args)
        assert out.returncode == 2
        assert needle in (out.stderr + out.stdout)
        if needle:
            assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
