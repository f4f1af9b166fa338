"""The README's evaluation table: one Markdown table from several `fid.json` files (the logic of
`src/eval_table.py`). Rows are sorted by decoding strategy (top-p first), top-p (largest first) and
guidance scale; caption accuracy carries its binomial standard error (sqrt(p (1 - p) / n));
results whose captions, checkpoint or samples per caption differ are flagged in a column.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

_ATTRIBUTES = ("colour", "kind", "size", "position", "no_extra", "background")


def find_results(paths: list[str]) -> list[Path]:
    """fid.json files named directly or found below the given folders (sorted, no duplicates)."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found.update(p.rglob("fid.json"))
        elif p.is_file():
            found.add(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder (pass fid.json files or folders holding them)")
    if not found:
        raise FileNotFoundError(f"no fid.json under {', '.join(paths)} (run src/eval_fid.py first)")
    return sorted(found)


def decoding_label(dec: dict) -> str:
    """'top-p 0.8, CFG 3' / 'CD-K (alpha 0.5, k 5), CFG 3' / 'temperature 0.8, CFG 5'."""
    parts = []
    if dec.get("strategy") in ("cdk", "mixed"):
        name = "CD-K" if dec["strategy"] == "cdk" else "top-p / CD-K mixed"
        parts.append(f"{name} (alpha {dec.get('cdk_alpha')}, k {dec.get('cdk_k')})")
    if dec.get("strategy") != "cdk" and dec.get("top_p") is not None:
        parts.append(f"top-p {dec['top_p']}")
    if dec.get("top_k") is not None:
        parts.append(f"top-k {dec['top_k']}")
    if dec.get("temperature", 1.0) != 1.0:
        parts.append(f"temperature {dec['temperature']}")
    weight = _guidance(dec)
    # CD-K with weight 1 still contrasts with the unconditional stream: only plain sampling is "none"
    parts.append(f"CFG {weight:g}" + (" (none)" if weight == 1 and dec.get("strategy") != "cdk" else ""))
    if weight != 1 and dec.get("truncate_on") == "conditional" and dec.get("strategy") != "cdk":
        parts.append("candidates from the conditional stream")
    return ", ".join(parts)


def _guidance(dec: dict) -> float:
    """The guidance scale of a decoding record (fid.json files before the rename call it cfg_weight)."""
    return float(dec.get("guidance_scale", dec.get("cfg_weight", 1.0)))


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(results: list[dict]) -> str:
    """Markdown table, one row per fid.json dict."""

    def key(r: dict):
        dec = r.get("decoding", {})
        return (
            dec.get("strategy") != "topp",
            dec.get("strategy", ""),
            -float(dec.get("top_p") or 1.0),
            _guidance(dec),
            dec.get("truncate_on") == "conditional",
            str(dec),
        )

    results = sorted(results, key=key)
    groups = {
        (r.get("checkpoint_sha256", "")[:12], r.get("captions_sha256", "")[:12], r.get("samples_per_caption"))
        for r in results
    }
    mixed = len(groups) > 1
    has_acc = any(r.get("caption_accuracy") is not None for r in results)
    metric = "fd_tiny_clip" if any("fd_tiny_clip" in r for r in results) else "fid"
    head = ["decoding", "n"]
    if has_acc:
        head += ["caption accuracy", *[a.replace("_", " ") for a in _ATTRIBUTES]]
    head += ["CLIP score", metric.replace("_", " ")]
    if mixed:
        head += ["checkpoint", "captions", "samples/caption"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        n = int(r.get("n_generated") or r.get("n") or 0)
        row = [decoding_label(r.get("decoding", {})), str(n)]
        if has_acc:
            p = r.get("caption_accuracy")
            se = math.sqrt(p * (1 - p) / n) if p is not None and n else None
            row.append("-" if p is None else f"{p:.3f} ± {se:.3f}")
            detail = r.get("caption_accuracy_detail") or {}
            row += [_fmt(detail.get(a), 2) for a in _ATTRIBUTES]
        row += [_fmt(r.get("clip_score"), 1), _fmt(r.get(metric))]
        if mixed:
            row += [
                r.get("checkpoint_sha256", "")[:12],
                r.get("captions_sha256", "")[:12],
                str(r.get("samples_per_caption")),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def read_results(paths: list[str]) -> list[dict]:
    """The fid.json dicts named by `paths` (files, or folders searched recursively)."""
    results = []
    for f in find_results(paths):
        try:
            results.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e.msg}); rerun src/eval_fid.py for it or leave it out") from None
    return results
