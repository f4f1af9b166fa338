"""The prepared GPU check (src/gpu_check.py) in its tiny CPU mode: every section's code path runs
and lands in the JSON and the Markdown table, so the script is ready whenever a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_mode_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src/gpu_check.py"), "--out", str(out), "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    sections = ["train_step_350m", "train_stack_350m", "train_7b_proxy", "flex", "generate_tiny", "retrieval"]
    for name in sections:
        assert name in result and "error" not in result[name], (name, result.get(name))
    assert result["train_stack_350m"]["real_tokens"] > 0 and result["train_stack_350m"]["mfu"] > 0
    assert "experiment=paper_350m" in result["train_stack_350m"]["command"]
    assert result["flex"]["max_logit_diff"] < 1e-4  # flex == dense-mask SDPA on packed rows
    assert result["generate_tiny"]["same_tokens"] and result["train_step_350m"]["speedup"] > 0
    table = (out / "gpu_check.md").read_text().splitlines()
    assert table[0].startswith("| check | ours | peer |") and len(table) == 2 + len(sections)
    assert not any("error" in line for line in table)


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    import pytest
    import torch

    from cm3leon.bench.gpu_check import run_check

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        run_check(tmp_path, tiny=False)
