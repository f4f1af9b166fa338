"""The one image writer of generation: samples as PNG files and a grid (torchvision)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """images float [N, 3, H, W] in [-1, 1] -> one PNG grid at `path` (white 2-px gaps)."""
    from torchvision.utils import make_grid, save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (images.float().clamp(-1, 1) + 1) / 2
    save_image(make_grid(x, nrow=min(nrow, len(x)), padding=2, pad_value=1.0), path)
    return path


def save_samples(out_dir: str | Path, images: torch.Tensor, name: str, scores: Sequence[float] | None = None) -> Path:
    """Each image as NAME_XX.png, plus grid.png (sorted best first when `scores` are given, and the
    best as best.png). images float [N, 3, H, W] in [-1, 1]; returns the grid's path."""
    from torchvision.utils import save_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = (images.float().clamp(-1, 1) + 1) / 2
    for i, im in enumerate(x):
        save_image(im, out_dir / f"{name}_{i:02d}.png")
    order = list(range(len(x))) if scores is None else sorted(range(len(x)), key=lambda i: -scores[i])
    if scores is not None:
        save_image(x[order[0]], out_dir / "best.png")
    return save_grid(images[order], out_dir / "grid.png")
