"""Claim: a larger model is better at the same number of tokens (the paper: 350M FID 14.20, 760M
6.61). On the world: the tiny model (`models.base`) against a 3-8x
larger one (`models.large`) trained the same steps on the same batches, evaluated without
retrieval. Verdict tests: image NLL (Wilcoxon), caption accuracy (McNemar), Frechet distance
(paired bootstrap), large against tiny.
"""

from __future__ import annotations

from cm3leon.figures import report, stats
from cm3leon.figures.models import evaluate_model, model_settings
from cm3leon.figures.runner import FigureContext


def make(ctx: FigureContext) -> dict:
    a, b = evaluate_model(ctx, "base"), evaluate_model(ctx, "large")
    ref = ctx.reference_features()
    tests = {
        "NLL: large vs tiny": stats.loss_test(a["nll"], b["nll"]),
        "accuracy: large vs tiny": stats.accuracy_test(a["correct"], b["correct"]),
        "FD: large vs tiny": stats.frechet_test(a["features"], b["features"], ref),
    }
    rows = [a["row"], b["row"]]
    ratio = b["row"]["params"] / a["row"]["params"]
    fig, axes = report.new_axes(3, width=3.2)
    names = [f"tiny\n{a['row']['params'] / 1e6:.1f}M", f"large\n{b['row']['params'] / 1e6:.1f}M"]
    for ax, key, se, title in zip(
        axes,
        ("image_nll", "caption_accuracy", "fd_tiny_clip"),
        ("nll_se", "accuracy_se", None),
        ("image NLL (lower is better)", "caption accuracy (higher is better)", "FD tiny CLIP (lower is better)"),
    ):
        ax.bar(names, [r[key] for r in rows], yerr=None if se is None else [r[se] for r in rows], color=["C0", "C2"])
        ax.set(title=title)
    n = len(a["correct"])
    text = {
        "title": "Scale at the same tokens",
        "claim": f"A {ratio:.1f}x larger model beats the tiny one at the same steps and batches, on {n} val captions.",
        "paper": "CM3Leon-350M FID 14.20 vs 760M 6.61",
    }
    settings = model_settings(ctx, ("base", "large"))
    cols = ["model", "params", "image_nll", "nll_se", "caption_accuracy", "accuracy_se", "fd_tiny_clip"]
    return report.publish(
        ctx,
        "scale",
        text,
        rows,
        tests,
        settings,
        fig,
        cols,
        [("params", "image_nll", None), ("params", "caption_accuracy", None)],
    )
