"""Instruction (SFT) samples from the embedded world, with exact targets.

Every sample is a pure function of (seed, task, split, index) and records the scene its output
must show, so an evaluator can score an edited/generated image with the checker
(`checker.check(image, caption(sample.scene))`), a VQA answer by exact match, and a caption with
`parse_caption(text) == sample.scene`. Tasks and their templates (`cm3leon.data.sft_templates`):

    edit      "edit": recolour, move, resize, add, remove a shape, or change the background;
              image1 = the source scene, image2 = the target scene (`sample.scene`)
    control   "control": kind "canny" (a 1 px outline of every shape, white on black) or "seg"
              (each shape filled with its kind's class colour, SEG_COLOURS, on black) + caption
    grounded  "grounded": caption + every shape as "{colour} {kind}" with its tight pixel box on
              the 256 grid (the 64 px canvas scaled x4; corners, box = pixels x1 <= x < x2)
    vqa       "vqa" / "vqa_short" / "vqa_image_first": questions about colour, kind, size, row
              and column (position, asked per axis so that every answer is one word), count,
              background; the answer is one exact word
    caption   "caption" / "caption_describe": the world's caption

Splits are disjoint in content, not only in index: a scene belongs to "val" when the CRC32 of its
caption is 0 modulo VAL_EVERY, else to "train" (`scene_split`), and a sample's split is the split
of the scene it is asked about (edit: the source scene). Scenes are drawn with the world's own
`scene_for` (same distribution as the pretraining world) and redrawn until one fits the split
and the task.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import count

import numpy as np
from scipy import ndimage

from cm3leon.data.sft_templates import GROUNDING_GRID, SftSample
from cm3leon.data.world import (
    BACKGROUNDS,
    CANVAS,
    COLOURS,
    KINDS,
    POSITION_PHRASES,
    POSITIONS,
    RADII,
    SIZES,
    Scene,
    Shape,
    caption,
    cell_center,
    render,
    scene_for,
    shape_mask,
)

SFT_TASKS = ("edit", "control", "grounded", "vqa", "caption")
SPLITS = ("train", "val")
VAL_EVERY = 10  # ~10% of the scenes are validation scenes
EDIT_OPS = ("recolour", "move", "resize", "add", "remove", "background")
QUESTION_TYPES = ("colour", "kind", "size", "row", "column", "count", "background")
WORLD_CONTROL_KINDS = ("canny", "seg")
VQA_TEMPLATES = ("vqa", "vqa_short", "vqa_image_first")
CAPTION_TEMPLATES = ("caption", "caption_describe")
SEG_COLOURS = {"circle": (255, 0, 0), "square": (0, 255, 0), "triangle": (0, 0, 255)}  # class colours
ROWS = ("top", "middle", "bottom")  # answers of "row" questions, by grid row
COLUMNS = ("left", "center", "right")  # answers of "column" questions, by grid column
NUMBERS = ("zero", "one", "two")

# Instruction phrasings per edit op ({ref}: "the red circle", ...; {new}: the new value;
# {phrase}: "in the top left"; {pos}: "top left"; {shape}: "small red circle").
EDIT_PHRASINGS = {
    "recolour": ("make {ref} {new}", "change the colour of {ref} to {new}", "turn {ref} {new}", "paint {ref} {new}"),
    "move": ("move {ref} to the {pos}", "put {ref} {phrase}", "place {ref} {phrase}"),
    "resize": ("make {ref} {comparative}", "make {ref} {new}", "{verb} {ref}"),
    "add": ("add a {shape} {phrase}", "draw a {shape} {phrase}", "put a {shape} {phrase}"),
    "remove": ("remove {ref}", "delete {ref}", "erase {ref}"),
    "background": ("change the background to {new}", "make the background {new}", "use a {new} background"),
}
# Question phrasings per type ({ref}: a description that does not give the answer away).
QUESTION_PHRASINGS = {
    "colour": ("What colour is {ref}?",),
    "kind": ("What shape is {ref}?",),
    "size": ("What size is {ref}?", "Is {ref} small or large?"),
    "row": ("Is {ref} at the top, in the middle or at the bottom?",),
    "column": ("Is {ref} on the left, in the center or on the right?",),
    "count": ("How many shapes are there?", "How many {kind}s are there?"),
    "background": ("What colour is the background?",),
}
# Attribute sets tried, in order, to describe one shape of a scene uniquely.
_EDIT_REFS = (("colour", "kind"), ("size", "colour", "kind"), ("colour", "kind", "position"))
_VQA_REFS = (
    ("kind",),
    ("colour",),
    ("colour", "kind"),
    ("size", "kind"),
    ("size", "colour", "kind"),
    ("position",),
    ("kind", "position"),
    ("colour", "kind", "position"),
)
_ASKS = {"colour": "colour", "kind": "kind", "size": "size", "row": "position", "column": "position"}


@dataclass(frozen=True)
class WorldSftSample:
    """One SFT sample of the world.

    sft:    what the templates read (template, text fields, grounded boxes, key).
    scene:  the scene the output shows (edit: after the edit; others: the picture).
    source: edit only: the scene before the edit.
    op:     edit only: one of EDIT_OPS.
    question_type, ref: vqa only: one of QUESTION_TYPES, and the attributes {name: value} that
            pick the shape asked about (count: {} or {"kind": ...}); see `answer_question`.
    """

    sft: SftSample
    split: str
    index: int
    scene: Scene
    source: Scene | None = None
    op: str | None = None
    question_type: str | None = None
    ref: tuple[tuple[str, str], ...] = ()

    @property
    def task(self) -> str:
        return self.sft.task

    @property
    def answer(self) -> str:
        """VQA: the exact answer; captioning: the caption."""
        return self.sft.fields["a"] if self.task == "vqa" else self.sft.fields["caption"]


# ---- scenes, splits, pixels ------------------------------------------------------------------
def scene_split(scene: Scene) -> str:
    """'val' for about 1 scene in VAL_EVERY (by the CRC32 of its caption), else 'train'."""
    return "val" if zlib.crc32(caption(scene).encode("utf-8")) % VAL_EVERY == 0 else "train"


def _sorted(scene: Scene) -> Scene:
    # shapes in reading order of their cells, as scene_for and parse_caption have them
    return Scene(scene.background, tuple(sorted(scene.shapes, key=lambda s: POSITIONS.index(s.position))))


@lru_cache(maxsize=4)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres, as world.render
    return ys, xs


def shape_pixels(shape: Shape, size: int = CANVAS) -> np.ndarray:
    """bool [size, size]: the pixels `render` paints for this shape (same geometry)."""
    ys, xs = _pixel_centres(size)
    cy, cx = cell_center(shape.position, size)
    return shape_mask(shape.kind, ys - cy, xs - cx, RADII[shape.size] * size / CANVAS)


@lru_cache(maxsize=1024)  # 378 possible shapes: each box is computed once
def shape_box(shape: Shape, grid: int = GROUNDING_GRID) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the tight box of the shape's pixels on a grid x grid render (corners:
    the box covers pixels x1 <= x < x2, y1 <= y < y2)."""
    rows, cols = np.nonzero(shape_pixels(shape, grid))
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def edge_map(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """uint8 [size, size, 3]: a canny-like map, the 1 px inner outline of every shape, white on black."""
    out = np.zeros((size, size, 3), dtype=np.uint8)
    for s in scene.shapes:
        m = shape_pixels(s, size)
        out[m & ~ndimage.binary_erosion(m)] = 255
    return out


def seg_map(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """uint8 [size, size, 3]: a segmentation map, each shape filled with SEG_COLOURS[kind], on black."""
    out = np.zeros((size, size, 3), dtype=np.uint8)
    for s in scene.shapes:
        out[shape_pixels(s, size)] = SEG_COLOURS[s.kind]
    return out


def sample_images(sample: WorldSftSample, size: int = CANVAS) -> dict[str, np.ndarray]:
    """The sample's image slots (template placeholder names) -> uint8 [size, size, 3]."""
    if sample.task == "edit":
        return {"image1": render(sample.source, size), "image2": render(sample.scene, size)}
    out = {"image": render(sample.scene, size)}
    if sample.task == "control":
        draw = edge_map if sample.sft.fields["kind"] == "canny" else seg_map
        out["control image"] = draw(sample.scene, size)
    return out


# ---- referring to a shape --------------------------------------------------------------------
def _describe(shape: Shape, attrs: Iterable[str]) -> str:
    """'the small red circle in the top left' from the chosen attributes ('object' without kind)."""
    attrs = set(attrs)
    words = ["the"] + [getattr(shape, a) for a in ("size", "colour") if a in attrs]
    words.append(shape.kind if "kind" in attrs else "object")
    if "position" in attrs:
        words.append(POSITION_PHRASES[shape.position])
    return " ".join(words)


def _matches(shape: Shape, ref: Iterable[tuple[str, str]]) -> bool:
    return all(getattr(shape, a) == v for a, v in ref)


def _reference(scene: Scene, shape: Shape, candidates, avoid: str | None = None):
    """The first attribute set (not using `avoid`) that picks `shape` alone: ((attr, value), ...)."""
    for attrs in candidates:
        if avoid in attrs:
            continue
        ref = tuple((a, getattr(shape, a)) for a in attrs)
        if sum(_matches(s, ref) for s in scene.shapes) == 1:
            return ref
    return None


def answer_question(scene: Scene, question_type: str, ref: Iterable[tuple[str, str]]) -> str:
    """The exact answer of a question about `scene` (the one definition, used to make samples and
    to check them against what the checker reads from pixels)."""
    ref = tuple(ref)
    if question_type == "background":
        return scene.background
    if question_type == "count":
        return NUMBERS[sum(_matches(s, ref) for s in scene.shapes)]
    found = [s for s in scene.shapes if _matches(s, ref)]
    if len(found) != 1:
        raise ValueError(f"{ref} picks {len(found)} shapes of {scene}, not one")
    shape = found[0]
    row, col = divmod(POSITIONS.index(shape.position), 3)
    if question_type == "row":
        return ROWS[row]
    if question_type == "column":
        return COLUMNS[col]
    return getattr(shape, question_type)  # colour, kind, size


# ---- tasks -----------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _edit(scene: Scene, op: str, rng: np.random.Generator):
    """(target scene, instruction) of one edit, or None when `op` does not apply to `scene`."""
    shapes = list(scene.shapes)
    empty = [p for p in POSITIONS if p not in {s.position for s in shapes}]
    phrasing = _pick(rng, EDIT_PHRASINGS[op])
    if op in ("add", "remove") and len(shapes) != (1 if op == "add" else 2):
        return None  # the world holds 1 or 2 shapes: add to one, remove from two
    if op == "background":
        new = _pick(rng, [b for b in BACKGROUNDS if b != scene.background])
        return Scene(new, scene.shapes), phrasing.format(new=new)
    if op == "add":
        s = Shape(_pick(rng, KINDS), _pick(rng, list(COLOURS)), _pick(rng, SIZES), _pick(rng, empty))
        text = phrasing.format(shape=f"{s.size} {s.colour} {s.kind}", phrase=POSITION_PHRASES[s.position])
        return _sorted(Scene(scene.background, (*shapes, s))), text
    i = int(rng.integers(len(shapes)))
    old = shapes[i]
    ref = _describe(old, dict(_reference(scene, old, _EDIT_REFS)))
    if op == "remove":
        return Scene(scene.background, tuple(shapes[:i] + shapes[i + 1 :])), phrasing.format(ref=ref)
    if op == "recolour":
        new = _pick(rng, [c for c in COLOURS if c != old.colour])
        shapes[i] = replace(old, colour=new)
        text = phrasing.format(ref=ref, new=new)
    elif op == "move":
        new = _pick(rng, empty)
        shapes[i] = replace(old, position=new)
        text = phrasing.format(ref=ref, pos=new, phrase=POSITION_PHRASES[new])
    else:  # resize
        new = "large" if old.size == "small" else "small"
        shapes[i] = replace(old, size=new)
        grow = new == "large"
        text = phrasing.format(
            ref=ref, new=new, comparative="bigger" if grow else "smaller", verb="enlarge" if grow else "shrink"
        )
    return _sorted(Scene(scene.background, tuple(shapes))), text


def _vqa(scene: Scene, rng: np.random.Generator):
    """(question, answer, question type, ref) of one question, or None when no unambiguous one."""
    qtype = _pick(rng, QUESTION_TYPES)
    phrasing = _pick(rng, QUESTION_PHRASINGS[qtype])
    if qtype == "background":
        ref, question = (), phrasing
    elif qtype == "count":
        ref = (("kind", _pick(rng, KINDS)),) if "{kind}" in phrasing else ()
        question = phrasing.format(kind=dict(ref).get("kind"))
    else:
        shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
        ref = _reference(scene, shape, _VQA_REFS, avoid=_ASKS[qtype])
        if ref is None:
            return None  # e.g. the row of one of two identical shapes: no description without the answer
        question = phrasing.format(ref=_describe(shape, dict(ref)))
    return question, answer_question(scene, qtype, ref), qtype, ref


def sft_sample(seed: int, task: str, split: str, index: int) -> WorldSftSample:
    """Sample number `index` of `task` in `split`: a pure function of its arguments."""
    if task not in SFT_TASKS or split not in SPLITS:
        raise ValueError(f"sft_sample: task {task!r} / split {split!r} not in {SFT_TASKS} / {SPLITS}")
    rng = np.random.default_rng([int(seed), zlib.crc32(f"sft:{task}:{split}".encode()), int(index)])
    key = f"{task}/{split}/{index:09d}"
    op = _pick(rng, EDIT_OPS) if task == "edit" else None  # ops uniform, then a scene that allows it
    for attempt in count():
        scene = scene_for(seed, f"sft:{task}:{split}:{attempt}", index)
        if scene_split(scene) != split:
            continue
        if task == "edit":
            edited = _edit(scene, op, rng)
            if edited is None:
                continue
            target, instruction = edited
            sft = SftSample("edit", {"instruction": instruction}, key=key)
            return WorldSftSample(sft, split, index, target, source=scene, op=op)
        if task == "vqa":
            asked = _vqa(scene, rng)
            if asked is None:
                continue
            question, answer, qtype, ref = asked
            sft = SftSample(_pick(rng, VQA_TEMPLATES), {"q": question, "a": answer}, key=key)
            return WorldSftSample(sft, split, index, scene, question_type=qtype, ref=ref)
        if task == "control":
            sft = SftSample("control", {"kind": _pick(rng, WORLD_CONTROL_KINDS), "caption": caption(scene)}, key=key)
        elif task == "grounded":
            objects = tuple((f"{s.colour} {s.kind}", shape_box(s)) for s in scene.shapes)
            sft = SftSample("grounded", {"caption": caption(scene)}, objects=objects, key=key)
        else:  # caption
            sft = SftSample(_pick(rng, CAPTION_TEMPLATES), {"caption": caption(scene)}, key=key)
        return WorldSftSample(sft, split, index, scene)
    raise AssertionError("unreachable")


def sft_samples(task: str, split: str, n: int, seed: int = 0, start: int = 0) -> Iterator[WorldSftSample]:
    """Samples start .. start + n - 1 of `task` in `split`."""
    for i in range(start, start + n):
        yield sft_sample(seed, task, split, i)


# ---- trivial baselines -----------------------------------------------------------------------
def copy_source_baseline(sample: WorldSftSample, size: int = CANVAS) -> np.ndarray:
    """Editing baseline: the source image unchanged, uint8 [size, size, 3]."""
    if sample.source is None:
        raise ValueError(f"copy_source_baseline: {sample.sft.name} is not an edit sample")
    return render(sample.source, size)


def vqa_majority(samples: Iterable[WorldSftSample]) -> dict[str, str]:
    """Question type -> its most common answer over `samples` (the training split; ties: first
    in alphabetical order)."""
    counts: dict[str, Counter] = {}
    for s in samples:
        counts.setdefault(s.question_type, Counter())[s.answer] += 1
    return {q: min(c, key=lambda a: (-c[a], a)) for q, c in counts.items()}


def vqa_majority_baseline(sample: WorldSftSample, majority: dict[str, str]) -> str:
    """VQA baseline: the majority answer of the sample's question type."""
    return majority[sample.question_type]
