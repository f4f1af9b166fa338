"""Caption-by-caption comparison of two world evaluations (e.g. CFG 3 against no guidance).

    python src/eval_paired.py RUN/eval/topp0.3_cfg1_conditional RUN/eval/topp0.3_cfg3_conditional
    python src/eval_paired.py A_seed0 B_seed0 A_seed1 B_seed1        # pairs of folders, pooled

Each folder is an `src/eval_fid.py eval=embedded` output (prompts.jsonl + images/{index:06d}.png).
Every image is checked against its caption by the world's pixel checker (`cm3leon.data.checker`);
two decodings of the same captions then differ only on the captions one gets right and the other
does not. Those discordant counts and the exact McNemar test (a two-sided binomial test of them,
`scipy.stats.binomtest`) say whether a difference in caption accuracy is more than sampling noise,
far more sharply than the two accuracies' standard errors. One JSON line per pair, then the pool.
"""

from __future__ import annotations

import json
import sys
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
    return {"n": len(a), "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()),
            "only_a": only_a, "only_b": only_b, "mcnemar_exact_p": float(p)}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or len(argv) % 2:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    pooled_a: list[bool] = []
    pooled_b: list[bool] = []
    try:
        for folder_a, folder_b in zip(argv[0::2], argv[1::2]):
            caps_a, ok_a = read_correct(folder_a)
            caps_b, ok_b = read_correct(folder_b)
            if caps_a != caps_b:
                raise ValueError(f"{folder_a} and {folder_b} hold different captions: compare evaluations "
                                 "of the same eval.n_captions and world")
            print(json.dumps({"a": folder_a, "b": folder_b, **compare(ok_a, ok_b)}))
            pooled_a += ok_a
            pooled_b += ok_b
    except (FileNotFoundError, ValueError) as e:
        print(f"eval_paired: {e}", file=sys.stderr)
        return 2
    if len(argv) > 2:
        print(json.dumps({"pooled": len(argv) // 2, **compare(pooled_a, pooled_b)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
