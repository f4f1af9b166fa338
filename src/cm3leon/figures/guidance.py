"""Claim: classifier-free guidance makes text-to-image samples better (PAPER.md section 5; the
paper samples with CFG 3-5). On the shipped world model: caption accuracy and the Frechet distance
in the tiny CLIP's space as the guidance weight goes 1 (none) .. 5, at each top-p of
`guidance.top_ps` (top-p's candidates from the conditional stream, `decoding=topp_cfg`), the same
captions and seed. Verdict tests, at every top-p: the paper's demo weight (`guidance.test_weight`,
3; fixed in advance, not the best of the sweep) against weight 1, caption by caption (McNemar) and
by the paired bootstrap of the Frechet distance.
"""

from __future__ import annotations

from cm3leon.figures import report, stats
from cm3leon.figures.runner import FigureContext


def make(ctx: FigureContext) -> dict:
    g = ctx.cfg.guidance
    ckpt = ctx.shipped_ckpt()
    ref = ctx.reference_features()
    base, test = float(g.weights[0]), float(g.test_weight)
    if test not in map(float, g.weights):
        raise ValueError(f"guidance.test_weight={test:g} must be one of guidance.weights={list(g.weights)}")
    rows, tests, outcome = [], {}, {}
    for top_p in map(float, g.top_ps):
        for w in map(float, g.weights):
            name = f"guidance_p{top_p:g}_w{w:g}"
            overrides = ["decoding=topp_cfg", f"decoding.top_p={top_p}", f"decoding.guidance_scale={w}"]
            res = ctx.evaluate(ckpt, name, overrides)
            outcome[top_p, w] = (ctx.correct(name), ctx.eval_features(name))
            acc = float(outcome[top_p, w][0].mean())
            rows.append(
                {
                    "top_p": top_p,
                    "guidance_scale": w,
                    "caption_accuracy": acc,
                    "accuracy_se": stats.binomial_se(acc, len(outcome[top_p, w][0])),
                    "fd_tiny_clip": stats.frechet(outcome[top_p, w][1], ref),
                    "clip_score": res.get("clip_score"),
                }
            )
        (ok_a, f_a), (ok_b, f_b) = outcome[top_p, base], outcome[top_p, test]
        tests[f"accuracy: top-p {top_p:g}, CFG {test:g} vs {base:g}"] = stats.accuracy_test(ok_a, ok_b)
        tests[f"Frechet: top-p {top_p:g}, CFG {test:g} vs {base:g}"] = stats.frechet_test(f_a, f_b, ref)
    fig, (ax_acc, ax_fd) = report.new_axes(2)
    for i, top_p in enumerate(map(float, g.top_ps)):
        pts = [r for r in rows if r["top_p"] == top_p]
        xs = [r["guidance_scale"] for r in pts]
        kw = {"marker": "o", "color": f"C{i}", "label": f"top-p {top_p:g}"}
        ax_acc.errorbar(xs, [r["caption_accuracy"] for r in pts], yerr=[r["accuracy_se"] for r in pts], **kw)
        ax_fd.plot(xs, [r["fd_tiny_clip"] for r in pts], **kw)
    ax_acc.set(xlabel="guidance weight", ylabel="caption accuracy", title="accuracy (higher is better)")
    ax_fd.set(xlabel="guidance weight", ylabel="FD (tiny CLIP)", title="Frechet distance (lower is better)")
    ax_acc.legend()
    n = len(outcome[float(g.top_ps[0]), base][0])
    text = {
        "title": "Guidance weight sweep",
        "claim": f"CFG {test:g} beats no guidance, at every top-p, on {n} val captions (1 sample each).",
        "paper": "CFG 3 (demo) / 5 (FID script) sampling; Figure 4's curves are all guided",
    }
    settings = {"checkpoint": str(ckpt), "eval": ctx.eval_args(), "top_ps": list(g.top_ps), "n": n}
    cols = ["top_p", "guidance_scale", "caption_accuracy", "accuracy_se", "fd_tiny_clip", "clip_score"]
    series = [("guidance_scale", "caption_accuracy", "top_p"), ("guidance_scale", "fd_tiny_clip", "top_p")]
    return report.publish(ctx, "guidance", text, rows, tests, settings, fig, cols, series)
