"""Claim (the paper's Table 1): retrieval augmentation makes a model of the same size much better
(FID 10.82 -> 5.78 -> 4.88 with 0, 1, 2 retrieved documents). On the world: the tiny model trained
without retrieval (`models.base`) and with it (`models.retrieval`: retrieval=ra, k=2 per example),
the same steps and batch of query documents, each evaluated with 0, 1 and 2 documents retrieved by
the caption text from the training set. Verdict tests: the retrieval-trained model with 2 documents
against the plain model with none (image NLL: Wilcoxon; caption accuracy: McNemar; Frechet
distance: paired bootstrap); the same model with 2 vs 0 documents is reported beside.
"""

from __future__ import annotations

from cm3leon.figures import report, stats
from cm3leon.figures.models import evaluate_model, model_settings
from cm3leon.figures.runner import FigureContext


def make(ctx: FigureContext) -> dict:
    cfg = ctx.cfg
    ks = [int(k) for k in cfg.retrieval_figure.ks]
    ctx.train("retrieval")  # first: its DataModule builds the memory bank the evaluations retrieve from
    out = {(m, k): evaluate_model(ctx, m, k) for m in ("base", "retrieval") for k in ks}
    lo, hi = min(ks), max(ks)
    a, b = out[("base", lo)], out[("retrieval", hi)]
    ref = ctx.reference_features()
    tests = {
        f"NLL: retrieval-trained k={hi} vs plain k={lo}": stats.loss_test(a["nll"], b["nll"]),
        f"accuracy: retrieval-trained k={hi} vs plain k={lo}": stats.accuracy_test(a["correct"], b["correct"]),
        f"FD: retrieval-trained k={hi} vs plain k={lo}": stats.frechet_test(a["features"], b["features"], ref),
    }
    r0 = out[("retrieval", lo)]
    more = {
        f"NLL: retrieval-trained k={hi} vs k={lo}": stats.loss_test(r0["nll"], b["nll"]),
        f"accuracy: retrieval-trained k={hi} vs k={lo}": stats.accuracy_test(r0["correct"], b["correct"]),
        f"NLL: plain model k={hi} vs k={lo}": stats.loss_test(a["nll"], out[("base", hi)]["nll"]),
    }
    rows = [v["row"] for v in out.values()]
    fig, axes = report.new_axes(3)
    for i, m in enumerate(("base", "retrieval")):
        pts = [r for r in rows if r["model"] == m]
        label = {"base": "trained without retrieval", "retrieval": "trained with retrieval (k=2)"}[m]
        for ax, key, se in zip(
            axes, ("image_nll", "caption_accuracy", "fd_tiny_clip"), ("nll_se", "accuracy_se", None)
        ):
            ys = [r[key] for r in pts]
            ax.errorbar(
                ks, ys, yerr=None if se is None else [r[se] for r in pts], marker="o", color=f"C{i}", label=label
            )
    axes[0].set(
        xlabel="retrieved documents at evaluation", ylabel="image NLL (nats/token)", title="image NLL (lower is better)"
    )
    axes[1].set(
        xlabel="retrieved documents at evaluation", ylabel="caption accuracy", title="accuracy (higher is better)"
    )
    axes[2].set(
        xlabel="retrieved documents at evaluation", ylabel="FD (tiny CLIP)", title="Frechet distance (lower is better)"
    )
    for ax in axes:
        ax.set_xticks(ks)
    axes[0].legend()
    n = len(a["correct"])
    text = {
        "title": "Retrieval augmentation (the paper's Table 1 in miniature)",
        "claim": f"A model trained with retrieval and given {hi} documents beats the same model trained without, "
        f"at the same steps, on {n} val captions.",
        "paper": "CM3Leon-7B FID 10.82 / 5.78 / 4.88 with 0 / 1 / 2 retrieved documents",
    }
    settings = model_settings(ctx, ("base", "retrieval"))
    cols = ["model", "retrieved", "image_nll", "nll_se", "caption_accuracy", "accuracy_se", "fd_tiny_clip"]
    series = [
        (x, y, "model")
        for x, y in (("retrieved", "image_nll"), ("retrieved", "caption_accuracy"), ("retrieved", "fd_tiny_clip"))
    ]
    return report.publish(ctx, "retrieval", text, rows, tests, settings, fig, cols, series, more_tests=more)
