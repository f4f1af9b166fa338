"""Bring your own instruction data: JSONL/CSV rows -> SFT samples with their images.

One file per (source, split); each row is one sample of the source's task. Columns (JSONL keys):

    edit      source_image, instruction, target_image        (InstructPix2Pix-style triples)
    control   control_image, kind, caption, image             (kind: one of CONTROL_KINDS)
    grounded  caption, objects, image                          (objects: [{name, box: [x1, y1, x2, y2]}])
    vqa       image, question, answer
    caption   image, caption
    text      text, image

plus an optional `template` (one of the task's templates in `sft_templates.TEMPLATES`, e.g.
`caption_describe` or `vqa_short`; default: the task's paper template). Image paths are relative
to the file's folder (or absolute). In a CSV, `objects` is a JSON string. A number in a text
field (an answer "2") is read as its text.

Grounded boxes (`box_units`): `pixels` (default) are corners in the original image's pixels; they
are mapped to the 256 grid through the same short-side resize and centre crop the image gets
(`image_processing.resize_center_crop`) and clipped to it; an object cropped away entirely is
dropped (a row left without objects is skipped as bad_field). `grid`: corners already on the
256 grid of the cropped square.

A row that cannot become a sample is skipped and counted by reason (`SFT_SKIP_REASONS`), never
guessed at: bad_row (a JSONL line that is not an object), missing_field (a required field absent
or empty), bad_field (a field of the wrong kind: not text, unknown template or control kind,
malformed boxes), missing_image (no file at the path), bad_image / unsupported_mode / small_image
(the raw-sample decoder's reasons, `checked_reader`), over_length (the sequence does not fit
seq_len: counted where the sequence is built, `sft_shards`). Images are read by the one decoder
(`checked_reader.decode_image`) and encoded by preprocessing's tokenizers.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cm3leon.data.checked_reader import SkippedSample, decode_caption, decode_image, open_text_table
from cm3leon.data.sft_templates import CONTROL_KINDS, GROUNDING_GRID, TASK_OF, SftSample
from cm3leon.errors import UsageError

SFT_SKIP_REASONS = (
    "bad_row",
    "missing_field",
    "bad_field",
    "missing_image",
    "bad_image",
    "unsupported_mode",
    "small_image",
    "over_length",
)
# Per task: image slot -> column, template text field -> column.
TASK_COLUMNS: dict[str, dict[str, dict[str, str]]] = {
    "edit": {"images": {"image1": "source_image", "image2": "target_image"}, "text": {"instruction": "instruction"}},
    "control": {
        "images": {"control image": "control_image", "image": "image"},
        "text": {"kind": "kind", "caption": "caption"},
    },
    "grounded": {"images": {"image": "image"}, "text": {"caption": "caption"}},
    "vqa": {"images": {"image": "image"}, "text": {"q": "question", "a": "answer"}},
    "caption": {"images": {"image": "image"}, "text": {"caption": "caption"}},
    "text": {"images": {"image": "image"}, "text": {"text": "text"}},
}
DEFAULT_TEMPLATE = {
    "edit": "edit",
    "control": "control",
    "grounded": "grounded",
    "vqa": "vqa",
    "caption": "caption",
    "text": "text",
}
BOX_UNITS = ("pixels", "grid")


class RowSkipped(Exception):
    """A row that is skipped; `reason` is one of SFT_SKIP_REASONS."""

    def __init__(self, reason: str):
        assert reason in SFT_SKIP_REASONS, reason
        super().__init__(reason)
        self.reason = reason


@dataclass
class FileItem:
    """One good row: the sample (text fields, template, boxes) and its images by slot (RGB PIL)."""

    sample: SftSample
    images: dict[str, Image.Image]


def required_columns(task: str) -> list[str]:
    cols = TASK_COLUMNS[task]
    return [*cols["images"].values(), *cols["text"].values(), *(["objects"] if task == "grounded" else [])]


def read_table(path: str | os.PathLike, task: str) -> list[dict]:
    """Every row of a .jsonl or .csv file (no image is opened): dicts of the file's columns, or
    {'__error__': why} for a JSONL line that is not an object. Raises a one-line UsageError for a
    missing file, another suffix, an unknown task, or a required column that no row has."""
    if task not in TASK_COLUMNS:
        raise UsageError(f"SFT source task {task!r} is not one of {list(TASK_COLUMNS)}")
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"SFT file {path} not found: give a .jsonl or .csv file (cm3leon/data/sft_files.py)")
    suffix = path.suffix.lower()
    rows: list[dict] = []
    with open_text_table(path) as f:  # a row that is not UTF-8 is skipped, not the file
        if suffix == ".csv":
            rows = [dict(r) for r in csv.DictReader(f)]
        elif suffix in (".jsonl", ".json"):
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    row = {"__error__": f"line {line_no}: {e}"}
                rows.append(row if isinstance(row, dict) else {"__error__": f"line {line_no}: not an object"})
        else:
            raise UsageError(f"SFT file {path} is neither .jsonl nor .csv")
    found = {k for r in rows for k in r}
    missing = [c for c in required_columns(task) if c not in found]
    if rows and missing:
        raise UsageError(
            f"SFT file {path} ({task}) has no column(s) {missing} in any row; found {sorted(found - {'__error__'})} "
            f"(needed: {required_columns(task)})"
        )
    return rows


def image_path(row: dict, column: str, base: Path) -> Path | None:
    """The image file a row names in `column` (relative to `base`), None when the field is empty."""
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        return None
    return Path(value) if os.path.isabs(value) else base / value


def _text(row: dict, column: str) -> str:
    """A text field under the caption policy (strict UTF-8, stripped, non-empty)."""
    value = row.get(column)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    try:
        return decode_caption(value)
    except SkippedSample as e:
        raise RowSkipped("bad_field" if e.reason == "bad_caption" else "missing_field") from None


def _image(row: dict, column: str, base: Path, min_side: int) -> Image.Image:
    path = image_path(row, column, base)
    if path is None:
        raise RowSkipped("missing_field")
    if not path.is_file():
        raise RowSkipped("missing_image")
    try:
        image = decode_image(path.read_bytes())
    except SkippedSample as e:
        raise RowSkipped(e.reason) from None
    if min(image.size) < min_side:
        raise RowSkipped("small_image")
    return image


def box_to_grid(box, size: tuple[int, int], units: str) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) on the 256 grid of the resized, centre-cropped square; None when the box
    is cropped away. `size` = the original image's (width, height); see the module docstring."""
    if units == "grid":
        return tuple(round(v) for v in box)
    w, h = size
    scale = GROUNDING_GRID / min(w, h)
    left, top = (w * scale - GROUNDING_GRID) / 2, (h * scale - GROUNDING_GRID) / 2
    x1, x2 = (min(max(round(x * scale - left), 0), GROUNDING_GRID) for x in (box[0], box[2]))
    y1, y2 = (min(max(round(y * scale - top), 0), GROUNDING_GRID) for y in (box[1], box[3]))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _objects(row: dict, size: tuple[int, int], units: str) -> tuple[tuple[str, tuple], ...]:
    """The grounded objects of a row, boxes on the 256 grid (see box_to_grid)."""
    objects = row.get("objects")
    if objects is None or objects == "":
        raise RowSkipped("missing_field")
    if isinstance(objects, str):  # a CSV cell
        try:
            objects = json.loads(objects)
        except ValueError:
            raise RowSkipped("bad_field") from None
    if not isinstance(objects, list) or not objects:
        raise RowSkipped("bad_field")
    out = []
    for obj in objects:
        box = obj.get("box") if isinstance(obj, dict) else None
        name = obj.get("name") if isinstance(obj, dict) else None
        if not isinstance(name, str) or not name.strip() or not isinstance(box, list) or len(box) != 4:
            raise RowSkipped("bad_field")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise RowSkipped("bad_field")
        if box[2] <= box[0] or box[3] <= box[1] or min(box) < 0:
            raise RowSkipped("bad_field")
        if units == "grid" and max(box) > GROUNDING_GRID:
            raise RowSkipped("bad_field")
        grid = box_to_grid(box, size, units)
        if grid is not None:
            out.append((name.strip(), grid))
    if not out:
        raise RowSkipped("bad_field")  # every object was cropped away: the image shows none of them
    return tuple(out)


def parse_row(row: dict, task: str, base: Path, key: str, min_side: int = 1, box_units: str = "pixels") -> FileItem:
    """One row -> FileItem, or RowSkipped(reason). Text fields are checked before images are read."""
    if "__error__" in row:
        raise RowSkipped("bad_row")
    cols = TASK_COLUMNS[task]
    template = row.get("template") or DEFAULT_TEMPLATE[task]
    if not isinstance(template, str) or TASK_OF.get(template) != task:
        raise RowSkipped("bad_field")
    fields = {name: _text(row, column) for name, column in cols["text"].items()}
    if task == "control" and fields["kind"] not in CONTROL_KINDS:
        raise RowSkipped("bad_field")
    images = {slot: _image(row, column, base, min_side) for slot, column in cols["images"].items()}
    objects = _objects(row, images["image"].size, box_units) if task == "grounded" else ()
    return FileItem(SftSample(template, fields, objects, key=key), images)
