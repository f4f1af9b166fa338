"""SFT evaluation on held-out world samples (issue 18), the logic of `src/eval_sft.py`.

    evaluate(cfg)                     one checkpoint: every task on N samples -> <out_dir>/sft_eval.json
    compare(base_dir, sft_dir, ...)   two evaluations, caption by caption -> sft.png / .json / .md

Each task is scored on `sft_samples(task, split, n, world_seed, start)` (validation scenes, never
trained on), prompted with the SFT templates and decoded by `cm3leon.generation.sft` (the
functions `src/generate.py` calls):

    edit      correct = check(edited image, caption(target scene)).correct (the pixel checker)
    control   correct = check(image, caption(scene)).correct
    grounded  correct = the same AND every object's box respected (`boxes_respected`)
    vqa       correct = clean_answer(answer) == the exact answer
    caption   correct = parse_caption(text) is the image's scene (same background and shapes)

Trivial baselines, scored per sample beside the model: edit copies the source image (0 by
construction: every world edit changes the scene), VQA answers the most common training answer
of the question's type (`vqa_majority` over `baselines.vqa_train_n` training samples).

Outputs under out_dir (default `<log_dir>/eval_sft/<checkpoint sha256[:12]>-<settings hash[:10]>`):

    settings.json                 what the outputs are made with; a folder of other settings is refused
    <task>/outcomes.jsonl         one line per sample: index, key, correct, what was made, baseline
    <task>/images/<index>.png     the generated images (edit, control, grounded)
    sft_eval.json, sft_eval.md    accuracies (± standard error), baselines, details, elapsed per task;
                                  edit: how many token positions source and target share (`edit_token_overlap`)

Resumable: samples with an outcome line are kept, images on disk are scored without being
generated again; a larger n adds samples. Generation is batched, `max_rows` rows per forward
(a sample carries 3 streams when editing, 2 with CFG, 1 for text).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cm3leon.data.sft_world import SFT_TASKS, SPLITS
from cm3leon.errors import UsageError
from cm3leon.eval.evaluate import claim_out_dir
from cm3leon.eval.generation import save_png_atomic

IMAGE_TASKS = ("edit", "control", "grounded")
TEXT_TASKS = ("vqa", "caption")
OUTCOMES = "outcomes.jsonl"
RESULT = "sft_eval.json"
BOX_IOU = 0.5  # a box is respected when the drawn object's tight box overlaps it at least this much
COMPARE_COLUMNS = ("task", "base", "sft", "baseline", "n", "p_sft_vs_base", "p_sft_vs_baseline")


# ---- scoring ---------------------------------------------------------------------------------
def _palette():
    from cm3leon.data.world import BACKGROUNDS, COLOURS

    names = list(COLOURS) + list(BACKGROUNDS)
    return names, np.array([COLOURS.get(n, BACKGROUNDS.get(n)) for n in names], np.float32)


def colour_blobs(image, colour: str) -> tuple[np.ndarray, int]:
    """Connected blobs of the pixels confidently of `colour` (nearest palette colour within the
    checker's CONFIDENT_DIST) on the 64 px canvas -> (labels int [64, 64], number of blobs)."""
    from scipy import ndimage

    from cm3leon.data.checker import CONFIDENT_DIST, to_canvas

    names, palette = _palette()
    img = to_canvas(image).astype(np.float32)
    d2 = ((img[:, :, None, :] - palette[None, None]) ** 2).sum(-1)  # [64, 64, P]
    label = d2.argmin(-1)
    mask = (label == names.index(colour)) & (np.sqrt(d2.min(-1)) <= CONFIDENT_DIST)
    return ndimage.label(mask)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (x1, y1, x2, y2)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def drawn_box(image, name: str, box: Sequence[int]) -> tuple[int, int, int, int] | None:
    """Where the object `name` ("{colour} {kind}") is drawn near `box` (256 grid): the tight box, on
    the 256 grid, of its colour's blobs whose centre lies inside `box`; None when there are none."""
    from cm3leon.data.sft_templates import GROUNDING_GRID
    from cm3leon.data.world import CANVAS, COLOURS

    colour = name.split()[0]
    if colour not in COLOURS:
        return None
    blobs, n = colour_blobs(image, colour)
    scale = GROUNDING_GRID / CANVAS
    x1, y1, x2, y2 = box
    keep = np.zeros(n + 1, bool)
    for i in range(1, n + 1):
        ys, xs = np.nonzero(blobs == i)
        cy, cx = (ys.mean() + 0.5) * scale, (xs.mean() + 0.5) * scale
        keep[i] = x1 <= cx < x2 and y1 <= cy < y2
    ys, xs = np.nonzero(keep[blobs])
    if len(ys) == 0:
        return None
    to_grid = lambda v: round(float(v) * scale)  # noqa: E731
    return to_grid(xs.min()), to_grid(ys.min()), to_grid(xs.max() + 1), to_grid(ys.max() + 1)


def boxes_respected(image, objects) -> list[bool]:
    """Per grounded object (name, (x1, y1, x2, y2) on the 256 grid): is it drawn in its box, i.e.
    a blob of its colour centred in the box whose tight box has IoU >= BOX_IOU with it? (The kind is
    the caption check's; this is the geometry.) Read on the 64 px canvas, so to 4 grid units: a
    render of the scene passes with IoU > 0.9; VQGAN reconstructions of 200 val scenes pass 99.5%,
    the boxes of another scene 1%."""
    out = []
    for name, box in objects:
        drawn = drawn_box(image, name, box)
        out.append(drawn is not None and box_iou(drawn, box) >= BOX_IOU)
    return out


def same_scene(a, b) -> bool:
    """Same background and the same shapes, in any order."""
    key = lambda s: (s.position, s.kind, s.colour, s.size)  # noqa: E731
    return a.background == b.background and sorted(a.shapes, key=key) == sorted(b.shapes, key=key)


def score_image(sample, image: np.ndarray) -> dict:
    """Outcome of an image task (edit, control, grounded) on uint8 [H, W, 3]."""
    from cm3leon.data.checker import check
    from cm3leon.data.sft_world import copy_source_baseline
    from cm3leon.data.world import caption

    target = caption(sample.scene)
    res = check(image, target)
    row = {"target": target, "detected": res.detected.to_dict(), "caption_correct": bool(res.correct)}
    if sample.task == "edit":
        row.update(op=sample.op, instruction=sample.sft.fields["instruction"], source=caption(sample.source))
        row["baseline_correct"] = bool(check(copy_source_baseline(sample), target).correct)
    if sample.task == "control":
        row["kind"] = sample.sft.fields["kind"]
    if sample.task == "grounded":
        boxes = boxes_respected(image, sample.sft.objects)
        row.update(boxes=boxes, boxes_correct=all(boxes))
    row["correct"] = bool(res.correct and row.get("boxes_correct", True))
    return row


def edit_token_overlap(image_tokenizer, samples, batch: int = 256) -> dict:
    """How much of an edit can be copied in token space: the fraction of image token positions
    where the source and the target image get the same code, averaged over the edit samples ->
    {"mean": float, "by_op": {op: float}}. A tokenizer with local codes keeps most of an edit's
    positions; the world VQGAN (self-attention in its encoder) keeps few (README, "Instruction tuning")."""
    from cm3leon.data.sft_world import sample_images

    same: list[float] = []
    for c in range(0, len(samples), batch):
        chunk = samples[c : c + batch]
        pairs = [sample_images(s) for s in chunk]
        codes = image_tokenizer.encode([p["image1"] for p in pairs] + [p["image2"] for p in pairs])
        src, tgt = codes[: len(chunk)], codes[len(chunk) :]  # [B, h*w] each
        same += (src == tgt).float().mean(1).tolist()
    by: dict = defaultdict(list)
    for s, f in zip(samples, same):
        by[s.op].append(f)
    return {"mean": float(np.mean(same)), "by_op": {op: float(np.mean(v)) for op, v in sorted(by.items())}}


def score_text(sample, text: str, majority: dict[str, str] | None = None) -> dict:
    """Outcome of a text task (vqa, caption) on the cleaned answer."""
    from cm3leon.data.sft_world import vqa_majority_baseline
    from cm3leon.data.world import parse_caption

    row = {"template": sample.sft.template, "prediction": text, "answer": sample.answer}
    if sample.task == "vqa":
        row.update(question=sample.sft.fields["q"], question_type=sample.question_type, correct=text == sample.answer)
        if majority is not None:
            guess = vqa_majority_baseline(sample, majority)
            row.update(baseline_prediction=guess, baseline_correct=guess == sample.answer)
        return row
    try:
        row["parsed"] = True
        row["correct"] = same_scene(parse_caption(text), sample.scene)
    except ValueError:
        row.update(parsed=False, correct=False)
    return row


# ---- settings and folders --------------------------------------------------------------------
def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def check_tasks(tasks) -> list[str]:
    tasks = [str(t) for t in (tasks or [])]
    bad = [t for t in tasks if t not in SFT_TASKS]
    if not tasks or bad:
        raise UsageError(f"tasks={tasks}: each task is one of {list(SFT_TASKS)} (at least one)")
    return tasks


def decodings(cfg: DictConfig) -> dict:
    """{image, edit}: DecodingConfig of control/grounded (CFG) and of editing (instruct-CFG weights)."""
    import dataclasses

    from cm3leon.generation.sampling import DecodingConfig

    try:
        image = DecodingConfig.from_dict(_container(cfg.decoding))
    except ValueError as e:
        raise UsageError(str(e)) from None
    edit = dataclasses.replace(
        image, image_weight=float(cfg.edit.image_weight), text_weight=float(cfg.edit.text_weight)
    )
    return {"image": image, "edit": edit}


def settings_of(cfg: DictConfig) -> dict:
    """Everything that determines the outcomes (n, tasks and batch sizes do not)."""
    dec = decodings(cfg)
    return {
        "world_seed": int(cfg.world_seed),
        "split": str(cfg.split),
        "seed": int(cfg.seed),
        "decoding": dec["image"].to_dict(),
        "edit_weights": {"image": dec["edit"].image_weight, "text": dec["edit"].text_weight},
        "text": _container(cfg.text),
        "vqa_train_n": int(cfg.baselines.vqa_train_n),
        "image_tokenizer": cfg.image_tokenizer,
        "text_tokenizer": cfg.text_tokenizer,
        "retrieval": _container(cfg.retrieval),
    }


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def read_outcomes(path: Path) -> dict[int, dict]:
    """index -> outcome row of an outcomes.jsonl (a torn last line, from a killed run, is dropped)."""
    rows: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[int(row["index"])] = row
    return rows


def _append(path: Path, rows: list[dict]) -> None:
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        if torn:  # a killed run's half line stays alone on its line (read_outcomes drops it)
            f.write("\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def image_file(task_dir: Path, index: int) -> Path:
    return task_dir / "images" / f"{index:06d}.png"


# ---- one checkpoint --------------------------------------------------------------------------
def streams(task: str, image_decoding) -> int:
    """Rows a sample takes in a forward: edit 3 (instruct-CFG), control/grounded 2 with CFG, text 1."""
    if task == "edit":
        return 3
    if task in TEXT_TASKS:
        return 1
    return 2 if image_decoding.needs_uncond else 1


def vqa_majority_of(cfg: DictConfig) -> dict[str, str]:
    from cm3leon.data.sft_world import sft_samples, vqa_majority

    return vqa_majority(sft_samples("vqa", "train", int(cfg.baselines.vqa_train_n), seed=int(cfg.world_seed)))


def _sample_inputs(sample) -> dict:
    """The sample's input images per template slot (its target slot left out)."""
    from cm3leon.data.sft_world import sample_images
    from cm3leon.generation.sft import input_slots

    images = sample_images(sample)
    return {slot: images[slot] for slot in input_slots(sample.sft)}


def run_task(cfg: DictConfig, pipe, task: str, out_dir: Path, majority: dict | None) -> dict:
    """Generate and score the missing samples of one task; returns its summary."""
    from PIL import Image

    from cm3leon.data.sft_world import sft_samples
    from cm3leon.generation.sft import sft_generate
    from cm3leon.tokenizers.image_processing import postprocess

    t0 = time.time()
    task_dir = out_dir / task
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    outcomes_path = task_dir / OUTCOMES
    done = read_outcomes(outcomes_path)
    samples = list(sft_samples(task, str(cfg.split), int(cfg.n), seed=int(cfg.world_seed), start=int(cfg.start)))
    todo = [s for s in samples if s.index not in done]
    dec = decodings(cfg)
    per_forward = max(1, int(cfg.max_rows) // streams(task, dec["image"]))
    generated = reused = 0
    if task in IMAGE_TASKS:
        on_disk = [s for s in todo if image_file(task_dir, s.index).is_file()]
        missing = [s for s in todo if not image_file(task_dir, s.index).is_file()]
        rows = [{"index": s.index, "key": s.sft.key, **_score_saved(s, task_dir)} for s in on_disk]
        _append(outcomes_path, rows)
        reused = len(on_disk)
        for c in range(0, len(missing), per_forward):
            chunk = missing[c : c + per_forward]
            images = sft_generate(
                pipe,
                [s.sft for s in chunk],
                [_sample_inputs(s) for s in chunk],
                decoding=dec["edit" if task == "edit" else "image"],
                seed=int(cfg.seed) + chunk[0].index,  # per batch: resumed after whole batches, the same draws
                batch_size=per_forward,
            )
            pixels = postprocess(images)  # uint8 [B, H, W, 3]
            rows = []
            for s, px in zip(chunk, pixels):
                save_png_atomic(Image.fromarray(px), image_file(task_dir, s.index))  # never half-written
                rows.append(
                    {
                        "index": s.index,
                        "key": s.sft.key,
                        "image": str(image_file(task_dir, s.index).relative_to(out_dir)),
                        **score_image(s, px),
                    }
                )
            _append(outcomes_path, rows)
            generated += len(chunk)
            _progress(cfg, task, len(done) + reused + generated, len(samples), t0)
    else:
        text = cfg.text
        for c in range(0, len(todo), per_forward):
            chunk = todo[c : c + per_forward]
            answers = sft_generate(
                pipe,
                [s.sft for s in chunk],
                [_sample_inputs(s) for s in chunk],
                max_len=int(text.max_len),
                temperature=float(text.temperature),
                top_p=text.top_p,
                seed=int(cfg.seed) + chunk[0].index,
                batch_size=per_forward,
            )
            rows = [{"index": s.index, "key": s.sft.key, **score_text(s, a, majority)} for s, a in zip(chunk, answers)]
            _append(outcomes_path, rows)
            generated += len(chunk)
            _progress(cfg, task, len(done) + generated, len(samples), t0)
    rows_by_index = read_outcomes(outcomes_path)
    rows = [rows_by_index[s.index] for s in samples]
    summary = summarize(task, rows)
    if task == "edit":
        summary["source_target_token_overlap"] = edit_token_overlap(pipe.image_tokenizer, samples)
    summary.update(generated_now=generated, reused=len(samples) - generated, elapsed_s=round(time.time() - t0, 1))
    print(
        f"[eval_sft] {task}: accuracy {summary['accuracy']:.3f} ± {summary['se']:.3f} on {summary['n']} samples "
        f"({generated} generated, {summary['reused']} reused) in {summary['elapsed_s']:.1f} s",
        file=sys.stderr,
    )
    return summary


def _score_saved(sample, task_dir: Path) -> dict:
    from PIL import Image

    px = np.asarray(Image.open(image_file(task_dir, sample.index)).convert("RGB"))
    return {"image": str(image_file(task_dir, sample.index).relative_to(task_dir.parent)), **score_image(sample, px)}


def _progress(cfg: DictConfig, task: str, done: int, total: int, t0: float) -> None:
    if cfg.progress:
        print(f"[eval_sft] {task}: {done}/{total} ({time.time() - t0:.0f} s)", file=sys.stderr)


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _rate(rows: list[dict], key: str) -> float:
    return float(np.mean([bool(r[key]) for r in rows])) if rows else 0.0


def summarize(task: str, rows: list[dict]) -> dict:
    """Accuracy (± standard error), the baseline's and per-group accuracies of one task's outcomes."""
    acc = _rate(rows, "correct")
    out: dict = {"n": len(rows), "accuracy": acc, "se": _se(acc, len(rows))}
    if rows and "baseline_correct" in rows[0]:
        b = _rate(rows, "baseline_correct")
        out.update(baseline_accuracy=b, baseline_se=_se(b, len(rows)))
    group = {"edit": "op", "control": "kind", "vqa": "question_type", "caption": "template"}.get(task)
    if group:
        by: dict = defaultdict(list)
        for r in rows:
            by[r[group]].append(r)
        out[f"accuracy_by_{group}"] = {k: _rate(v, "correct") for k, v in sorted(by.items())}
    if task == "grounded":
        out.update(caption_accuracy=_rate(rows, "caption_correct"), boxes_accuracy=_rate(rows, "boxes_correct"))
    if task == "caption":
        out["parse_rate"] = _rate(rows, "parsed")
    return out


BASELINE_NAMES = {"edit": "copy the source image", "vqa": "majority answer per question type"}
METRIC_NAMES = {
    "edit": "edited image shows the target scene (checker)",
    "control": "image shows the caption (checker)",
    "grounded": "image shows the caption and each box",
    "vqa": "exact match",
    "caption": "caption parses to the scene",
}


def markdown_table(result: dict) -> str:
    lines = [
        f"SFT evaluation of `{result['checkpoint']}` on {result['split']} world samples (world seed {result['world_seed']}):",
        "",
        "| task | metric | accuracy | n | trivial baseline |",
        "|---|---|---|---|---|",
    ]
    for task, s in result["tasks"].items():
        base = "-"
        if "baseline_accuracy" in s:
            base = f"{s['baseline_accuracy']:.3f} ({BASELINE_NAMES[task]})"
        lines.append(f"| {task} | {METRIC_NAMES[task]} | {s['accuracy']:.3f} ± {s['se']:.3f} | {s['n']} | {base} |")
    overlap = result["tasks"].get("edit", {}).get("source_target_token_overlap")
    if overlap:
        by_op = ", ".join(f"{op} {f:.3f}" for op, f in overlap["by_op"].items())
        lines += ["", f"Edit source and target images share {overlap['mean']:.3f} of their token positions ({by_op})."]
    return "\n".join(lines) + "\n"


def evaluate(cfg: DictConfig) -> dict:
    """Score one checkpoint on every task of cfg.tasks; returns (and writes) the sft_eval.json dict."""
    from cm3leon.generation.pipeline import check_checkpoint

    t0 = time.time()
    tasks = check_tasks(cfg.tasks)
    if int(cfg.n) < 1:
        raise UsageError(f"n={cfg.n} must be >= 1")
    if cfg.split not in SPLITS:
        raise UsageError(f"split={cfg.split!r} is not one of {SPLITS}")
    ckpt = check_checkpoint(cfg.ckpt).resolve()
    settings = settings_of(cfg)

    import torch

    from cm3leon.generation.pipeline import load_pipeline, resolve_device
    from cm3leon.utils import file_sha256, write_json_atomic

    torch.set_num_threads(min(torch.get_num_threads(), int(cfg.cpu_threads)))
    ckpt_sha = file_sha256(ckpt)
    out_dir = (
        Path(str(cfg.out_dir))
        if cfg.out_dir
        else Path(str(cfg.paths.log_dir)) / "eval_sft" / f"{ckpt_sha[:12]}-{_hash(settings)[:10]}"
    )
    claim_out_dir(out_dir, settings, ckpt_sha, what="outcomes")
    pipe = load_pipeline(  # with retrieval, the prompts' text retrieves (generation.sft.sft_retrieved)
        ckpt,
        resolve_device(str(cfg.device)),
        str(cfg.precision),
        cfg.image_tokenizer,
        cfg.text_tokenizer,
        settings["retrieval"],
    )
    majority = vqa_majority_of(cfg) if "vqa" in tasks else None
    summaries = {task: run_task(cfg, pipe, task, out_dir, majority) for task in tasks}
    result = {
        "checkpoint": str(ckpt),
        "checkpoint_sha256": ckpt_sha,
        "split": str(cfg.split),
        "world_seed": int(cfg.world_seed),
        "start": int(cfg.start),
        "tasks": summaries,
        "baselines": {**BASELINE_NAMES, **({"vqa_majority": majority} if majority else {})},
        "settings": settings,
        "max_rows": int(cfg.max_rows),
        "out_dir": str(out_dir),
        "elapsed_s": round(time.time() - t0, 1),
    }
    write_json_atomic(out_dir / RESULT, result, indent=1)
    (out_dir / "sft_eval.md").write_text(markdown_table(result))
    print(
        json.dumps(
            {k: result[k] for k in ("checkpoint", "out_dir", "elapsed_s")}
            | {t: round(s["accuracy"], 4) for t, s in summaries.items()}
        )
    )
    return result


# ---- two checkpoints, caption by caption -----------------------------------------------------
def _read_run(folder: Path) -> tuple[dict, dict[str, dict[int, dict]]]:
    """(settings, {task: outcomes by index}) of an eval_sft output folder."""
    settings_path = folder / "settings.json"
    if not settings_path.is_file():
        raise UsageError(
            f"{folder} is not an eval_sft output folder (no settings.json): pass the out_dir of src/eval_sft.py runs"
        )
    tasks = {t: read_outcomes(folder / t / OUTCOMES) for t in SFT_TASKS if (folder / t / OUTCOMES).is_file()}
    return json.loads(settings_path.read_text()), tasks


def compare(
    base_dir: str | Path,
    sft_dir: str | Path,
    out_dir: str | Path,
    alpha: float = 0.01,
    command: str | None = None,
    root: Path | None = None,
) -> dict:
    """Base vs SFT (and SFT vs the trivial baselines) per task, paired on the same samples by the
    exact McNemar test: writes `<out_dir>/sft.png` (accuracy per task, bars ± standard error),
    `sft.json` and `sft.md` (the README's table and verdict) with `cm3leon.figures.report.write`."""
    from cm3leon.figures.report import new_axes, write
    from cm3leon.figures.stats import accuracy_test, verdict

    base_dir, sft_dir, out_dir = Path(base_dir), Path(sft_dir), Path(out_dir)
    base_settings, base = _read_run(base_dir)
    sft_settings, sft = _read_run(sft_dir)
    for key in ("world_seed", "split"):
        if base_settings.get(key) != sft_settings.get(key):
            raise UsageError(f"{base_dir} and {sft_dir} scored other samples ({key} differs): evaluate both alike")
    differ = sorted(
        k
        for k in set(base_settings) | set(sft_settings)
        if k != "checkpoint_sha256" and base_settings.get(k) != sft_settings.get(k)
    )
    if differ:
        print(f"warning: base and SFT evaluations differ in {', '.join(differ)}", file=sys.stderr)
    tasks = [t for t in SFT_TASKS if t in base and t in sft]
    if not tasks:
        raise UsageError(f"{base_dir} and {sft_dir} have no task in common with outcomes")
    rows, tests = [], {}
    for task in tasks:
        common = sorted(set(base[task]) & set(sft[task]))
        if not common:
            raise UsageError(f"task {task}: {base_dir} and {sft_dir} share no sample")
        b = [bool(base[task][i]["correct"]) for i in common]
        s = [bool(sft[task][i]["correct"]) for i in common]
        t_base = accuracy_test(b, s, better="b")
        tests[f"{task}: SFT vs base"] = t_base
        row = {
            "task": task,
            "base": t_base["accuracy_a"],
            "base_se": _se(t_base["accuracy_a"], len(common)),
            "sft": t_base["accuracy_b"],
            "sft_se": _se(t_base["accuracy_b"], len(common)),
            "baseline": None,
            "n": len(common),
            "p_sft_vs_base": t_base["mcnemar_exact_p"],
            "p_sft_vs_baseline": None,
        }
        if "baseline_correct" in sft[task][common[0]]:
            t_triv = accuracy_test([bool(sft[task][i]["baseline_correct"]) for i in common], s, better="b")
            tests[f"{task}: SFT vs {BASELINE_NAMES[task]}"] = t_triv
            row.update(baseline=t_triv["accuracy_a"], p_sft_vs_baseline=t_triv["mcnemar_exact_p"])
        rows.append(row)

    fig, (ax,) = new_axes(1, width=6.4, height=3.6)
    x = np.arange(len(rows))
    for dx, key, label in ((-0.2, "base", "base (zero-shot)"), (0.2, "sft", "SFT")):
        ax.bar(x + dx, [r[key] for r in rows], 0.4, yerr=[r[f"{key}_se"] for r in rows], capsize=3, label=label)
    bx = [i for i, r in enumerate(rows) if r["baseline"] is not None]
    if bx:
        ax.scatter(
            bx, [rows[i]["baseline"] for i in bx], marker="_", s=400, color="black", zorder=3, label="trivial baseline"
        )
    ax.set_xticks(x, [f"{r['task']}\nn={r['n']}" for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (± s.e.)")
    ax.set_title("Instruction tuning on the embedded world: base vs SFT")
    ax.legend(fontsize=8)
    result = {
        "figure": "sft",
        "title": "Instruction tuning (SFT) on the embedded world",
        "claim": (
            "The SFT model beats the zero-shot base model and the trivial baselines on every task it is trained "
            "for (paired exact McNemar tests on the same held-out samples)."
        ),
        "verdict": verdict(list(tests.values()), alpha),
        "alpha": alpha,
        "rows": rows,
        "tests": tests,
        "more_tests": {},
        "settings": {
            "base": str(base_dir),
            "sft": str(sft_dir),
            "base_settings": base_settings,
            "sft_settings": sft_settings,
        },
        "command": command or f"python src/eval_sft.py compare=[{base_dir},{sft_dir}]",
    }
    result = write(result, fig, out_dir, COMPARE_COLUMNS, root)  # paths inside the checkout: relative
    print(result["markdown"])
    return result


def run(cfg: DictConfig) -> dict:
    """The script: compare mode when cfg.compare is set, else evaluate cfg.ckpt."""
    if cfg.get("compare"):
        dirs = [str(d) for d in cfg.compare]
        if len(dirs) != 2:
            raise UsageError(f"compare={dirs}: pass two eval_sft output folders, compare=[BASE_DIR,SFT_DIR]")
        for d in dirs:
            if not Path(d).is_dir():
                raise UsageError(f"compare: {d} not found (pass the out_dir of two src/eval_sft.py runs)")
        return compare(
            dirs[0], dirs[1], Path(str(cfg.compare_dir)), float(cfg.alpha), root=Path(str(cfg.paths.root_dir))
        )
    return evaluate(cfg)


__all__ = [
    "BOX_IOU",
    "boxes_respected",
    "compare",
    "evaluate",
    "run",
    "score_image",
    "score_text",
    "summarize",
]
