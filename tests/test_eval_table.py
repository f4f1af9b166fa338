"""src/eval_table.py: fid.json files -> one Markdown table (the README's CFG table)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "src" / "eval_table.py"


def _result(weight: float, acc: float, strategy: str = "topp", ckpt: str = "a" * 64, n: int = 200) -> dict:
    return {
        "eval": "embedded",
        "n_generated": n,
        "n": n,
        "fd_tiny_clip": 0.1 + weight / 100,
        "clip_score": 40.0 - weight,
        "caption_accuracy": acc,
        "caption_accuracy_detail": {
            "background": 0.98,
            "no_extra": 0.5,
            "colour": 0.75,
            "kind": 0.5,
            "size": 0.625,
            "position": 0.875,
        },
        "decoding": {
            "strategy": strategy,
            "temperature": 1.0,
            "top_p": 0.8,
            "top_k": None,
            "cfg_weight": weight,
            "cdk_alpha": 0.5,
            "cdk_k": 5,
        },
        "checkpoint_sha256": ckpt,
        "captions_sha256": "c" * 64,
        "samples_per_caption": 1,
    }


def _write(dir_: Path, name: str, result: dict) -> Path:
    (dir_ / name).mkdir(parents=True)
    path = dir_ / name / "fid.json"
    path.write_text(json.dumps(result))
    return path


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_sweep_folder_becomes_one_sorted_table_with_standard_errors(tmp_path):
    _write(tmp_path, "x3", _result(3.0, 0.3))
    _write(tmp_path, "x1", _result(1.0, 0.1))
    _write(tmp_path, "xk", _result(3.0, 0.2, strategy="cdk"))
    conditional = _result(3.0, 0.35)
    conditional["decoding"]["truncate_on"] = "conditional"
    _write(tmp_path, "xc", conditional)
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| top-p 0.8, CFG 1 (none)",
        "| top-p 0.8, CFG 3",
        "| top-p 0.8, CFG 3, candidates from the conditional stream",
        "| CD-K (alpha 0.5, k 5), CFG 3",
    ]
    se = math.sqrt(0.3 * 0.7 / 200)
    cells = rows[1].strip("| ").split(" | ")
    assert cells[1] == "200" and cells[2] == f"0.300 ± {se:.3f}"
    assert cells[3:9] == ["0.75", "0.50", "0.62", "0.88", "0.50", "0.98"]
    assert cells[9:] == ["37.0", "0.130"]
    assert "checkpoint" not in out.stdout  # one checkpoint, one caption set: nothing to flag


def test_results_of_different_checkpoints_are_flagged(tmp_path):
    a = _write(tmp_path, "a", _result(1.0, 0.1))
    b = _write(tmp_path, "b", _result(3.0, 0.3, ckpt="b" * 64))
    out = _run(a, b)
    assert out.returncode == 0, out.stderr
    assert "| checkpoint | captions | samples/caption |" in out.stdout
    assert "aaaaaaaaaaaa" in out.stdout and "bbbbbbbbbbbb" in out.stdout


@pytest.mark.parametrize("bad", ["missing", "empty", "corrupt"])
def test_bad_input_is_one_clear_line(tmp_path, bad):
    target = tmp_path / "nothing-here"
    if bad == "empty":
        target.mkdir()
    if bad == "corrupt":
        target.mkdir()
        (target / "fid.json").write_text('{"caption_accuracy": 0.')
    out = _run(target)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1
    assert {"missing": "no such file", "empty": "no fid.json", "corrupt": "not valid JSON"}[bad] in out.stderr
