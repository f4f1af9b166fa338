"""W&B record of one zero-shot evaluation (`src/eval_fid.py`, the `wandb:` block of conf/eval_fid.yaml).

    log_evaluation({"mode": "offline", "project": "cm3leon"}, out_dir, config={...}, metrics=result,
                   grid="out/grid.png", rows=[(uint8 [H, W, 3], caption, correct | None, clip | None), ...])

One run per evaluation (job_type "eval", named after out_dir): the scalar metrics as summary and as
`eval/<name>`, the captioned grid as `eval/grid`, and `eval/sample_table` (image, caption, correct,
clip_score), built like the training callback's table (`cm3leon.eval.callback`). Offline by default:
the run is written under `<out_dir>/wandb` and `wandb sync` uploads it; nothing is contacted. An
explicit WANDB_MODE environment variable wins over the configured mode; "disabled" writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# fid.json's scalar metrics (coco30k: Inception FID/KID; embedded: tiny-CLIP FD/KD, caption accuracy)
METRICS = (
    "fid",
    "kid_mean",
    "kid_std",
    "fd_tiny_clip",
    "kd_tiny_clip_mean",
    "kd_tiny_clip_std",
    "clip_score",
    "clip_cosine",
    "caption_accuracy",
)


def wandb_mode(configured: str) -> str:
    """The mode to run in: WANDB_MODE when set, else the configured one. Read, not written with
    os.environ.setdefault, so that one evaluation's mode does not leak into the next of the same
    process (Hydra -m sweeps, tests)."""
    mode = os.environ.get("WANDB_MODE") or str(configured)
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"wandb mode {mode!r} is not offline, online or disabled")
    return mode


def scalar_metrics(result: dict) -> dict[str, float]:
    """The present, numeric `METRICS` of a fid.json dict."""
    return {
        k: float(result[k])
        for k in METRICS
        if isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool)
    }


def log_evaluation(
    wandb_cfg: dict,
    out_dir: str | Path,
    config: dict,
    metrics: dict,
    grid: str | Path | None = None,
    rows: Sequence[tuple] = (),
) -> Path | None:
    """Log one evaluation as a W&B run and finish it. Returns the run's local folder (None: disabled).

    wandb_cfg: {mode, project}. config: the run's config (generation settings, eval name, checkpoint).
    metrics: the fid.json dict (its `scalar_metrics` are logged). rows: the sample table, each
    (image uint8 [H, W, 3], caption, correct: bool | None, clip_score: float | None)."""
    mode = wandb_mode(wandb_cfg.get("mode", "offline"))
    if mode == "disabled":
        return None
    import wandb

    out_dir = Path(out_dir)
    run = wandb.init(
        dir=str(out_dir),
        project=str(wandb_cfg.get("project", "cm3leon")),
        mode=mode,
        job_type="eval",
        config=config,
        name=out_dir.name,
        settings=wandb.Settings(console="off"),  # the evaluation's own output stays where it is
    )
    try:
        scalars = scalar_metrics(metrics)
        run.summary.update(scalars)
        logged: dict = {f"eval/{k}": v for k, v in scalars.items()}
        if grid is not None:
            logged["eval/grid"] = wandb.Image(str(grid))
        if rows:
            logged["eval/sample_table"] = wandb.Table(
                columns=["image", "caption", "correct", "clip_score"],
                data=[
                    [wandb.Image(img), cap, None if ok is None else bool(ok), None if s is None else float(s)]
                    for img, cap, ok, s in rows
                ],
            )
        run.log(logged)
        return Path(run.dir).parent  # <out_dir>/wandb/<offline-run-...>
    finally:
        run.finish()
