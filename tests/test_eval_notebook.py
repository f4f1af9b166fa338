"""notebooks/evaluate.ipynb is a valid v4 notebook whose code runs top to bottom (executed here
cell by cell, without Jupyter) on a small random checkpoint."""

from __future__ import annotations

import json

import pytest

from project import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "notebooks" / "evaluate.ipynb"


def load_notebook() -> dict:
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and nb["cells"]
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and "execution_count" in cell  # committed without outputs
    return nb


def test_notebook_is_valid_json_and_compiles():
    for cell in load_notebook()["cells"]:
        if cell["cell_type"] == "code":
            compile("".join(cell["source"]), NOTEBOOK.name, "exec")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tiny_eval_run, monkeypatch, capsys):
    monkeypatch.setenv("CM3LEON_RUN", str(tiny_eval_run["ckpt"]))
    monkeypatch.setenv("CM3LEON_CLIP", str(tiny_eval_run["clip"]))
    monkeypatch.setenv("CM3LEON_NB_GRID", "2")
    monkeypatch.setenv("CM3LEON_NB_CAPTIONS", "4")
    monkeypatch.setenv("CM3LEON_NB_CFG", "1,3")
    namespace: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(load_notebook()["cells"]):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}[{i}]", "exec"), namespace)
    rows = namespace["rows"]
    assert [r["guidance_scale"] for r in rows] == [1.0, 3.0]
    assert all({"caption_accuracy", "fd_tiny_clip"} <= set(r) for r in rows)
    assert namespace["grid_image"].size[0] > 0
    assert "no evaluation of this checkpoint yet" in capsys.readouterr().out
