"""Train the VQGAN image tokenizer (Hydra: conf/train_tokenizer.yaml).

With no arguments it trains the tiny VQGAN (conf/tokenizer/tiny.yaml) on the embedded world on CPU,
generating the world first if needed. Checkpoints go to `<run dir>/checkpoints/` (last.ckpt is the
newest); `export_to=PATH` also writes the final VQModel weights (taming key layout, nothing else)
to PATH and its architecture to PATH with a .yaml suffix, which `ImageTokenizer.from_checkpoint`
reads.

Rebuild the shipped tokenizer (data/shipped/world_vqgan.ckpt + .yaml): `make tokenizers` (~2 h on
2 CPU cores: a 512-code model, then `init_from=` it with its codebook split into 2048 codes, then
`module.decoder_only=true` with the codes frozen).

Your own data and the paper's architecture (GPU; GAN and perceptual loss as in taming):

    python src/train_tokenizer.py tokenizer=paper256 data.world=false \
        data.train_shards='/data/train/{000000..000999}.tar' data.val_shards=/data/val \
        trainer.accelerator=gpu trainer.max_steps=500000 data.batch_size=8 module.optim.lr=4.5e-6 \
        module.loss.disc_enabled=true module.loss.disc_start=250001 \
        module.loss.perceptual_weight=1.0 module.loss.perceptual_vgg_path=/weights/vgg16.pth
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

# Before torch loads OpenMP: on a shared CPU, spinning threads waste the cores other processes need
# (measured here: 2 threads with the default active wait ran 4x slower than with passive wait).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cm3leon.cli import hydra_entry
from cm3leon.data.image_datamodule import ImageDataModule
from cm3leon.lit.vqgan_module import VQGANModule
from cm3leon.tokenizers.vqgan import VQGANConfig

log = logging.getLogger(__name__)


def export_vqgan(module: VQGANModule, path: str | Path, note: str = "") -> Path:
    """Write the VQModel weights ({"state_dict": taming keys}) to `path` and a taming-style yaml beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.vq_state_dict()}, path)
    header = f"# VQGAN architecture for {path.name} (taming/Chameleon yaml layout).\n"
    if note:
        header += "".join(f"# {line}\n" for line in note.splitlines())
    yaml_text = OmegaConf.to_yaml(OmegaConf.create(module.cfg.to_taming_yaml_dict()))
    path.with_suffix(".yaml").write_text(header + yaml_text)
    return path


class PrintProgress(L.Callback):
    """One plain line every `every` training batches (readable in log files, unlike a progress bar)."""

    def __init__(self, every: int):
        self.every, self.t0 = every, time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module._steps_done
        if self.every and step % self.every == 0:
            m = trainer.callback_metrics
            vals = " ".join(f"{k.split('/')[-1]}={float(m[k]):.4g}" for k in
                            ("train/rec_loss", "train/q_loss", "train/codebook_usage", "train/perplexity") if k in m)
            print(f"[train_tokenizer] step {step} {time.time() - self.t0:.0f}s {vals}", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        vals = " ".join(f"{k}={float(v):.4g}" for k, v in m.items() if k.startswith("val/"))
        print(f"[train_tokenizer] validation at step {pl_module._steps_done}: {vals}", flush=True)


def _loggers(cfg: DictConfig, out_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(str(out_dir), name="csv", version="")]
    if cfg.logger.wandb:
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")  # nothing reaches the network unless asked
        loggers.append(WandbLogger(project=cfg.logger.wandb_project, name=cfg.task_name, save_dir=str(out_dir)))
    return loggers


def train(cfg: DictConfig) -> dict:
    """Fit the VQGAN as `cfg` says; returns the final train/val metrics (and the export path)."""
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise FileNotFoundError(f"init_from={cfg.init_from}: no such VQGAN weights file (a .ckpt in taming layout)")
    torch.set_num_threads(int(cfg.threads))
    L.seed_everything(int(cfg.seed), workers=True)
    out_dir = Path(cfg.paths.output_dir)  # the Hydra run dir
    tok_cfg = VQGANConfig.from_dict(OmegaConf.to_container(cfg.tokenizer, resolve=True))

    if cfg.data.world:
        from cm3leon.data.world import ensure_world

        ensure_world(out_dir=str(Path(cfg.paths.world_dir) / "raw"))
    dm = ImageDataModule(
        train_shards=cfg.data.train_shards,
        val_shards=cfg.data.val_shards,
        resolution=tok_cfg.resolution,
        batch_size=cfg.data.batch_size,
        val_batch_size=cfg.data.val_batch_size,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        val_max_samples=cfg.data.val_max_samples,
        seed=int(cfg.seed),
    )
    m = OmegaConf.to_container(cfg.module, resolve=True)
    module = VQGANModule(tokenizer=tok_cfg.to_dict(), optim=m["optim"], loss=m["loss"], codebook=m["codebook"], val=m["val"],
                         crop=m["crop"], decoder_only=m["decoder_only"])

    if cfg.init_from and not cfg.ckpt_path:
        from cm3leon.tokenizers.image_tokenizer import read_vq_state_dict

        n_old = module.load_vq_weights(read_vq_state_dict(cfg.init_from))
        log.info("started from %s (%d codes -> %d)", cfg.init_from, n_old, tok_cfg.n_embed)

    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_cb = ModelCheckpoint(
        dirpath=str(out_dir / "checkpoints"),
        filename="step_{step:07d}",
        auto_insert_metric_name=False,
        save_last=True,
        save_top_k=-1,
        every_n_train_steps=int(cfg.checkpoint.every_n_train_steps),
    )
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=str(out_dir),
        callbacks=[ckpt_cb, PrintProgress(int(cfg.print_every))],
        logger=_loggers(cfg, out_dir),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)

    metrics = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    if cfg.export_to:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        note = "rebuild: .venv/bin/python src/train_tokenizer.py " + " ".join(overrides)
        metrics["exported"] = str(export_vqgan(module, cfg.export_to, note))
    print(json.dumps({"run_dir": str(out_dir), **metrics}), flush=True)
    return metrics


@hydra_entry("train_tokenizer", __file__)
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
