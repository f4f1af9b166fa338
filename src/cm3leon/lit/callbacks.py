"""Lightning callbacks of the main job: sample grids (+ caption accuracy on the embedded world),
a data-order log, and the batch measures `ThroughputMonitor` needs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from cm3leon.decoding import generate_images
from cm3leon.tokenizers.image_tokenizer import ImageTokenizer


def batch_size_fn(batch: dict) -> int:
    """Sequences in a batch (for ThroughputMonitor)."""
    return int(batch["input_ids"].shape[0])


def batch_tokens_fn(batch: dict) -> int:
    """Token positions in a batch, padding included (for ThroughputMonitor: tokens/s)."""
    return int(batch["input_ids"].numel())


class ImageSampleCallback(L.Callback):
    """After validation, sample images for the first `n_prompts` validation captions, save a PNG
    grid under `<run dir>/samples/`, log it to W&B, and (on the embedded world) log the pixel
    checker's caption accuracy as `val/caption_acc`.

    Plain temperature / top-p sampling; the full decoding strategies live in `cm3leon.decoding`.
    """

    def __init__(self, n_prompts: int = 8, temperature: float = 1.0, top_p: float | None = None,
                 check_captions: bool = True, every_n_validations: int = 1, seed: int = 0):
        self.n_prompts = n_prompts
        self.temperature = temperature
        self.top_p = top_p
        self.check_captions = check_captions
        self.every = every_n_validations
        self.seed = seed
        self._validations = 0
        self._tokenizer: ImageTokenizer | None = None
        self.last_grid: Path | None = None

    def _image_tokenizer(self, dm) -> ImageTokenizer:
        if self._tokenizer is None:
            self._tokenizer = ImageTokenizer.from_checkpoint(dm.meta["image_tokenizer"]["path"])
        return self._tokenizer

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.Tensor, list[str]]:
        """Images [N, 3, H, W] in [-1, 1] and their captions."""
        dm = trainer.datamodule
        prompts = dm.val_samples(self.n_prompts)
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            codes = generate_images(
                model, pl_module.vocab, [s.text_ids for s in prompts], dm.tokens_per_image,
                temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            )
        finally:
            model.train(was_training)
        return self._image_tokenizer(dm).decode(codes), [s.caption for s in prompts]

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        images, captions = self.sample(trainer, pl_module)
        out_dir = Path(trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{trainer.global_step:07d}.png"
        grid = make_grid((images + 1) / 2, nrow=min(8, len(images)), padding=2, pad_value=1.0)
        save_image(grid, path)
        self.last_grid = path
        (out_dir / f"step_{trainer.global_step:07d}.json").write_text(json.dumps(captions, indent=1))
        if self.check_captions:
            from cm3leon.data.checker import caption_accuracy
            from cm3leon.tokenizers.image_processing import postprocess

            acc = caption_accuracy(list(postprocess(images)), captions)
            pl_module.log("val/caption_acc", acc["correct"], rank_zero_only=True)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], caption=[" | ".join(captions)])


class BatchKeysRecorder(L.Callback):
    """Append the sample keys of every training batch to `<run dir>/batch_keys.jsonl`
    (one JSON line per batch: step, rank, keys, and n_retrieved: the retrieved documents before
    each query): the data-order log that resume and retrieval tests read."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = Path(trainer.default_root_dir) / "batch_keys.jsonl"
        record = {"step": trainer.global_step, "rank": trainer.global_rank, "keys": batch["keys"]}
        if "n_retrieved" in batch:
            record["n_retrieved"] = [int(n) for n in batch["n_retrieved"]]
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
