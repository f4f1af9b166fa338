"""Zero-shot FID evaluation of a CM3Leon checkpoint (PAPER.md section 6), the logic of
`src/eval_fid.py`: `evaluate(cfg)` takes the composed `conf/eval_fid.yaml`.

Steps: (1) check that everything needed is there (feature-extractor weights, data, checkpoint) and
stop with one line naming what is missing; (2) sample the captions (fixed seed); (3) generate the
missing images, best of N by CLIP score, over all devices with Lightning predict (images already on
disk are kept; `cm3leon.eval.generation`; with `keep_samples` every sample and its CLIP scores go
to `<out_dir>/samples/`); (4) on rank 0 compute the metrics (features of each image set cached by
content hash), draw the captioned grid `<out_dir>/grid.png` (world: ticked or crossed by the pixel
checker) and write `<out_dir>/fid.json`, printing it as one JSON line; (5) log it to W&B
(`cm3leon.eval.wandb_log`; offline under `<out_dir>/wandb` by default).

fid.json records: the metric(s) (coco30k: fid, kid; embedded: fd_tiny_clip, kd_tiny_clip, caption
accuracy), clip_score, n, evaluator + version, feature extractor + weights hash, resize protocol,
reference set + hash, decoding settings (+ samples per caption, re-ranking, retrieval: k, memory
bank, encoder; seed), checkpoint path + sha256; and, when made, `grid` (its path) and `samples_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cm3leon.errors import UsageError
from cm3leon.eval.wandb_log import wandb_mode


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def _check_clip(what: str, node) -> None:
    from cm3leon.retrieval.clip_encoder import check_pretrained

    try:
        check_pretrained(node.model_name, str(node.pretrained) if node.pretrained else None)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"{what}: {e}") from None


def preflight(cfg: DictConfig) -> dict:
    """Fail fast, one line each, before anything heavy: feature-extractor weights, data, checkpoint.
    Returns what was resolved ({'inception_weights': Path} for the Inception metric)."""
    from cm3leon.eval.fid import MissingWeightsError, resolve_inception_weights

    ev = cfg.eval
    out: dict = {}
    if ev.kind not in ("coco", "world"):
        raise UsageError(f"eval.kind={ev.kind!r} is not coco or world")
    try:
        wandb_mode(cfg.wandb.mode)  # W&B is logged last: a bad mode must not wait for the generation
    except ValueError as e:
        raise UsageError(f"wandb.mode: {e}") from None
    if ev.metric == "inception":
        try:
            out["inception_weights"] = resolve_inception_weights(cfg.fid.inception_weights, bool(cfg.fid.download))
        except MissingWeightsError as e:
            raise UsageError(str(e)) from None
    elif ev.metric == "tiny_clip":
        _check_clip("eval.feature_clip", ev.feature_clip)
    else:
        raise UsageError(f"eval.metric={ev.metric!r} is not inception or tiny_clip")
    if ev.kind == "coco":
        for key, hint in (("captions_json", "annotations/captions_val2014.json"), ("images_dir", "val2014/")):
            p = Path(str(ev[key])).expanduser()
            if not (p.is_file() if key == "captions_json" else p.is_dir()):
                raise UsageError(
                    f"MS-COCO {key} {p} not found: download MS-COCO 2014 ({hint}) from "
                    f"https://cocodataset.org and pass eval.root=DIR (or eval.{key}=PATH)"
                )
    if int(ev.samples_per_caption) > 1:
        if not ev.rerank.enabled:
            raise UsageError(f"eval.samples_per_caption={ev.samples_per_caption} needs eval.rerank.enabled=true")
        _check_clip("eval.rerank", ev.rerank)
    _check_clip("eval.clip_score", ev.clip_score)
    from cm3leon.generation.pipeline import check_checkpoint
    from cm3leon.lit.checks import warn_eval_world_clip

    check_checkpoint(cfg.ckpt)
    warn_eval_world_clip(ev)  # the world's tiny CLIP on other prompts: its scores mean nothing
    return out


def prompts_and_reference(cfg: DictConfig):
    """(prompts, reference image source, reference description) for the configured evaluation."""
    from cm3leon.eval.generation import coco_prompts, world_prompts, world_references

    ev = cfg.eval
    if ev.kind == "coco":
        prompts = coco_prompts(ev.captions_json, int(ev.n_captions), int(ev.seed), ev.images_dir)
        if ev.reference == "all":
            return prompts, str(ev.images_dir), f"MS-COCO {Path(str(ev.images_dir)).name} (every image)"
        if ev.reference != "sampled":
            raise UsageError(f"eval.reference={ev.reference!r} is not sampled or all")
        missing = [p.reference for p in prompts if not Path(p.reference).is_file()]
        if missing:
            raise UsageError(
                f"{len(missing)} sampled COCO images are missing from {ev.images_dir} (e.g. {missing[0]}); "
                "point eval.images_dir at the complete val2014 folder"
            )
        desc = f"MS-COCO {Path(str(ev.images_dir)).name}: the {len(prompts)} sampled images (seed {ev.seed})"
        return prompts, [p.reference for p in prompts], desc
    prompts = world_prompts(int(ev.n_captions), int(ev.world_seed), str(ev.split), int(ev.start))
    refs = world_references(int(ev.n_captions), int(ev.world_seed), str(ev.split), int(ev.start), int(ev.resolution))
    desc = (
        f"embedded world (seed {ev.world_seed}) {ev.split} scenes {ev.start}..{int(ev.start) + len(prompts) - 1}, "
        f"rendered at {ev.resolution} px"
    )
    return prompts, refs, desc


def generation_settings(cfg: DictConfig, prompts, ckpt: Path) -> dict:
    """Everything that determines the generated images (hashed into the output folder's name)."""
    from cm3leon.generation.pipeline import checkpoint_meta, retrieval_settings
    from cm3leon.generation.sampling import DecodingConfig

    try:
        decoding = DecodingConfig.from_dict(_container(cfg.decoding)).to_dict()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return {
        "decoding": decoding,
        "samples_per_caption": int(cfg.eval.samples_per_caption),
        "rerank": _container(cfg.eval.rerank) if int(cfg.eval.samples_per_caption) > 1 else {"enabled": False},
        # resolved against the checkpoint: {k, dir} (k 0: none)
        "retrieval": retrieval_settings(_container(cfg.retrieval), checkpoint_meta(ckpt)),
        "seed": int(cfg.seed),
        "image_tokenizer": cfg.image_tokenizer,
        "text_tokenizer": cfg.text_tokenizer,
        "captions_sha256": hashlib.sha256("\n".join(p.caption for p in prompts).encode()).hexdigest(),
    }


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def claim_out_dir(out_dir: Path, settings: dict, ckpt_sha: str, what: str = "images") -> None:
    """Record what the files in out_dir are made with (out_dir/settings.json); refuse a folder made
    with something else (resuming there would mix `what` of two settings). Batch sizes and device
    counts change only which random draws are made, not the distribution, so they may differ between
    resumed runs."""
    record = json.loads(json.dumps({"checkpoint_sha256": ckpt_sha, **settings}))
    path = out_dir / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise UsageError(
                f"{out_dir} holds {what} made with other settings ({', '.join(diff)} differ); "
                "pass another out_dir=DIR or leave out_dir unset"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".settings.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def compute_metrics(cfg: DictConfig, prompts, images_dir: Path, reference, resolved: dict) -> dict:
    """The metrics of the generated images against the reference set (rank 0). Also returns, under
    "clip_score_per_image", each image's CLIP score (float [n], same definition as clip_score)."""
    import numpy as np

    from cm3leon.eval.clip_score import ClipScorer
    from cm3leon.eval.fid import ImageSet, ResizeProtocol, compute_fid
    from cm3leon.eval.frechet import ClipImageSpace, compute_clip_frechet
    from cm3leon.eval.generation import image_path
    from cm3leon.retrieval.clip_encoder import DocumentEncoder

    ev = cfg.eval
    device = cfg.fid.device
    encoders: dict = {}

    def encoder(node) -> DocumentEncoder:  # one model per (name, weights): feature space and CLIP score share it
        key = (str(node.model_name), str(node.pretrained))
        if key not in encoders:
            encoders[key] = DocumentEncoder(key[0], pretrained=key[1], device=device)
        return encoders[key]

    paths = [image_path(images_dir, p.index) for p in prompts]
    resize = ResizeProtocol.from_dict(_container(ev.resize))
    kid = {
        "kid": bool(cfg.fid.kid),
        "kid_subsets": int(cfg.fid.kid_subsets),
        "kid_subset_size": int(cfg.fid.kid_subset_size),
    }
    if ev.metric == "inception":
        out = compute_fid(
            paths,
            reference,
            weights_path=resolved["inception_weights"],
            resize=resize,
            cache_dir=cfg.cache_dir,
            batch_size=int(cfg.fid.batch_size),
            device=device,
            num_workers=int(cfg.fid.num_workers),
            feature_layer=str(cfg.fid.feature_layer),
            **kid,
        )
    else:
        space = ClipImageSpace(encoder=encoder(ev.feature_clip))
        out = compute_clip_frechet(paths, reference, space=space, resize=resize, cache_dir=cfg.cache_dir, **kid)
    generated = ImageSet(paths, what="generated images")
    pils = [generated.pil(i) for i in range(len(generated))]
    captions = [p.caption for p in prompts]
    scorer = ClipScorer(encoder=encoder(ev.clip_score))
    cos = scorer.cosines(pils, captions)  # ClipScorer.__call__'s summary, keeping each image's score
    per_image = 100.0 * np.maximum(cos, 0)
    out.update(clip_score=float(per_image.mean()), clip_cosine=float(cos.mean()), n=len(cos), **scorer.describe())
    out["clip_score_per_image"] = per_image.tolist()
    if ev.caption_accuracy:
        from cm3leon.data.checker import caption_accuracy

        acc = caption_accuracy([np.asarray(im) for im in pils], captions)
        out["caption_accuracy"] = acc.pop("correct")
        out["caption_accuracy_detail"] = {k: v for k, v in acc.items() if k not in ("accuracy", "n")}
    return out


def evaluate(cfg: DictConfig) -> dict:
    """The whole evaluation; returns the fid.json dict (rank 0) or {} (other ranks)."""
    t0 = time.time()
    resolved = preflight(cfg)

    import torch

    from cm3leon.eval.generation import generate_missing, write_prompts
    from cm3leon.utils import file_sha256

    torch.set_num_threads(min(torch.get_num_threads(), int(cfg.cpu_threads)))
    try:
        prompts, reference, reference_desc = prompts_and_reference(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    ckpt = Path(str(cfg.ckpt)).expanduser().resolve()
    ckpt_sha = file_sha256(ckpt)
    settings = generation_settings(cfg, prompts, ckpt)
    out_dir = (
        Path(cfg.out_dir)
        if cfg.out_dir
        else (Path(cfg.paths.log_dir) / "eval_fid" / cfg.eval.name / f"{ckpt_sha[:12]}-{settings_hash(settings)[:10]}")
    )
    images_dir = out_dir / "images"
    claim_out_dir(out_dir, settings, ckpt_sha)
    write_prompts(prompts, out_dir / "prompts.jsonl")

    module_kwargs = {
        "ckpt_path": ckpt,
        "decoding": settings["decoding"],
        "samples_per_caption": settings["samples_per_caption"],
        "rerank": _container(cfg.eval.rerank),
        "retrieval": settings["retrieval"],
        "seed": int(cfg.seed),
        "max_rows": int(cfg.max_rows),
        "precision": cfg.precision,
        "cuda_graph": bool(cfg.cuda_graph),
        "image_tokenizer": cfg.image_tokenizer,
        "text_tokenizer": cfg.text_tokenizer,
        # not a generation setting: the best image is the same with or without the samples kept
        "keep_samples": bool(cfg.keep_samples),
    }
    trainer_kwargs = {**_container(cfg.trainer), "enable_progress_bar": bool(cfg.progress)}
    try:
        generated_now, trainer = generate_missing(
            module_kwargs, prompts, images_dir, trainer_kwargs, int(cfg.captions_per_batch)
        )
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if trainer is not None and not trainer.is_global_zero:
        return {}
    metrics = compute_metrics(cfg, prompts, images_dir, reference, resolved)
    clip_per_image = metrics.pop("clip_score_per_image")
    resize = metrics.pop("resize")
    ref_hash, gen_hash = metrics.pop("reference_hash"), metrics.pop("generated_hash")
    retrieval = {"k": 0} if not settings["retrieval"]["k"] else settings["retrieval"]
    if retrieval["k"]:  # which memory bank and encoder the documents came from
        manifest = json.loads((Path(retrieval["dir"]) / "manifest.json").read_text())
        retrieval = {**retrieval, "encoder": manifest["encoder"]["model_name"], "bank_size": manifest["index"]["n"]}
    result = {
        "eval": cfg.eval.name,
        **metrics,
        "n": len(prompts),
        "resize": resize["description"],
        "resize_protocol": resize,
        "reference_set": reference_desc,
        "reference_set_hash": ref_hash,
        "generated_set_hash": gen_hash,
        **{
            k: v for k, v in settings.items() if k not in ("image_tokenizer", "text_tokenizer", "retrieval", "decoding")
        },
        # unset decoding options (None: not used by the strategy) are left out: every field is filled
        "decoding": {k: v for k, v in settings["decoding"].items() if v is not None},
        "retrieval": retrieval,
        "captions_per_batch": int(cfg.captions_per_batch),
        "max_rows": int(cfg.max_rows),
        "checkpoint": str(ckpt),
        "checkpoint_sha256": ckpt_sha,
        "images_dir": str(images_dir),
        **({"samples_dir": str(out_dir / "samples")} if cfg.keep_samples else {}),
        "generated_now": generated_now,
        "reused_images": len(prompts) - generated_now,
        "elapsed_s": round(time.time() - t0, 1),
    }
    # the first images for the grid and the W&B table, with the checker's verdict (world captions)
    n_grid = int(cfg.eval.get("grid_images", 0)) if cfg.eval.kind == "world" else 0
    wandb_on = wandb_mode(cfg.wandb.mode) != "disabled"
    n_table = int(cfg.wandb.sample_table) if wandb_on else 0
    pixels, correct = first_images(prompts[: max(n_grid, n_table)], images_dir, check=cfg.eval.kind == "world")
    if n_grid and pixels:
        grid = save_grid_png(pixels[:n_grid], [p.caption for p in prompts[:n_grid]], correct, out_dir / "grid.png")
        result["grid"] = str(grid)
    (out_dir / "fid.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    if wandb_on:
        from cm3leon.eval.wandb_log import log_evaluation

        rows = [
            (pixels[i], p.caption, None if correct is None else correct[i], clip_per_image[i])
            for i, p in enumerate(prompts[:n_table])
        ]
        config = {**settings, "eval": cfg.eval.name, "checkpoint": str(ckpt), "checkpoint_sha256": ckpt_sha}
        log_evaluation(_container(cfg.wandb), out_dir, config, result, grid=result.get("grid"), rows=rows)
    print(summary_line(result, out_dir), file=sys.stderr)  # last: W&B prints its own summary before it
    return result


def summary_line(result: dict, out_dir: Path) -> str:
    """One readable line after the JSON: the headline metrics, n, where the images and grid are."""
    keys = ("caption_accuracy", "fd_tiny_clip", "fid", "kid", "clip_score")
    metrics = ", ".join(f"{k} {result[k]:.4g}" for k in keys if isinstance(result.get(k), int | float))
    grid = f"; grid: {result['grid']}" if result.get("grid") else ""
    return f"[eval_fid] {metrics} on {result['n']} captions -> {out_dir}{grid}"


def first_images(prompts, images_dir: Path, check: bool) -> tuple[list, list[bool] | None]:
    """The prompts' images as uint8 [H, W, 3] arrays and, with `check` (world captions), whether the
    pixel checker finds each caption in its image (None otherwise). caption_accuracy keeps only its
    means, so the few images shown are checked again here."""
    import numpy as np
    from PIL import Image

    from cm3leon.eval.generation import image_path

    pixels = [np.asarray(Image.open(image_path(images_dir, p.index)).convert("RGB")) for p in prompts]
    if not check:
        return pixels, None
    from cm3leon.data.checker import check as check_image

    return pixels, [bool(check_image(im, p.caption).correct) for im, p in zip(pixels, prompts)]


def save_grid_png(pixels: list, captions: list[str], correct: list[bool] | None, path: Path) -> Path:
    """uint8 [H, W, 3] images with their captions (and ticks/crosses) -> one captioned grid PNG."""
    import numpy as np
    import torch

    from cm3leon.generation.grid import save_captioned_grid

    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W] in [-1, 1]
    return save_captioned_grid(images, captions, path, None if correct is None else correct[: len(pixels)])
