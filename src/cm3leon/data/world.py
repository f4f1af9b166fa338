"""The embedded synthetic world: deterministic, compositional image-caption pairs.

A scene is a background colour plus 1 or 2 flat-coloured shapes, each in its own cell of a 3x3 grid.
The caption is generated from the same attributes, so every caption can be checked from pixels
(`cm3leon.data.checker`). Example caption:

    "a large red circle in the top left and a small blue square on the right on a white background"

Shapes are listed in reading order of their cells (top left first), so each scene has exactly one
caption and `parse_caption(caption(scene)) == scene`.

Generation (`generate_world`, `ensure_world`) writes raw shards in the img2dataset layout
(`cm3leon.data.raw_shards`): `OUT/train/NNNNNN.tar`, `OUT/val/NNNNNN.tar`, `OUT/manifest.json`,
built in `OUT.tmp` and renamed into place when complete.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cm3leon.errors import UsageError
from cm3leon.utils import atomic_path

# ---- vocabulary ------------------------------------------------------------------------------
KINDS = ("circle", "square", "triangle")
# Shape colours: far from each other and from every background (min pairwise RGB distance ~95).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (150, 40, 190),
    "cyan": (40, 200, 215),
    "orange": (245, 130, 20),
}
SIZES = ("small", "large")
# Reading order of the 3x3 grid: index = 3 * row + col.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
# How a caption says where a shape is ("a small red circle on the left").
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}  # fmt: skip
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
# Half-extent of a shape in pixels on the 64 px canvas (circle radius, half the square's side,
# half the triangle's base and height). The grid cell is 64/3 ~ 21.3 px, so a large shape (20 px)
# stays inside its cell; small shapes are 13 px across: smaller ones lose their kind under JPEG on
# the gray background (and an 8x8-pixel VQ latent cell would cover most of them).
RADII = {"small": 6.5, "large": 10.0}
CANVAS = 64  # geometry above is defined on this canvas; other sizes scale it
WORLD_VERSION = 2  # bump when rendering, captions or sampling change: older worlds are then regenerated


# ---- scenes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("kind", self.kind, KINDS),
            ("colour", self.colour, tuple(COLOURS)),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"Shape {name}={value!r} is not one of {list(allowed)}")


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene background={self.background!r} is not one of {list(BACKGROUNDS)}")
        object.__setattr__(self, "shapes", tuple(self.shapes))
        cells = [s.position for s in self.shapes]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Scene has two shapes in one cell: {cells}")

    def to_dict(self) -> dict:
        return {"background": self.background, "shapes": [asdict(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Scene":
        return cls(d["background"], tuple(Shape(**s) for s in d["shapes"]))


def _split_id(split: str) -> int:
    # A stable hash (Python's hash() is salted per process, which would break determinism).
    return zlib.crc32(split.encode("utf-8"))


def scene_for(seed: int, split: str, index: int) -> Scene:
    """The scene number `index` of `split`; a pure function of (seed, split, index)."""
    rng = np.random.default_rng([int(seed), _split_id(split), int(index)])
    n_shapes = 1 if rng.random() < 0.5 else 2
    cells = sorted(rng.choice(len(POSITIONS), size=n_shapes, replace=False).tolist())
    colour_names = list(COLOURS)
    shapes = tuple(
        Shape(
            kind=KINDS[rng.integers(len(KINDS))],
            colour=colour_names[rng.integers(len(colour_names))],
            size=SIZES[rng.integers(len(SIZES))],
            position=POSITIONS[c],
        )
        for c in cells
    )
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return Scene(background, shapes)


# ---- rendering -------------------------------------------------------------------------------
def cell_center(position: str, size: int = CANVAS) -> tuple[float, float]:
    """(y, x) centre of a grid cell in pixel coordinates (pixel i covers [i, i+1))."""
    row, col = divmod(POSITIONS.index(position), 3)
    cell = size / 3
    return (row + 0.5) * cell, (col + 0.5) * cell


def shape_sdf(kind: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Signed distance-like function of a shape centred at the origin with half-extent r (<= 0 inside).

    dy points down. Exact for circle and square edges; the triangle (apex up, base down, base and
    height 2r) uses the max of its edge-line distances, exact inside and near its edges.
    """
    if kind == "circle":
        return np.sqrt(dy * dy + dx * dx) - r
    if kind == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) - r
    if kind == "triangle":  # width grows linearly from 0 at the apex (dy=-r) to 2r at the base
        return np.maximum(np.abs(dy) - r, (2 * np.abs(dx) - dy - r) / np.sqrt(5.0))
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


def shape_mask(kind: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean inside-test of a shape centred at the origin with half-extent r."""
    return shape_sdf(kind, dy, dx, r) <= 0


@lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) [size, size] float32: pixel centres at i + 0.5, so shapes land alike at every size."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return ys, xs


def render(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """Draw a scene. Returns uint8 [size, size, 3], flat colours, no antialiasing."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    ys, xs = _pixel_centres(size)
    for s in scene.shapes:
        cy, cx = cell_center(s.position, size)
        r = RADII[s.size] * size / CANVAS
        image[shape_mask(s.kind, ys - cy, xs - cx, r)] = COLOURS[s.colour]
    return image


# ---- captions --------------------------------------------------------------------------------
def _alt(words) -> str:
    # Longest first so "top left" is tried before "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE_TO_POSITION = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}
_SHAPE_RE = re.compile(rf"a ({_alt(SIZES)}) ({_alt(COLOURS)}) ({_alt(KINDS)}) ({_alt(_PHRASE_TO_POSITION)})")
_CAPTION_RE = re.compile(rf"(.+) on a ({_alt(BACKGROUNDS)}) background")


def caption(scene: Scene) -> str:
    """The caption of a scene, e.g. 'a small blue square on the left on a black background'."""
    if not scene.shapes:
        raise ValueError("caption() needs a scene with at least one shape")
    parts = [f"a {s.size} {s.colour} {s.kind} {POSITION_PHRASES[s.position]}" for s in scene.shapes]
    return f"{' and '.join(parts)} on a {scene.background} background"


def parse_caption(text: str) -> Scene:
    """Inverse of `caption`. Raises ValueError naming the text when it does not parse."""
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"caption does not parse (no '... on a <background> background'): {text!r}")
    shapes = []
    for part in m.group(1).split(" and "):
        sm = _SHAPE_RE.fullmatch(part)
        if sm is None:
            raise ValueError(f"caption does not parse (bad shape phrase {part!r}): {text!r}")
        size, colour, kind, phrase = sm.groups()
        shapes.append(Shape(kind, colour, size, _PHRASE_TO_POSITION[phrase]))
    try:
        return Scene(m.group(2), tuple(shapes))
    except ValueError as e:
        raise ValueError(f"caption does not parse ({e}): {text!r}") from None


# ---- generation into raw shards --------------------------------------------------------------
@dataclass(frozen=True)
class WorldConfig:
    """What defines a generated world (conf/make_world.yaml). out_dir/num_workers do not change content."""

    out_dir: str  # the raw folder: {train,val}/NNNNNN.tar + manifest.json (required: the library knows no checkout)
    seed: int = 0
    n_train: int = 20_000
    n_val: int = 1_000
    shard_size: int = 500
    image_size: int = 64
    num_workers: int = 2

    def __post_init__(self) -> None:
        # values come from the command line: `n_train=abc` must stop here, in one line
        for name in ("seed", "n_train", "n_val", "shard_size", "image_size", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{name}={value!r} must be an integer")

    def content(self) -> dict:
        """The fields that determine the generated samples (compared against the manifest)."""
        return {
            "world_version": WORLD_VERSION,
            "seed": self.seed,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "shard_size": self.shard_size,
            "image_size": self.image_size,
        }


def sample_for(seed: int, split: str, index: int, image_size: int = CANVAS) -> dict:
    """One world sample in the raw-shard layout: {'__key__', 'png' (bytes), 'txt', 'json'}."""
    from cm3leon.data.raw_shards import encode_png

    scene = scene_for(seed, split, index)
    key = f"{split}_{index:09d}"
    text = caption(scene)
    meta = {"key": key, "caption": text, "split": split, "index": index, **scene.to_dict()}
    return {"__key__": key, "png": encode_png(render(scene, image_size)), "txt": text, "json": meta}


def _write_world_shard(job: tuple) -> str:
    """Worker: write one shard of the world. job = (path, seed, split, start, stop, image_size)."""
    from cm3leon.data.raw_shards import write_shard

    path, seed, split, start, stop, image_size = job
    write_shard(path, (sample_for(seed, split, i, image_size) for i in range(start, stop)))
    return path


def _read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def world_is_complete(cfg: WorldConfig) -> bool:
    """True when out_dir holds a manifest matching cfg and every shard it lists."""
    out_dir = Path(cfg.out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None or manifest.get("content") != cfg.content():
        return False
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    return all((out_dir / s).is_file() for s in shards)


def _check_out_dir(out_dir: Path, cfg: WorldConfig, overwrite: bool) -> None:
    """Refuse (one line) to replace what is in `out_dir` unless it is this world (complete or
    partial) or, with `overwrite`, another world. A folder that is not a world is never replaced."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    manifest = _read_manifest(out_dir)
    if manifest is None or "content" not in manifest:
        # the leftovers of an interrupted run of an older version: split folders of shards, no manifest
        if {p.name for p in out_dir.iterdir()} <= {"train", "val", "manifest.json.tmp"}:
            return
        raise UsageError(
            f"out_dir={out_dir} is not empty and holds no world manifest.json (it was not made by make_world): "
            "choose a new or empty folder"
        )
    if manifest["content"] != cfg.content() and not overwrite:
        differs = sorted(k for k, v in cfg.content().items() if manifest["content"].get(k) != v)
        raise UsageError(
            f"out_dir={out_dir} holds another world (differs in {', '.join(differs)}): "
            "pass overwrite=true to replace it, or choose another out_dir"
        )


def generate_world(cfg: WorldConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the world's raw shards and manifest into cfg.out_dir; returns the manifest.

    `out_dir` may be missing, empty, or hold this world (complete or partial: made again); another
    world there is replaced only with `overwrite`; a folder that is not a world, never. The world is
    written in `out_dir.tmp` (shards in parallel, one task per shard, `cfg.num_workers` processes)
    and renamed into place when complete, so an interrupted run leaves the old folder whole.
    """
    # Imported here, before the workers fork, so they share it (webdataset imports torch: slow).
    import cm3leon.data.raw_shards  # noqa: F401

    if cfg.shard_size <= 0 or cfg.n_train < 0 or cfg.n_val < 0:
        raise UsageError(f"bad world config {cfg}: shard_size must be > 0 and counts >= 0")
    out_dir = Path(cfg.out_dir)
    _check_out_dir(out_dir, cfg, overwrite)
    t0 = time.time()
    with atomic_path(out_dir) as tmp:
        jobs, splits = [], {}
        for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
            (tmp / split).mkdir(parents=True)
            names = []
            for shard, start in enumerate(range(0, n, cfg.shard_size)):
                stop = min(start + cfg.shard_size, n)
                names.append(f"{split}/{shard:06d}.tar")
                jobs.append((str(tmp / names[-1]), cfg.seed, split, start, stop, cfg.image_size))
            splits[split] = {"count": n, "shards": names}
        bar = tqdm(total=len(jobs), desc="world", unit="shard", disable=not progress or not jobs)
        if cfg.num_workers > 1 and len(jobs) > 1:
            # spawn, not fork: a process that already runs threads (torch, tqdm's monitor, a test
            # session) can deadlock a forked worker on a lock held at fork time (seen once in CI)
            with get_context("spawn").Pool(min(cfg.num_workers, len(jobs))) as pool:
                for _ in pool.imap_unordered(_write_world_shard, jobs):
                    bar.update()
        else:
            for job in jobs:
                _write_world_shard(job)
                bar.update()
        bar.close()
        manifest = {
            "content": cfg.content(),
            "splits": splits,
            "counts": {k: v["count"] for k, v in splits.items()},
            "config": asdict(cfg),
            "elapsed_s": round(time.time() - t0, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def world_config(cfg: Mapping | WorldConfig | None = None, **overrides) -> WorldConfig:
    """A WorldConfig from a Hydra/dict config (unknown keys such as `paths` are ignored) and overrides."""
    if isinstance(cfg, WorldConfig):
        values = asdict(cfg)
    else:  # read only our keys: other interpolations (e.g. hydra:runtime) may not resolve here
        cfg = cfg or {}
        values = {k: cfg[k] for k in WorldConfig.__dataclass_fields__ if k in cfg}
    values.update(overrides)
    if not values.get("out_dir"):
        raise UsageError(
            "the embedded world's out_dir is not set: pass out_dir=FOLDER (the configs give ${paths.world_dir}/raw)"
        )
    return WorldConfig(**values)


def ensure_world(cfg: Mapping | WorldConfig | None = None, **overrides) -> Path:
    """Generate the world on first use (prints one line when it does); returns its raw folder.

    Other scripts call this before reading the world: `ensure_world(cfg.world)` or
    `ensure_world(out_dir=..., n_train=...)`. A complete world matching the config returns at once.
    """
    wcfg = world_config(cfg, **overrides)
    out_dir = Path(wcfg.out_dir)
    if not world_is_complete(wcfg):
        print(
            f"[world] generating the embedded world ({wcfg.n_train} train + {wcfg.n_val} val pairs, "
            f"seed {wcfg.seed}) into {out_dir}",
            flush=True,
        )
        generate_world(wcfg, overwrite=True)  # the embedded world is the project's own: it follows its config
    return out_dir
