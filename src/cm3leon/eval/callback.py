"""`SampleCallback`: the one sampling callback of training. It generates images for held-out
captions (the DataModule's first validation samples, always the same ones), saves a grid, logs it
to every logger with `log_image` (W&B), and computes the metrics asked for.

    callbacks:
      samples:                              # conf/callbacks/default.yaml: a grid + caption accuracy
        _target_: cm3leon.eval.callback.SampleCallback   # after every validation
        n_images: 16
        metrics: [caption_acc]
      fid:                                  # the same callback as an FID monitor every 1000 steps
        _target_: cm3leon.eval.callback.SampleCallback
        every_n_steps: 1000
        n_images: 256
        metrics: [frechet, clip_score, caption_acc]
        feature_space: tiny_clip            # the embedded world; inception for natural images
        prefix: eval

Metrics (logged as `<prefix>/<name>`):
- `frechet`: `fd_tiny_clip` (Frechet distance in the tiny CLIP image tower's space,
  `cm3leon.eval.frechet`) or `fid` (torch-fidelity Inception, `feature_space="inception"`, needs its
  weights), and the matching kernel distance;
- `clip_score` (100 x mean max(cos, 0), the configured open_clip model);
- `caption_acc` (the pixel checker; embedded-world captions only, skipped for others).
Reference images for `frechet`: `reference=` (a folder or a uint8 array), else for embedded-world
captions the scenes drawn exactly, else the validation images' own codes decoded by the image
tokenizer (so the distance then measures the LM alone, not the tokenizer). Features of the
reference set are cached under `<run dir>/<subdir>/cache` (content-hashed).
Runs on global rank 0 (the model must not be sharded: DDP yes, FSDP no). Generation goes through
`cm3leon.generation` (the same tasks and tokenizer loader as `src/generate.py`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from cm3leon.retrieval.clip_encoder import SHIPPED_WORLD_CLIP
from cm3leon.retrieval.tiny_clip import TINY_CLIP

METRICS = ("frechet", "clip_score", "caption_acc")


class SampleCallback(L.Callback):
    """Args:
    n_images: held-out captions, one image each.
    every_n_steps: sample when trainer.global_step is a multiple of this; None: after every
        validation (and at fit end when `at_fit_end`).
    metrics: any of METRICS (empty: the grid alone).
    feature_space: tiny_clip (Frechet distance in `clip_model`'s image space) | inception (FID).
    clip_model, clip_pretrained: open_clip model (and weights: tag or file) for the CLIP score
        and the tiny_clip feature space.
    inception_weights: local Inception weights (None: torch hub's copy / download).
    reference: folder or uint8 array [N, H, W, 3] of real images (see module docstring).
    resize: {'method', 'size'} stage-1 resize protocol (default: to the tokenizer's resolution).
    decoding: `DecodingConfig` fields (default: plain sampling, temperature 1).
    batch_size: samples per model forward.
    grid_images: images in the logged grid.
    prefix: metric namespace (`val/caption_acc`, `eval/fid`, ...).
    subdir: where grids go under the run folder (`<run dir>/<subdir>/step_XXXXXXX.png`).
    """

    def __init__(
        self,
        n_images: int = 16,
        every_n_steps: int | None = None,
        metrics: Sequence[str] = ("caption_acc",),
        feature_space: str = "tiny_clip",
        clip_model: str = TINY_CLIP,
        clip_pretrained: str | None = SHIPPED_WORLD_CLIP,
        inception_weights: str | None = None,
        reference=None,
        resize: dict | None = None,
        decoding: dict | None = None,
        batch_size: int = 64,
        grid_images: int = 16,
        seed: int = 0,
        at_fit_end: bool = False,
        prefix: str = "val",
        subdir: str = "samples",
    ):
        self.metrics = tuple(metrics or ())
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"SampleCallback metrics {unknown} are not in {list(METRICS)}")
        if feature_space not in ("tiny_clip", "inception"):
            raise ValueError(f"SampleCallback feature_space={feature_space!r} is not tiny_clip or inception")
        if "frechet" in self.metrics and n_images < 2:
            raise ValueError(f"SampleCallback n_images={n_images}: a Frechet distance needs at least 2 images")
        self.every = None if every_n_steps is None else int(every_n_steps)
        self.n_images, self.feature_space = int(n_images), feature_space
        self.clip_model, self.clip_pretrained, self.inception_weights = clip_model, clip_pretrained, inception_weights
        self.reference, self.resize, self.decoding = reference, resize, dict(decoding or {})
        self.batch_size, self.grid_images = int(batch_size), int(grid_images)
        self.seed, self.at_fit_end, self.prefix, self.subdir = int(seed), at_fit_end, prefix, subdir
        self._last_step = -1
        self._space = None
        self._scorer = None
        self._tokenizer = None
        self.last_metrics: dict = {}
        self.last_grid: Path | None = None

    # ---- hooks ---------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and step != self._last_step:
            self._last_step = step
            self._sample_rank_zero(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.every is None and not trainer.sanity_checking and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self._sample_rank_zero(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_fit_end and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self._sample_rank_zero(trainer, pl_module)

    @rank_zero_only
    def _sample_rank_zero(self, trainer, pl_module) -> None:
        metrics = self.evaluate(trainer, pl_module)
        named = {f"{self.prefix}/{k}": v for k, v in metrics.items()}
        if named:
            for logger in trainer.loggers:
                logger.log_metrics(named, step=trainer.global_step)
        # also in callback_metrics (progress bar, the run's summary, ModelCheckpoint's monitor on rank 0)
        for k, v in named.items():
            trainer.callback_metrics[k] = torch.tensor(v)

    # ---- the evaluation --------------------------------------------------------------------------
    def _image_tokenizer(self, dm, device):
        if self._tokenizer is None:
            from cm3leon.generation.pipeline import tokenizer_path
            from cm3leon.tokenizers.image_tokenizer import ImageTokenizer

            self._tokenizer = ImageTokenizer.from_checkpoint(tokenizer_path(dm.meta, "image_tokenizer"), device=device)
        return self._tokenizer

    def _models(self, device):
        """(feature space or None, CLIP scorer or None), built once."""
        if self._scorer is None and ("clip_score" in self.metrics or "frechet" in self.metrics):
            from cm3leon.eval.clip_score import ClipScorer

            self._scorer = ClipScorer(self.clip_model, self.clip_pretrained, device=str(device))
            if "frechet" in self.metrics and self.feature_space == "tiny_clip":
                from cm3leon.eval.frechet import ClipImageSpace

                self._space = ClipImageSpace(encoder=self._scorer.encoder)
            elif "frechet" in self.metrics:
                from cm3leon.eval.fid import InceptionSpace

                self._space = InceptionSpace(self.inception_weights, device=str(device))
        return self._space, self._scorer

    def _reference(self, captions, samples, tokenizer) -> np.ndarray | str:
        if self.reference is not None:
            return self.reference
        try:
            from cm3leon.data.world import parse_caption, render

            return np.stack([render(parse_caption(c), tokenizer.resolution) for c in captions])
        except ValueError:  # not world captions: the tokenizer's reconstructions of the real images
            from cm3leon.tokenizers.image_processing import postprocess

            codes = torch.as_tensor(np.stack([s.codes for s in samples]).astype(np.int64))
            return postprocess(tokenizer.decode(codes))

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict:
        """Generate, score, save and log the grid; returns the metrics (without the prefix)."""
        from cm3leon.eval.fid import ResizeProtocol, compare_image_sets
        from cm3leon.generation.grid import save_captioned_grid
        from cm3leon.generation.sampling import DecodingConfig
        from cm3leon.generation.tasks import generate_images
        from cm3leon.tokenizers.image_processing import postprocess

        dm = trainer.datamodule
        samples = dm.val_samples(self.n_images)
        if len(samples) < (2 if "frechet" in self.metrics else 1):
            raise ValueError(
                f"SampleCallback: the validation set has {len(samples)} samples; not enough for {self.metrics}"
            )
        captions = [s.caption for s in samples]
        device = pl_module.device
        tokenizer = self._image_tokenizer(dm, device)
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            codes = generate_images(
                model,
                pl_module.vocab,
                [np.asarray(s.text_ids, np.int64) for s in samples],
                dm.tokens_per_image,
                decoding=DecodingConfig.from_dict(self.decoding),
                seed=self.seed,
                batch_size=self.batch_size,
            )
        finally:
            model.train(was_training)
        images = tokenizer.decode(codes)  # float [N, 3, R, R] in [-1, 1]
        uint8 = postprocess(images)  # [N, R, R, 3]
        space, scorer = self._models(device)
        out_dir = Path(trainer.default_root_dir) / self.subdir
        metrics: dict = {}
        if "frechet" in self.metrics:
            resize = ResizeProtocol.from_dict(self.resize or {"method": "lanczos", "size": tokenizer.resolution})
            res = compare_image_sets(
                uint8,
                self._reference(captions, samples, tokenizer),
                space,
                resize=resize,
                cache_dir=out_dir / "cache",
                kid_subsets=20,
            )
            name, kd = ("fd_tiny_clip", "kd_tiny_clip") if self.feature_space == "tiny_clip" else ("fid", "kid")
            metrics.update({name: res["frechet"], kd: res["kid_mean"]})
        if "clip_score" in self.metrics:
            metrics["clip_score"] = scorer(list(uint8), captions)["clip_score"]
        correct = None
        if "caption_acc" in self.metrics:
            from cm3leon.data.checker import check

            with contextlib.suppress(ValueError):  # not world captions: nothing to check from pixels
                correct = [bool(check(img, cap).correct) for img, cap in zip(uint8, captions)]
                metrics["caption_acc"] = float(np.mean(correct))
        # the grid (each caption under its image, ticked or crossed by the checker), on disk and to W&B
        k = min(self.grid_images, len(images))
        stem = out_dir / f"step_{trainer.global_step:07d}"
        path = save_captioned_grid(images[:k], captions[:k], f"{stem}.png", None if correct is None else correct[:k])
        record = {"captions": captions[:k], "correct": None if correct is None else correct[:k], **metrics}
        Path(f"{stem}.json").write_text(json.dumps(record))
        step = trainer.global_step
        for logger in trainer.loggers:  # W&B panels (offline by default; `wandb sync` uploads them)
            if hasattr(logger, "log_image"):  # WandbLogger: the captioned grid
                logger.log_image(key=f"{self.prefix}/samples", images=[str(path)], step=step)
            if hasattr(logger, "log_table"):  # and every sample: image, caption, correct, step
                logger.log_table(
                    key=f"{self.prefix}/sample_table",
                    columns=["image", "caption", "correct", "step"],
                    data=self._table_rows(uint8, captions, correct, step),
                    step=step,
                )
        self.last_metrics, self.last_grid = metrics, path
        return metrics

    @staticmethod
    def _table_rows(uint8, captions, correct, step: int) -> list[list]:
        import wandb

        return [
            [wandb.Image(img), cap, None if correct is None else correct[i], step]
            for i, (img, cap) in enumerate(zip(uint8, captions))
        ]
