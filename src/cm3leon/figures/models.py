"""Figure models evaluated the same way: the trained checkpoint of a `models.<name>` entry at
`train.steps`, sampled with `model_decoding` and scored by caption accuracy, Frechet distance and
the image NLL, with k retrieved documents (shared by the retrieval and scale figures, so a model's
k=0 evaluation is made once)."""

from __future__ import annotations

import numpy as np

from cm3leon.figures import stats
from cm3leon.figures.runner import FigureContext


def evaluate_model(ctx: FigureContext, model: str, k: int = 0) -> dict:
    """{row: the figure's point, correct: [n] bool, features: [n, D], nll: [n]} of figure model
    `model` (trained first when needed) with k retrieved documents (from the world's memory bank,
    by the caption text)."""
    return evaluate_checkpoint(ctx, ctx.train(model), model, k)


def evaluate_checkpoint(ctx: FigureContext, ckpt, model: str, k: int = 0) -> dict:
    """`evaluate_model` of any checkpoint, named `model` in the rows and the caches."""
    overrides = [*ctx.cfg.model_decoding, f"retrieval.k={k}"]
    if k:
        overrides.append(f"retrieval.dir={ctx.retrieval_dir()}")
    name = f"{model}_k{k}"
    res = ctx.evaluate(ckpt, name, overrides)
    correct, feats = ctx.correct(name), ctx.eval_features(name)
    nll = ctx.image_nll(ckpt, model, k)
    acc = float(correct.mean())
    row = {
        "model": model,
        "retrieved": k,
        "params": parameter_count(ckpt),
        "image_nll": float(nll.mean()),
        "nll_se": float(nll.std(ddof=1) / np.sqrt(len(nll))),
        "caption_accuracy": acc,
        "accuracy_se": stats.binomial_se(acc, len(correct)),
        "fd_tiny_clip": stats.frechet(feats, ctx.reference_features()),
        "clip_score": res.get("clip_score"),
    }
    return {"row": row, "correct": correct, "features": feats, "nll": nll}


def parameter_count(ckpt) -> int:
    from cm3leon.generation.pipeline import load_lm

    model = load_lm(ckpt)[0]
    return int(sum(p.numel() for p in model.parameters()))


def model_settings(ctx: FigureContext, models) -> dict:
    """The recipes of the figure's models and the evaluation protocol (shared with the scale figure)."""
    cfg = ctx.cfg
    return {
        "train": {"steps": int(cfg.train.steps), "seed": int(cfg.train.seed), "overrides": list(cfg.train.overrides)},
        "models": {m: list(cfg.models[m]) for m in models},
        "precision": ctx.precision(),
        "eval": ctx.eval_args(),
        "decoding": list(cfg.model_decoding),
    }
