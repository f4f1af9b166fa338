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


def save_captioned_grid(
    images: torch.Tensor,
    captions: Sequence[str],
    path: str | Path,
    correct: Sequence[bool] | None = None,
    ncol: int = 4,
    tile: int = 192,
) -> Path:
    """A grid where each image (float [N, 3, H, W] in [-1, 1]) is shown at `tile` px with its caption
    below and, when `correct` is given, a green tick or a red cross in its corner (drawn as strokes:
    no font glyph needed). Returns `path` (PNG)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    if len(captions) != len(images) or (correct is not None and len(correct) != len(images)):
        raise ValueError(f"{len(images)} images need as many captions (got {len(captions)}) and correct flags")
    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, width=max(12, tile // 6))[:4] for c in captions]
    text_h = 12 * max((len(w) for w in lines), default=1) + 6
    ncol = max(1, min(ncol, len(images)))
    nrow = -(-len(images) // ncol)
    pad = 4
    sheet = Image.new("RGB", (ncol * (tile + pad) + pad, nrow * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, (im, wrapped) in enumerate(zip(pixels, lines)):
        x, y = pad + (i % ncol) * (tile + pad), pad + (i // ncol) * (tile + text_h + pad)
        sheet.paste(Image.fromarray(im).resize((tile, tile), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped):
            draw.text((x + 2, y + tile + 3 + 12 * j), line, fill="black", font=font)
        if correct is not None:  # a 22-px mark on a white disc in the top-right corner
            cx, cy, r = x + tile - 16, y + 16, 12
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill="white")
            if correct[i]:
                draw.line([(cx - 7, cy), (cx - 2, cy + 6), (cx + 8, cy - 7)], fill=(0, 150, 0), width=4)
            else:
                draw.line([(cx - 7, cy - 7), (cx + 7, cy + 7)], fill=(200, 0, 0), width=4)
                draw.line([(cx - 7, cy + 7), (cx + 7, cy - 7)], fill=(200, 0, 0), width=4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
