"""SampleCallback inside a real Trainer.fit: every N steps it generates images for held-out world
captions and logs fd_tiny_clip, kd_tiny_clip, clip_score, caption_acc and a grid (to every logger
with log_image, as W&B's). Random checkpoint / tokenizer / CLIP: the tiny_eval_run fixture (conftest.py)."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


class WorldDataModule:
    """Just what the LM module and the callback read: random training batches, world captions as
    held-out samples, and the token shards' meta."""

    def __new__(cls, *args, **kwargs):
        import lightning as L

        class _DM(L.LightningDataModule):
            def __init__(self, vqgan, vocab, n_val=4):
                super().__init__()
                from cm3leon.data.token_shards import TokenSample
                from cm3leon.eval.generation import world_prompts
                from cm3leon.tokenizers.text_tokenizer import TextTokenizer
                from eval_builders import BPE

                text = TextTokenizer.from_file(BPE)
                self.meta = {"image_tokenizer": {"path": str(vqgan)}, "tokens_per_image": 64}
                self.tokens_per_image = 64
                self.vocab = vocab
                self._val = [
                    TokenSample(
                        f"val_{p.index}",
                        p.caption,
                        np.asarray(text.encode(p.caption), np.uint16),
                        np.zeros(64, np.uint16),
                    )
                    for p in world_prompts(n_val)
                ]

            def val_samples(self, n):
                return self._val[:n]

            def train_dataloader(self):
                g = torch.Generator().manual_seed(0)
                ids = torch.randint(4, 200, (8, 2, 24), generator=g)
                batches = [{"input_ids": x, "targets": x.roll(-1, 1), "keys": ["k"] * 2} for x in ids]
                return torch.utils.data.DataLoader(batches, batch_size=None)  # already batched

        return _DM(*args, **kwargs)


class ImageLogger:
    """A minimal Lightning logger with W&B's log_image and log_table."""

    def __new__(cls):
        from lightning.pytorch.loggers import Logger

        class _L(Logger):
            name, version = "fake", 0
            metrics: ClassVar[list] = []
            images: ClassVar[list] = []
            tables: ClassVar[list] = []

            @property
            def experiment(self):
                return None

            def log_metrics(self, metrics, step=None):
                self.metrics.append((step, dict(metrics)))

            def log_hyperparams(self, params, *args, **kwargs):
                pass

            def log_image(self, key, images, step=None, **kwargs):
                self.images.append((key, list(images), step, kwargs.get("caption")))

            def log_table(self, key, columns, data, step=None):
                self.tables.append((key, list(columns), list(data), step))

        return _L()


def test_fid_callback_logs_metrics_and_a_grid_every_n_steps(tiny_eval_run, tmp_path):
    import lightning as L

    from cm3leon.eval.callback import SampleCallback
    from cm3leon.lit.lm_module import CM3LeonLitModule

    module = CM3LeonLitModule.load_from_checkpoint(str(tiny_eval_run["ckpt"]), map_location="cpu")
    dm = WorldDataModule(tiny_eval_run["vqgan"], module.vocab)
    cb = SampleCallback(
        every_n_steps=2,
        n_images=4,
        clip_pretrained=str(tiny_eval_run["clip"]),
        batch_size=8,
        decoding={"top_p": 0.9},
        metrics=["frechet", "clip_score", "caption_acc"],
        prefix="eval",
        subdir="eval",
    )
    logger = ImageLogger()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        log_every_n_steps=100,
    )
    trainer.fit(module, datamodule=dm)
    # evaluated once (step 2 of 3), on schedule
    evals = [(step, m) for step, m in logger.metrics if "eval/fd_tiny_clip" in m]
    assert [s for s, _ in evals] == [2]
    m = evals[0][1]
    assert set(m) == {"eval/fd_tiny_clip", "eval/kd_tiny_clip", "eval/clip_score", "eval/caption_acc"}
    assert np.isfinite(m["eval/fd_tiny_clip"]) and 0 <= m["eval/caption_acc"] <= 1
    assert float(trainer.callback_metrics["eval/fd_tiny_clip"]) == pytest.approx(m["eval/fd_tiny_clip"])
    assert cb.last_grid == tmp_path / "eval" / "step_0000002.png" and cb.last_grid.is_file()
    assert logger.images and logger.images[0][0] == "eval/samples" and logger.images[0][2] == 2
    # the sample table: one row per image (image, caption, correct by the checker, step)
    key, columns, rows, step = logger.tables[0]
    assert key == "eval/sample_table" and columns == ["image", "caption", "correct", "step"] and step == 2
    assert len(rows) == cb.n_images and all(isinstance(r[2], bool) for r in rows)
    assert np.mean([r[2] for r in rows]) == pytest.approx(m["eval/caption_acc"])
    record = json.loads((tmp_path / "eval" / "step_0000002.json").read_text())
    assert len(record["correct"]) == len(record["captions"])
    assert module.model.training  # the model went back to training mode


def test_fid_callback_rejects_bad_settings():
    from cm3leon.eval.callback import SampleCallback

    with pytest.raises(ValueError, match="feature_space"):
        SampleCallback(feature_space="dino")
    with pytest.raises(ValueError, match="at least 2"):
        SampleCallback(n_images=1, metrics=["frechet"])
    with pytest.raises(ValueError, match="not in"):
        SampleCallback(metrics=["fid"])


def test_captioned_grid_shows_each_caption_and_its_mark(tmp_path):
    from PIL import Image

    from cm3leon.generation.grid import save_captioned_grid

    images = torch.zeros(5, 3, 32, 32) - 1  # black
    caps = ["a small red circle at the top left on a blue background"] * 5
    path = save_captioned_grid(images, caps, tmp_path / "g.png", correct=[True, False, True, True, False], ncol=3)
    sheet = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert sheet.shape[1] == 3 * (192 + 4) + 4 and sheet.shape[0] > 2 * 192  # 3 columns, 2 rows, captions below
    green = (sheet[..., 1] > 120) & (sheet[..., 0] < 60)
    red = (sheet[..., 0] > 150) & (sheet[..., 1] < 60)
    assert green[:, : 196 + 4].any() and red[:, 196 + 4 : 2 * 196 + 4].any()  # tick, then cross
    with pytest.raises(ValueError, match="as many captions"):
        save_captioned_grid(images, caps[:2], tmp_path / "bad.png")
