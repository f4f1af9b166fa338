"""The paired tests behind the figures' verdicts.

Every figure compares two settings on the same validation captions, so each test is paired:
- caption accuracy: the exact McNemar test of the per-caption checker outcomes
  (`cm3leon.eval.paired.compare`: only the captions one setting gets right and the other not count);
- image NLL: the Wilcoxon signed-rank test of the per-example differences (and the paired t-test's
  p beside it);
- Frechet distance (tiny CLIP space): a paired bootstrap over the captions.
A claim's verdict is "reproduced" when every test named for it moves in the paper's direction with
p < alpha, "not reproduced" when none does, "mixed" otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cm3leon.eval.paired import compare


def accuracy_test(correct_a: Sequence[bool], correct_b: Sequence[bool], better: str = "b") -> dict:
    """McNemar of paired outcomes; `better` names the side the paper expects to win ('a' or 'b')."""
    out = compare(list(map(bool, correct_a)), list(map(bool, correct_b)))
    wins = out["accuracy_b"] > out["accuracy_a"] if better == "b" else out["accuracy_a"] > out["accuracy_b"]
    return {"test": "exact McNemar (caption accuracy)", **out, "expected_direction": bool(wins)}


def loss_test(loss_a: np.ndarray, loss_b: np.ndarray, better: str = "b") -> dict:
    """Paired Wilcoxon signed-rank (and t) test of per-example losses [n]; lower is better."""
    from scipy.stats import ttest_rel, wilcoxon

    a, b = np.asarray(loss_a, np.float64), np.asarray(loss_b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two paired 1-d loss arrays, got {a.shape} and {b.shape}")
    d = b - a
    p_w = float(wilcoxon(a, b).pvalue) if np.any(d != 0) else 1.0
    p_t = float(ttest_rel(a, b).pvalue) if np.any(d != 0) else 1.0
    wins = d.mean() < 0 if better == "b" else d.mean() > 0
    return {
        "test": "Wilcoxon signed-rank (image NLL, paired)",
        "n": len(a),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "mean_diff_b_minus_a": float(d.mean()),
        "se_diff": float(d.std(ddof=1) / math.sqrt(len(d))),
        "wilcoxon_p": p_w,
        "paired_t_p": p_t,
        "expected_direction": bool(wins),
    }


def p_value(test: dict) -> float:
    for key in ("mcnemar_exact_p", "wilcoxon_p", "bootstrap_p"):
        if key in test:
            return float(test[key])
    raise KeyError(f"no p-value in test {test.get('test')!r}")


def significant(test: dict, alpha: float) -> bool:
    """The test moves in the paper's direction with p < alpha."""
    return bool(test["expected_direction"]) and p_value(test) < alpha


def verdict(tests: Sequence[dict], alpha: float) -> str:
    """'reproduced' (all significant in the paper's direction), 'not reproduced' (none), 'mixed'."""
    hits = [significant(t, alpha) for t in tests]
    if hits and all(hits):
        return "reproduced"
    return "mixed" if any(hits) else "not reproduced"


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p over n outcomes."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def frechet(features: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance of two feature sets [N, D] (torch-fidelity's, as `cm3leon.eval.fid`)."""
    from cm3leon.eval.fid import feature_statistics, frechet_distance

    return frechet_distance(feature_statistics(features), feature_statistics(reference))


def frechet_test(
    feat_a: np.ndarray, feat_b: np.ndarray, reference: np.ndarray, better: str = "b", n_boot: int = 200, seed: int = 0
) -> dict:
    """Paired bootstrap of the Frechet distance difference: captions are resampled with replacement,
    the same indices for A, B and the reference (row i of each belongs to caption i); the two-sided
    p is twice the smaller tail of the resampled differences FD_b - FD_a around 0."""
    a, b, r = (np.asarray(x, np.float32) for x in (feat_a, feat_b, reference))
    if not (len(a) == len(b) == len(r)):
        raise ValueError(f"paired features need equal rows, got {len(a)}, {len(b)}, {len(r)}")
    fd_a, fd_b = frechet(a, r), frechet(b, r)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, len(a), len(a))
        diffs[i] = frechet(b[idx], r[idx]) - frechet(a[idx], r[idx])
    p = min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()) + 1 / n_boot)
    wins = fd_b < fd_a if better == "b" else fd_a < fd_b
    return {
        "test": f"paired bootstrap ({n_boot} resamples of the captions) of the Frechet distance",
        "n": len(a),
        "fd_a": fd_a,
        "fd_b": fd_b,
        "bootstrap_p": float(p),
        "expected_direction": bool(wins),
    }
