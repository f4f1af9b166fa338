"""Claim: classifier-free guidance makes text-to-image samples better (PAPER.md section 5; the
paper samples with CFG 3-5). On the shipped world model: caption accuracy and the Frechet distance
in the tiny CLIP's space as the guidance weight goes 1 (none) .. 5, the same captions and seed.
Verdict tests: the best weight > 1 against weight 1, caption by caption (McNemar) and by the
paired bootstrap of the Frechet distance.
"""

from __future__ import annotations

from cm3leon.figures import report, stats
from cm3leon.figures.runner import FigureContext


def make(ctx: FigureContext) -> dict:
    g = ctx.cfg.guidance
    ckpt = ctx.shipped_ckpt()
    ref = ctx.reference_features()
    rows, correct, feats = [], {}, {}
    for w in g.weights:
        name = f"guidance_w{w:g}"
        res = ctx.evaluate(ckpt, name, [*g.decoding, f"decoding.guidance_scale={w}"])
        correct[w], feats[w] = ctx.correct(name), ctx.eval_features(name)
        acc = float(correct[w].mean())
        rows.append(
            {
                "guidance_scale": float(w),
                "caption_accuracy": acc,
                "accuracy_se": stats.binomial_se(acc, len(correct[w])),
                "fd_tiny_clip": stats.frechet(feats[w], ref),
                "clip_score": res.get("clip_score"),
            }
        )
    base = float(g.weights[0])
    best = max((r for r in rows if r["guidance_scale"] != base), key=lambda r: r["caption_accuracy"])
    w = best["guidance_scale"]
    key = next(k for k in g.weights if float(k) == w)
    tests = {
        f"accuracy: CFG {w:g} vs {base:g}": stats.accuracy_test(correct[g.weights[0]], correct[key]),
        f"Frechet: CFG {w:g} vs {base:g}": stats.frechet_test(feats[g.weights[0]], feats[key], ref),
    }
    fig, (ax_acc, ax_fd) = report.new_axes(2)
    xs = [r["guidance_scale"] for r in rows]
    ax_acc.errorbar(xs, [r["caption_accuracy"] for r in rows], yerr=[r["accuracy_se"] for r in rows], marker="o")
    ax_acc.set(xlabel="guidance weight", ylabel="caption accuracy", title="accuracy (higher is better)")
    ax_fd.plot(xs, [r["fd_tiny_clip"] for r in rows], marker="o", color="C1")
    ax_fd.set(xlabel="guidance weight", ylabel="FD (tiny CLIP)", title="Frechet distance (lower is better)")
    n = len(correct[key])
    text = {
        "title": "Guidance weight sweep",
        "claim": f"CFG beats no guidance: best weight {w:g} vs 1 on {n} val captions, 1 sample each.",
        "paper": "CFG 3 (demo) / 5 (FID script) sampling; Figure 4's curves are all guided",
    }
    settings = {"checkpoint": str(ckpt), "eval": ctx.eval_args(), "decoding": list(g.decoding), "n": n}
    cols = ["guidance_scale", "caption_accuracy", "accuracy_se", "fd_tiny_clip", "clip_score"]
    return report.publish(
        ctx,
        "guidance",
        text,
        rows,
        tests,
        settings,
        fig,
        cols,
        [("guidance_scale", "caption_accuracy", None), ("guidance_scale", "fd_tiny_clip", None)],
    )
