"""Caption-by-caption comparison of two world evaluations (the logic of `src/eval_paired.py`): the
pixel checker's outcome per caption, the discordant counts and the exact McNemar p.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_correct(folder: str | Path) -> tuple[list[str], list[bool]]:
    """(captions, correct per caption) of one eval_fid output folder, in prompt order."""
    from PIL import Image

    from cm3leon.data.checker import check
    from cm3leon.eval.prompts import image_path

    folder = Path(folder)
    prompts_file = folder / "prompts.jsonl"
    if not prompts_file.is_file():
        raise FileNotFoundError(f"{prompts_file}: missing (pass folders written by src/eval_fid.py eval=embedded)")
    prompts = [json.loads(line) for line in prompts_file.read_text().splitlines() if line.strip()]
    captions, correct = [], []
    for p in prompts:
        path = image_path(folder / "images", p["index"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing image (rerun src/eval_fid.py with out_dir={folder} to finish it)")
        image = np.asarray(Image.open(path).convert("RGB"))
        captions.append(p["caption"])
        correct.append(bool(check(image, p["caption"]).correct))
    return captions, correct


def compare(correct_a: list[bool], correct_b: list[bool]) -> dict:
    """Accuracies, discordant counts and the exact two-sided McNemar p of paired outcomes."""
    from scipy.stats import binomtest

    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError(f"need the same, non-zero number of outcomes, got {len(correct_a)} and {len(correct_b)}")
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    p = binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {
        "n": len(a),
        "accuracy_a": float(a.mean()),
        "accuracy_b": float(b.mean()),
        "only_a": only_a,
        "only_b": only_b,
        "mcnemar_exact_p": float(p),
    }


def compare_folders(folders: list[str]) -> list[dict]:
    """Pairs of eval folders (A1 B1 A2 B2 ...) -> one comparison per pair, then the pool (when more
    than one pair)."""
    if not folders or len(folders) % 2:
        raise ValueError(f"pass pairs of folders (A B [A2 B2 ...]), got {len(folders)}")
    rows, pooled_a, pooled_b = [], [], []
    for folder_a, folder_b in zip(folders[0::2], folders[1::2]):
        caps_a, ok_a = read_correct(folder_a)
        caps_b, ok_b = read_correct(folder_b)
        if caps_a != caps_b:
            raise ValueError(
                f"{folder_a} and {folder_b} hold different captions: compare evaluations "
                "of the same eval.n_captions and world"
            )
        rows.append({"a": folder_a, "b": folder_b, **compare(ok_a, ok_b)})
        pooled_a += ok_a
        pooled_b += ok_b
    if len(folders) > 2:
        rows.append({"pooled": len(folders) // 2, **compare(pooled_a, pooled_b)})
    return rows
