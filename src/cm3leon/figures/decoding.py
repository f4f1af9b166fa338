"""Claim (the paper's Figure 4): with CLIP re-ranking, more samples per prompt give better images,
and the half/half mixture of top-p and CD-K samples beats either alone. On the shipped world model:
N samples per caption from each strategy are kept (`eval_fid keep_samples=true`), and for every n in
1..N the best of the first n by CLIP score is chosen: top-p alone, CD-K alone, or the mixture (the
first ceil(n/2) top-p and floor(n/2) CD-K samples, as `decoding=mixed` draws them). Verdict tests
(the paper measures FID): the Frechet distance of the mixture at n = N against each strategy alone,
and of top-p at n = N against n = 1 (paired bootstrap); caption accuracy is reported beside.
"""

from __future__ import annotations

import json
import math

import numpy as np

from cm3leon.figures import report, stats
from cm3leon.figures.runner import FigureContext

STRATEGIES = ("topp", "cdk")


def _samples(ctx: FigureContext, name: str, n_max: int) -> tuple[np.ndarray, list[list]]:
    """(CLIP scores [P, n_max], sample paths [P][n_max]) of a keep_samples evaluation, prompt order."""
    folder = ctx.eval_dir(name) / "samples"
    scores, paths = [], []
    for p in ctx.prompts():
        record = json.loads((folder / f"{p.index:06d}.json").read_text())
        scores.append(record["clip_scores"][:n_max])
        paths.append([folder / f"{p.index:06d}_{j:02d}.png" for j in range(n_max)])
    return np.asarray(scores, dtype=np.float64), paths


def _checked(paths: list[list]) -> np.ndarray:
    """The pixel checker's outcome of every sample [P, n] against its prompt's caption."""
    from PIL import Image

    from cm3leon.data.checker import check

    return np.asarray(
        [[check(np.asarray(Image.open(f).convert("RGB")), cap).correct for f in row] for cap, row in paths]
    )


def pick(scores: dict[str, np.ndarray], n: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Best of the first n samples by score: (source strategy index [P], sample index [P]).
    'mixed': among the first ceil(n/2) top-p and floor(n/2) CD-K samples."""
    if strategy != "mixed":
        return np.full(len(scores[strategy]), STRATEGIES.index(strategy)), scores[strategy][:, :n].argmax(1)
    n_topp, n_cdk = math.ceil(n / 2), n // 2
    both = np.concatenate([scores["topp"][:, :n_topp], scores["cdk"][:, :n_cdk]], axis=1)
    best = both.argmax(1)
    return (best >= n_topp).astype(int), np.where(best >= n_topp, best - n_topp, best)


def make(ctx: FigureContext) -> dict:
    d = ctx.cfg.decoding_figure
    ckpt, n_max = ctx.shipped_ckpt(), int(d.max_samples)
    ref = ctx.reference_features()
    scores, correct, feats = {}, {}, {}
    for s in STRATEGIES:
        name = f"decoding_{s}_n{n_max}"
        ctx.evaluate(ckpt, name, [*d.strategies[s], "keep_samples=true"], samples=n_max)
        scores[s], paths = _samples(ctx, name, n_max)
        caps = [p.caption for p in ctx.prompts()]
        correct[s] = _checked(list(zip(caps, paths)))
        flat = ctx.features([f for row in paths for f in row])
        feats[s] = flat.reshape(len(paths), n_max, -1)
    rows, chosen = [], {}
    for n in range(1, n_max + 1):
        for strategy in (*STRATEGIES, "mixed"):
            src, j = pick(scores, n, strategy)
            rng = np.arange(len(j))
            ok = np.where(src == 0, correct["topp"][rng, j], correct["cdk"][rng, j])
            f = np.where((src == 0)[:, None], feats["topp"][rng, j], feats["cdk"][rng, j])
            chosen[(strategy, n)] = (ok, f)
            acc = float(ok.mean())
            rows.append(
                {
                    "strategy": strategy,
                    "samples": n,
                    "caption_accuracy": acc,
                    "accuracy_se": stats.binomial_se(acc, len(ok)),
                    "fd_tiny_clip": stats.frechet(f, ref),
                }
            )
    tests = {
        f"FD: mixed vs top-p at n={n_max}": stats.frechet_test(
            chosen[("topp", n_max)][1], chosen[("mixed", n_max)][1], ref
        ),
        f"FD: mixed vs CD-K at n={n_max}": stats.frechet_test(
            chosen[("cdk", n_max)][1], chosen[("mixed", n_max)][1], ref
        ),
        f"FD: top-p n={n_max} vs n=1": stats.frechet_test(chosen[("topp", 1)][1], chosen[("topp", n_max)][1], ref),
    }
    more = {
        f"accuracy: mixed vs top-p at n={n_max}": stats.accuracy_test(
            chosen[("topp", n_max)][0], chosen[("mixed", n_max)][0]
        ),
        f"accuracy: mixed vs CD-K at n={n_max}": stats.accuracy_test(
            chosen[("cdk", n_max)][0], chosen[("mixed", n_max)][0]
        ),
        f"accuracy: top-p n={n_max} vs n=1": stats.accuracy_test(chosen[("topp", 1)][0], chosen[("topp", n_max)][0]),
    }
    fig, (ax_fd, ax_acc) = report.new_axes(2)
    for i, strategy in enumerate((*STRATEGIES, "mixed")):
        pts = [r for r in rows if r["strategy"] == strategy]
        label = {"topp": "top-p", "cdk": "CD-K", "mixed": "mixed top-p / CD-K"}[strategy]
        ax_fd.plot(
            [r["samples"] for r in pts], [r["fd_tiny_clip"] for r in pts], marker="o", color=f"C{i}", label=label
        )
        ax_acc.plot([r["samples"] for r in pts], [r["caption_accuracy"] for r in pts], marker="o", color=f"C{i}")
    ax_fd.set(
        xlabel="samples per prompt (best by CLIP)", ylabel="FD (tiny CLIP)", title="Frechet distance (lower is better)"
    )
    ax_acc.set(
        xlabel="samples per prompt (best by CLIP)", ylabel="caption accuracy", title="accuracy (higher is better)"
    )
    ax_fd.set_yscale("log")  # CD-K's distances are ~10x the others'
    ax_fd.legend()
    n = len(chosen[("topp", 1)][0])
    text = {
        "title": "Top-p vs CD-K vs their mixture, 1..8 samples re-ranked by CLIP (the paper's Figure 4)",
        "claim": f"Re-ranking more samples helps and the mixture is best (FD), on {n} val captions.",
        "paper": "Figure 4: FID falls as samples grow; mixed TopP/CD-K lowest",
    }
    settings = {
        "checkpoint": str(ckpt),
        "eval": ctx.eval_args(n_max),
        "strategies": {s: list(d.strategies[s]) for s in STRATEGIES},
        "max_samples": n_max,
        "n": n,
    }
    cols = ["strategy", "samples", "caption_accuracy", "accuracy_se", "fd_tiny_clip"]
    series = [("samples", "fd_tiny_clip", "strategy"), ("samples", "caption_accuracy", "strategy")]
    return report.publish(ctx, "decoding", text, rows, tests, settings, fig, cols, series, more_tests=more)
