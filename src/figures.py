"""The paper's claims in miniature, each a figure from one command (README "Claims").

    python src/figures.py                              # all four (trains the figure models first)
    python src/figures.py figures=[guidance,decoding]  # the shipped world model's decoding figures
    python src/figures.py figures=[retrieval] train.steps=1000 eval.n_captions=200

Each figure writes docs/figures/<name>.png, .json (numbers, settings, paired tests, verdict) and
.md (the README block), and an offline W&B run of its curves. Its trainings and evaluations run
the real scripts (`src/train.py`, `src/eval_fid.py`) under `work_dir` and resume when rerun
(`cm3leon.figures.runner`); the figures themselves live in `cm3leon.figures`.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from cm3leon.cli import UsageError, hydra_entry


@hydra_entry("figures", __file__)
def main(cfg: DictConfig) -> None:
    from cm3leon.figures import FIGURES, make
    from cm3leon.figures.runner import FigureContext

    unknown = [f for f in cfg.figures if f not in FIGURES]
    if unknown:
        raise UsageError(f"figures={list(cfg.figures)}: {unknown} not among {list(FIGURES)}")
    ctx = FigureContext(cfg)
    for name in cfg.figures:
        result = make(name, ctx)
        print(json.dumps({"figure": name, "verdict": result["verdict"], "png": result["png"]}))


if __name__ == "__main__":
    main()
