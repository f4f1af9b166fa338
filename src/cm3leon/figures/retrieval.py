"""Claim (the paper's Table 1): retrieval augmentation makes a model of the same size much better
(FID 10.82 -> 5.78 -> 4.88 with 0, 1, 2 retrieved documents). On the world: the tiny model trained
without retrieval (`models.base`) and with it (`models.retrieval`: retrieval=ra, k=2 per example),
the same steps and batch of query documents, each evaluated with 0, 1 and 2 documents retrieved by
the caption text from the training set. Verdict tests: the retrieval-trained model with 2 documents
against the plain model with none (image NLL: Wilcoxon; caption accuracy: McNemar; Frechet
distance: paired bootstrap); the same model with 2 vs 0 documents is reported beside.

Training with retrieval puts the documents' tokens in the loss too (PAPER.md section 3), so at the
same steps the retrieval model trains on about 3x the tokens. With `retrieval_figure.token_control`
the shipped plain world model (`shipped_ckpt`, trained longer without retrieval) is evaluated the
same way and reported against the retrieval model with 2 documents: a control at about the same
training tokens (README "Claims" gives both token counts).
"""

from __future__ import annotations

from cm3leon.figures import report, stats
from cm3leon.figures.models import evaluate_checkpoint, evaluate_model, model_settings
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
    control = None
    if cfg.retrieval_figure.token_control:
        control = evaluate_checkpoint(ctx, ctx.shipped_ckpt(), "shipped", lo)
        what = f"retrieval-trained k={hi} vs the shipped plain model k={lo}"
        more[f"NLL: {what}"] = stats.loss_test(control["nll"], b["nll"])
        more[f"accuracy: {what}"] = stats.accuracy_test(control["correct"], b["correct"])
        more[f"FD: {what}"] = stats.frechet_test(control["features"], b["features"], ref)
    rows = [v["row"] for v in out.values()] + ([control["row"]] if control else [])
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
    if control:
        for ax, key in zip(axes, ("image_nll", "caption_accuracy", "fd_tiny_clip")):
            ax.plot(
                [lo],
                [control["row"][key]],
                marker="*",
                markersize=12,
                linestyle="",
                color="C2",
                label="plain, trained longer (about the same tokens)",
            )
    for ax in axes:
        ax.set_xticks(ks)
    axes[1].legend(loc="center right", fontsize="small")  # the empty part of the three panels
    n = len(a["correct"])
    text = {
        "title": "Retrieval augmentation (the paper's Table 1 in miniature)",
        "claim": f"A model trained with retrieval and given {hi} documents beats the same model trained without, "
        f"at the same steps, on {n} val captions.",
        "paper": "CM3Leon-7B FID 10.82 / 5.78 / 4.88 with 0 / 1 / 2 retrieved documents",
    }
    settings = model_settings(ctx, ("base", "retrieval"))
    if control:
        settings["token_control"] = str(ctx.shipped_ckpt())
    cols = ["model", "retrieved", "image_nll", "nll_se", "caption_accuracy", "accuracy_se", "fd_tiny_clip"]
    series = [
        (x, y, "model")
        for x, y in (("retrieved", "image_nll"), ("retrieved", "caption_accuracy"), ("retrieved", "fd_tiny_clip"))
    ]
    return report.publish(ctx, "retrieval", text, rows, tests, settings, fig, cols, series, more_tests=more)
