"""Evaluation prompts: the caption sets (MS-COCO, the embedded world), the `prompts.jsonl` record
and where each prompt's files go: its image `images/{index:06d}.png` and, when every sample is kept
(`keep_samples`), `samples/{index:06d}_{j:02d}.png` (j: generation order) + `samples/{index:06d}.json`.

Kept apart from `cm3leon.eval.generation` (which builds on Lightning) so that tools that only read an
evaluation folder (`src/eval_paired.py`) import in a second.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Prompt:
    """One evaluation caption; `reference` is the real image's file (COCO) when there is one."""

    index: int
    caption: str
    reference: str | None = None


def image_path(images_dir: str | Path, index: int) -> Path:
    return Path(images_dir) / f"{index:06d}.png"


def samples_dir_of(images_dir: str | Path) -> Path:
    """Where the kept samples go: `samples/` beside `images/` (both in the evaluation's out_dir)."""
    return Path(images_dir).parent / "samples"


def sample_path(samples_dir: str | Path, index: int, j: int) -> Path:
    """Sample j (generation order) of prompt `index`."""
    return Path(samples_dir) / f"{index:06d}_{j:02d}.png"


def sample_record_path(samples_dir: str | Path, index: int) -> Path:
    """{"index", "caption", "clip_scores", "best"} of prompt `index`: written last (its completion mark)."""
    return Path(samples_dir) / f"{index:06d}.json"


def prompt_done(images_dir: str | Path, index: int, require_samples: bool = False) -> bool:
    """The prompt's best image is on disk (and, with `require_samples`, its samples record)."""
    if not image_path(images_dir, index).is_file():
        return False
    return not require_samples or sample_record_path(samples_dir_of(images_dir), index).is_file()


def pending_prompts(prompts: Sequence[Prompt], images_dir: str | Path, require_samples: bool = False) -> list[Prompt]:
    """The prompts not done yet (`prompt_done`): a folder made without kept samples and resumed with
    them regenerates every prompt that lacks its samples record."""
    return [p for p in prompts if not prompt_done(images_dir, p.index, require_samples)]


def write_prompts(prompts: Sequence[Prompt], path: str | Path) -> None:
    """prompts.jsonl: one {"index", "caption", "reference"} per line (the record of what was asked).
    Atomic (temp file + rename): every rank of a multi-device run writes the same file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(asdict(p)) + "\n" for p in prompts))
    os.replace(tmp, path)


# =============================================================================================
# Prompt sets
# =============================================================================================
def coco_prompts(
    captions_json: str | Path, n: int, seed: int = 0, images_dir: str | Path | None = None
) -> list[Prompt]:
    """n distinct MS-COCO images sampled with `seed` (numpy default_rng), one of each image's captions
    chosen with the same generator; prompts in sampling order, index 0..n-1.

    captions_json: the COCO `captions_*.json` (images + annotations). images_dir: where the image
    files are (recorded as each prompt's reference)."""
    data = json.loads(Path(captions_json).read_text())
    if "images" not in data or "annotations" not in data:
        raise ValueError(f"{captions_json} is not a COCO captions file (needs 'images' and 'annotations')")
    caps: dict[int, list[tuple[int, str]]] = {}
    for a in data["annotations"]:
        caps.setdefault(int(a["image_id"]), []).append((int(a.get("id", 0)), a["caption"]))
    images = sorted((int(im["id"]), im["file_name"]) for im in data["images"] if int(im["id"]) in caps)
    if n > len(images):
        raise ValueError(f"{captions_json} has {len(images)} captioned images, fewer than n_captions={n}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(images), size=n, replace=False)
    out = []
    for i, j in enumerate(chosen.tolist()):
        image_id, file_name = images[j]
        options = sorted(caps[image_id])  # by annotation id: a fixed order
        text = options[int(rng.integers(len(options)))][1]
        ref = str(Path(images_dir) / file_name) if images_dir is not None else file_name
        out.append(Prompt(i, re.sub(r"\s+", " ", text).strip(), ref))
    return out


def world_prompts(n: int, seed: int = 0, split: str = "val", start: int = 0) -> list[Prompt]:
    """Captions of the embedded world's scenes `start .. start+n-1` of `split` (world seed `seed`)."""
    from cm3leon.data.world import caption, scene_for

    return [Prompt(i - start, caption(scene_for(seed, split, i))) for i in range(start, start + n)]


def world_references(n: int, seed: int = 0, split: str = "val", start: int = 0, size: int = 64) -> np.ndarray:
    """The real pixels of those scenes: uint8 [n, size, size, 3] (rendered, lossless)."""
    from cm3leon.data.world import render, scene_for

    return np.stack([render(scene_for(seed, split, i), size) for i in range(start, start + n)])
