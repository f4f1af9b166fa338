"""What a figure leaves behind: `<out_dir>/<figure>.png`, `.json` (every number, the settings and
the tests) and `.md` (the README's table and verdict), plus an offline W&B run whose panels are
the figure's curves (`wandb sync <work_dir>/wandb/offline-run-*` uploads it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from cm3leon.figures.stats import p_value, verdict
from cm3leon.utils import write_json_atomic


def new_axes(n_panels: int, width: float = 4.2, height: float = 3.4):
    """(figure, list of axes) side by side, headless (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False)
    return fig, list(axes[0])


def save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown(result: dict, columns: Sequence[str]) -> str:
    """The README block of a figure: verdict, table of its points, one line per test."""
    lines = [
        f"**{result['title']}**: {result['verdict'].upper()} (alpha {result['alpha']}). {result['claim']}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in result["rows"]]
    lines.append("")
    more = result.get("more_tests") or {}
    for name, t in [*result["tests"].items(), *((f"{k} (reported, not in the verdict)", v) for k, v in more.items())]:
        if "mcnemar_exact_p" in t:
            detail = (
                f"accuracy {t['accuracy_a']:.3f} -> {t['accuracy_b']:.3f}, only A right {t['only_a']}, "
                f"only B right {t['only_b']}, McNemar p = {p_value(t):.2g}"
            )
        elif "fd_a" in t:
            detail = f"Frechet distance {t['fd_a']:.4g} -> {t['fd_b']:.4g}, bootstrap p = {p_value(t):.2g}"
        else:
            detail = (
                f"NLL {t['mean_a']:.4f} -> {t['mean_b']:.4f} (diff {t['mean_diff_b_minus_a']:+.4f} "
                f"+- {t['se_diff']:.4f}), Wilcoxon p = {p_value(t):.2g}"
            )
        lines.append(f"- {name} (n = {t['n']}): {detail}")
    lines += ["", f"Made by `{result['command']}`; settings in `{result['json']}`.", ""]
    return "\n".join(lines)


def write(result: dict, fig, out_dir: Path, columns: Sequence[str], root: Path | None = None) -> dict:
    """Write the PNG, JSON and Markdown of `result` (its 'figure' names the files); returns it with
    their paths (relative to `root`, the checkout, when they are inside it: the README links them)."""
    name = result["figure"]
    out_dir.mkdir(parents=True, exist_ok=True)
    png, js = out_dir / f"{name}.png", out_dir / f"{name}.json"

    def shown(path: Path) -> str:
        return os.path.relpath(path, root) if root and path.resolve().is_relative_to(root.resolve()) else str(path)

    result = {**result, "png": shown(png), "json": shown(js)}
    save_png(fig, png)
    result["markdown"] = markdown(result, columns)
    write_json_atomic(js, result, indent=1)
    (out_dir / f"{name}.md").write_text(result["markdown"])
    return result


def log_wandb(
    result: dict, series: Sequence[tuple[str, str, str | None]], wandb_cfg, work_dir: Path, png: Path
) -> None:
    """One W&B run per figure (job_type figure): a table of the points, one line panel per
    (x, y, stroke) series, the PNG, and the verdict and test p-values as summary."""
    mode = os.environ.get("WANDB_MODE") or str(wandb_cfg.mode)
    if mode == "disabled":
        return
    import wandb

    (work_dir / "wandb").mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=str(wandb_cfg.project),
        dir=str(work_dir),
        mode=mode,
        job_type="figure",
        name=f"figure-{result['figure']}",
        config={"settings": result["settings"], "command": result["command"]},
        reinit="finish_previous",
    )
    columns = sorted({k for r in result["rows"] for k in r})
    table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in result["rows"]])
    panels = {f"{result['figure']}/points": table, f"{result['figure']}/figure": wandb.Image(str(png))}
    for x, y, stroke in series:
        title = f"{result['figure']}: {y} vs {x}"
        panels[f"{result['figure']}/{y}_vs_{x}"] = wandb.plot.line(table, x, y, stroke=stroke, title=title)
    run.log(panels)
    run.summary["verdict"] = result["verdict"]
    for name, t in result["tests"].items():
        run.summary[f"p/{name}"] = p_value(t)
    run.finish()


def publish(
    ctx,
    name: str,
    text: dict,
    rows: list[dict],
    tests: dict,
    settings: dict,
    fig,
    columns: Sequence[str],
    series: Sequence[tuple[str, str, str | None]],
    more_tests: dict | None = None,
) -> dict:
    """Judge, write and log one figure: `text` holds its title, claim and the paper's numbers;
    the verdict comes from `tests` at the configured alpha (`more_tests` are reported only)."""
    alpha = float(ctx.cfg.alpha)
    result = {
        "figure": name,
        **text,
        "verdict": verdict(list(tests.values()), alpha),
        "alpha": alpha,
        "rows": rows,
        "tests": tests,
        "more_tests": more_tests or {},
        "settings": settings,
        "command": f"python src/figures.py figures=[{name}]",
    }
    result = write(result, fig, ctx.out_dir, columns, root=ctx.root)
    log_wandb(result, series, ctx.cfg.wandb, ctx.work_dir, ctx.out_dir / f"{name}.png")
    return result


def load(out_dir: Path, name: str) -> dict | None:
    path = out_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
