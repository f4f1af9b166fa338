"""Pixel checker for the embedded world: does an image show what its caption says?

No model involved: the image is read back into a `Scene` (`detect`) and compared with the parsed
caption (`check`). Built to survive what a VQGAN decoder does to these images (soft edges, colour
noise, JPEG-like artefacts):

1. resize to 64x64; label every pixel with its nearest palette colour (7 shape + 3 background
   colours), remembering how far it is from that colour;
2. background = the most common background label; its actual colour is the median of those pixels;
3. per grid cell: the dominant *confidently* labelled shape colour (blended edge pixels are far
   from every palette colour and are ignored); too few such pixels = empty cell;
4. coverage: in the cell plus a 6 px margin, each pixel projected on the background -> shape
   colour axis (0 = background, 1 = shape); shape bodies = blobs of coverage > 0.7; the cell owns
   the bodies whose centre lies inside it (so a shape drawn up to ~3 px off-centre is seen whole
   by its own cell and not at all by its neighbour);
5. kind and size: a circle, a square and an apex-up triangle are each fitted to the coverage near
   the owned bodies (soft-edged templates; centre from the coverage centroid, half-extent from
   its mass, refined on a small grid); the best fit gives the kind, its half-extent the size.
   Fitting by mass and least squares, rather than by bounding-box extremes, keeps working when
   blur or JPEG eat corners and apexes.

Described shapes are matched to detected ones (best attribute agreement), so a shape drawn in the
wrong cell still counts as right colour/kind/size but wrong position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from cm3leon.data.world import (
    BACKGROUNDS,
    CANVAS,
    COLOURS,
    KINDS,
    POSITIONS,
    RADII,
    Scene,
    Shape,
    parse_caption,
    shape_sdf,
)

_NAMES = list(COLOURS) + list(BACKGROUNDS)
_PALETTE = np.array([COLOURS[n] for n in COLOURS] + [BACKGROUNDS[n] for n in BACKGROUNDS], np.float32)
_N_SHAPE_COLOURS = len(COLOURS)
# A pixel is "confidently" a palette colour when it lies within this RGB distance of it. Pure
# colours with noise std 10 sit ~17 away; most shape/background blends sit farther.
CONFIDENT_DIST = 60.0
# A cell holds a shape when it has at least this many confident pixels of one shape colour. On
# 1,000 blurred+noisy+JPEG validation images, occupied cells have >= 21 and empty cells <= 4.
MIN_SHAPE_PIXELS = 12
# Fitted half-extent separating small from large shapes (midway, on the 64 px canvas).
SIZE_THRESHOLD = (RADII["small"] + RADII["large"]) / 2
_CELL_EDGES = [round(k * CANVAS / 3) for k in range(4)]  # [0, 21, 43, 64]
# Each cell is read with this many pixels of its neighbours around it (shapes drawn off-centre).
WINDOW_MARGIN = 6
# Template fit: area per unit half-extent^2, and the centroid's offset below the box centre (x r).
_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
_CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3}
_EDGE_RAMP = 1.6  # px over which a template edge goes from 1 to 0 (soft, like a decoded edge)


@dataclass(frozen=True)
class ShapeCheck:
    """Per-attribute verdict for one described shape (False everywhere when nothing matched it)."""

    colour: bool
    kind: bool
    size: bool
    position: bool

    @property
    def correct(self) -> bool:
        return self.colour and self.kind and self.size and self.position


@dataclass(frozen=True)
class CheckResult:
    correct: bool  # every attribute right and no extra shape
    background: bool
    shapes: tuple[ShapeCheck, ...]  # one per described shape, in caption order
    no_extra: bool  # no detected shape is left unexplained by the caption
    detected: Scene  # what the checker read from the pixels

    @property
    def colour(self) -> bool:
        return all(s.colour for s in self.shapes)

    @property
    def kind(self) -> bool:
        return all(s.kind for s in self.shapes)

    @property
    def size(self) -> bool:
        return all(s.size for s in self.shapes)

    @property
    def position(self) -> bool:
        return all(s.position for s in self.shapes)


def to_canvas(image) -> np.ndarray:
    """Any square uint8 [H, H, 3] image (array or PIL) -> uint8 [64, 64, 3]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(
            f"checker expects a square uint8 [H, H, 3] image, got {image.dtype} {tuple(image.shape)}; "
            "convert with (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)"
        )
    if image.shape[0] == CANVAS:
        return image
    # BOX averages when shrinking (no aliasing); bilinear when enlarging a small image.
    resample = Image.Resampling.BOX if image.shape[0] > CANVAS else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((CANVAS, CANVAS), resample))


def _fit_once(cov: np.ndarray, kind: str, cy: float, cx: float, r: float, step: float, scale: float):
    """Best (sse, r, cy, cx) of `kind` over a 3x3 grid of centre shifts and 3 half-extents."""
    h, w = cov.shape
    ys = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    shifts = np.array([-step, 0.0, step], np.float32)
    rs = (r * np.array([1 - scale, 1.0, 1 + scale], np.float32))[:, None, None, None, None]  # [3,1,1,1,1]
    dy = ys - (cy - _CENTROID_OFFSET[kind] * rs + shifts[None, :, None, None, None])  # [3,3,1,h,1]
    dx = xs - (cx + shifts[None, None, :, None, None])  # [1,1,3,1,w]
    tpl = np.clip(0.5 - shape_sdf(kind, dy, dx, rs) / _EDGE_RAMP, 0.0, 1.0)  # [3,3,3,h,w]
    sse = ((tpl - cov) ** 2).sum((-1, -2))
    i, j, k = np.unravel_index(sse.argmin(), sse.shape)
    return float(sse[i, j, k]), float(rs[i, 0, 0, 0, 0]), cy + float(shifts[j]), cx + float(shifts[k])


def fit_shape(cov: np.ndarray) -> tuple[str, float]:
    """(kind, half-extent in px) of the shape best explaining a coverage map cov [h, w] in [0, 1]."""
    cov = cov.astype(np.float32)
    mass = float(cov.sum())
    cy = float((cov.sum(1) * (np.arange(cov.shape[0]) + 0.5)).sum()) / mass
    cx = float((cov.sum(0) * (np.arange(cov.shape[1]) + 0.5)).sum()) / mass
    best = (np.inf, KINDS[0], 0.0)
    for kind in KINDS:
        r0 = float(np.sqrt(mass / _AREA[kind]))
        _, r, y, x = _fit_once(cov, kind, cy, cx, r0, step=1.0, scale=0.1)  # coarse
        sse, r, _, _ = _fit_once(cov, kind, y, x, r, step=0.5, scale=0.05)  # fine
        if sse < best[0]:
            best = (sse, kind, r)
    return best[1], best[2]


def detect(image) -> Scene:
    """Read the scene from the pixels of a square uint8 [H, H, 3] image."""
    img = to_canvas(image).astype(np.float32)
    # Nearest palette entry per pixel: [64, 64] labels and distances.
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2, as one matmul
    d2 = (img * img).sum(-1, keepdims=True) - 2 * img @ _PALETTE.T + (_PALETTE * _PALETTE).sum(-1)
    labels = d2.argmin(-1)
    dist = np.sqrt(np.maximum(np.take_along_axis(d2, labels[..., None], -1)[..., 0], 0))
    bg_counts = np.bincount(labels.ravel(), minlength=len(_NAMES))[_N_SHAPE_COLOURS:]
    bg_label = _N_SHAPE_COLOURS + int(bg_counts.argmax())
    bg_pixels = img[labels == bg_label]
    bg_rgb = np.median(bg_pixels, axis=0) if len(bg_pixels) else _PALETTE[bg_label]
    confident = labels < _N_SHAPE_COLOURS
    confident &= dist <= CONFIDENT_DIST

    shapes = []
    e, m = _CELL_EDGES, WINDOW_MARGIN
    for cell, position in enumerate(POSITIONS):
        row, col = divmod(cell, 3)
        core = (slice(e[row], e[row + 1]), slice(e[col], e[col + 1]))
        counts = np.bincount(labels[core][confident[core]], minlength=_N_SHAPE_COLOURS)
        colour = int(counts.argmax())
        if counts[colour] < MIN_SHAPE_PIXELS:
            continue
        # Look at the cell plus a margin, so a shape drawn a little off-centre is seen whole.
        y0, y1 = max(e[row] - m, 0), min(e[row + 1] + m, CANVAS)
        x0, x1 = max(e[col] - m, 0), min(e[col + 1] + m, CANVAS)
        patch = img[y0:y1, x0:x1]
        in_core = (labels[core] == colour) & confident[core]
        # Coverage: position of each pixel on the background -> shape colour axis (its own colour
        # as drawn: the median of its confident pixels); 0.5 is the edge of a blurred shape.
        own = np.median(img[core][in_core], axis=0)
        axis = own - bg_rgb
        t = (patch - bg_rgb) @ axis / max(float(axis @ axis), 1e-6)
        # Shape bodies: blobs of mostly-shape pixels (a stricter cut than 0.5, and an opening that
        # cuts 1-2 px bridges, keep two blurred shapes of one colour in neighbouring cells apart).
        # The cell owns the bodies whose centre lies inside it; a neighbour's edge reaching in is
        # not this cell's shape.
        comp, n = ndimage.label(ndimage.binary_opening(t > 0.7))
        if n == 0:
            continue
        ys, xs = np.nonzero(comp)
        ids = comp[ys, xs]
        area = np.bincount(ids, minlength=n + 1)
        cy = np.bincount(ids, ys + y0 + 0.5, minlength=n + 1) / np.maximum(area, 1)
        cx = np.bincount(ids, xs + x0 + 0.5, minlength=n + 1) / np.maximum(area, 1)
        owned = (e[row] <= cy) & (cy < e[row + 1]) & (e[col] <= cx) & (cx < e[col + 1])
        owned[0] = False
        if not owned.any():
            continue
        body = owned[comp]
        # The body's soft edge: pixels within 4 px of it and nearer to it than to any other body
        # (a same-coloured shape in the next cell may be only ~1 px away once blurred).
        nearest = ndimage.distance_transform_edt(comp == 0, return_indices=True)[1]
        near = ndimage.binary_dilation(body, iterations=4) & body[nearest[0], nearest[1]]
        cov = np.clip((t - 0.15) / 0.7, 0.0, 1.0) * near  # dead zone: noise on the background -> 0
        rows, cols = np.nonzero(near.any(1))[0], np.nonzero(near.any(0))[0]
        cov = cov[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # fit on the bounding box only (speed)
        kind, r = fit_shape(cov)
        size = "large" if r >= SIZE_THRESHOLD else "small"
        shapes.append(Shape(kind, _NAMES[colour], size, position))
    return Scene(_NAMES[bg_label], tuple(shapes))


# Matching weights: position breaks ties between otherwise equally good matches.
_WEIGHTS = {"colour": 1.0, "kind": 1.0, "size": 1.0, "position": 1.5}


def compare(detected: Scene, described: Scene) -> CheckResult:
    """Verdict of a detected scene against a described one (see module docstring)."""
    found, wanted = detected.shapes, described.shapes
    checks = [ShapeCheck(False, False, False, False) for _ in wanted]
    matched = 0
    if found and wanted:
        score = np.array(
            [[sum(w for a, w in _WEIGHTS.items() if getattr(d, a) == getattr(f, a)) for f in found] for d in wanted]
        )
        for i, j in zip(*linear_sum_assignment(score, maximize=True)):
            d, f = wanted[i], found[j]
            checks[i] = ShapeCheck(d.colour == f.colour, d.kind == f.kind, d.size == f.size, d.position == f.position)
            matched += 1
    background = detected.background == described.background
    no_extra = matched == len(found)
    correct = background and no_extra and all(c.correct for c in checks)
    return CheckResult(correct, background, tuple(checks), no_extra, detected)


def check(image, caption: str) -> CheckResult:
    """Score one image (square uint8 [H, H, 3], any H) against a world caption."""
    return compare(detect(image), parse_caption(caption))


def caption_accuracy(images: Iterable, captions: Sequence[str]) -> dict[str, float]:
    """Mean of `correct` (key 'correct', alias 'accuracy') and per-attribute means over N images
    (uint8 [N, H, H, 3] or a list of [H, H, 3] arrays / PIL images) and N captions.

    Shape attributes (colour, kind, size, position) are averaged over all described shapes.
    """
    results = [check(img, cap) for img, cap in zip(images, captions, strict=True)]
    if not results:
        raise ValueError("caption_accuracy needs at least one (image, caption) pair")
    shapes = [s for r in results for s in r.shapes]
    correct = float(np.mean([r.correct for r in results]))
    out = {
        "correct": correct,
        "accuracy": correct,  # alias of "correct"
        "background": float(np.mean([r.background for r in results])),
        "no_extra": float(np.mean([r.no_extra for r in results])),
        "n": len(results),
    }
    for attr in ("colour", "kind", "size", "position"):
        out[attr] = float(np.mean([getattr(s, attr) for s in shapes])) if shapes else 0.0
    return out
