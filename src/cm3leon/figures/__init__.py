"""The paper's claims in miniature, one figure each (`python src/figures.py`, README "Claims").

- `retrieval`: trained with vs without retrieval, evaluated with 0, 1, 2 documents (Table 1);
- `guidance`: guidance weight 1..5 (caption accuracy, Frechet distance in the tiny CLIP's space);
- `decoding`: top-p vs CD-K vs their mixture, 1..8 samples re-ranked by CLIP (Figure 4);
- `scale`: the tiny model vs a 3-8x larger one at the same tokens.

Each writes `<out_dir>/<figure>.{png,json,md}` and an offline W&B run; each names its paired tests
and a verdict (reproduced / mixed / not reproduced). The runs behind them resume
(`cm3leon.figures.runner`).
"""

from __future__ import annotations

FIGURES = ("retrieval", "guidance", "decoding", "scale")


def make(name: str, ctx) -> dict:
    """Make figure `name` (one of FIGURES) with a `FigureContext`; returns its result dict."""
    import importlib

    if name not in FIGURES:
        raise ValueError(f"figure {name!r} is not one of {FIGURES}")
    return importlib.import_module(f"cm3leon.figures.{name}").make(ctx)
