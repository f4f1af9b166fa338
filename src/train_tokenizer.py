"""Train the VQGAN image tokenizer (Hydra: conf/train_tokenizer.yaml).

With no arguments it trains the tiny VQGAN (package config `tiny`) on the embedded world on CPU,
generating the world first if needed. Checkpoints go to `<run dir>/checkpoints/` (last.ckpt is the
newest); `export_to=PATH` also writes the final VQModel weights (taming key layout, nothing else)
to PATH and its architecture to PATH with a .yaml suffix, which `ImageTokenizer.from_checkpoint`
reads.

Rebuild the shipped tokenizer (data/shipped/world_vqgan.ckpt + .yaml): `make tokenizers` (~2 h on
2 CPU cores: a 512-code model, then `init_from=` it with its codebook split into 2048 codes, then
`module.decoder_only=true` with the codes frozen).

Your own data and the paper's architecture (GPU; GAN and perceptual loss as in taming):

    python src/train_tokenizer.py tokenizer=paper256 data.embedded_world=false \
        data.train_shards='/data/train/{000000..000999}.tar' data.val_shards=/data/val \
        trainer.accelerator=gpu trainer.max_steps=500000 data.batch_size=8 module.optim.lr=4.5e-6 \
        module.loss.disc_enabled=true module.loss.disc_start=250001 \
        module.loss.perceptual_weight=1.0 module.loss.perceptual_vgg_path=/weights/vgg16.pth
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

# Before torch loads OpenMP: on a shared CPU, spinning threads waste the cores other processes need
# (measured here: 2 threads with the default active wait ran 4x slower than with passive wait).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cm3leon.cli import hydra_entry
from cm3leon.errors import UsageError
from cm3leon.lit import preemption
from cm3leon.lit.checks import check_caption_checker, check_max_steps
from cm3leon.tokenizers.image_tokenizer import read_vq_state_dict, save_vqgan

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Fit the VQGAN as `cfg` says; returns the final train/val metrics (and the export path)."""
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise FileNotFoundError(f"init_from={cfg.init_from}: no such VQGAN weights file (a .ckpt in taming layout)")
    if cfg.export_to and not cfg.overwrite and Path(cfg.export_to).exists():  # before hours of training
        raise UsageError(f"export_to={cfg.export_to} exists: pass overwrite=true to replace it, or another export_to")
    if not cfg.trainer.get("fast_dev_run"):
        check_max_steps(cfg.trainer.get("max_steps"))  # training shards are resampled: an endless stream
    torch.set_num_threads(int(cfg.threads))
    L.seed_everything(int(cfg.seed), workers=True)

    dm = hydra.utils.instantiate(cfg.data)
    if not cfg.data.embedded_world:  # before any logger starts, so that the error stays one line
        check_caption_checker(cfg.module.val.caption_accuracy, cfg.data.val_shards)
    module = hydra.utils.instantiate(
        cfg.module, tokenizer=OmegaConf.to_container(cfg.tokenizer, resolve=True), _convert_="all"
    )
    if cfg.init_from and not cfg.ckpt_path:
        n_old = module.load_vq_weights(read_vq_state_dict(cfg.init_from))
        log.info("started from %s (%d codes -> %d)", cfg.init_from, n_old, module.cfg.n_embed)
    os.environ.setdefault("WANDB_MODE", "offline")  # nothing reaches the network unless the user asks
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    # `logger=csv` leaves this config's `logger.wandb.name` behind without a _target_: not a logger
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if "_target_" in c]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    preemption.fit(trainer, module, dm, cfg.ckpt_path, script="src/train_tokenizer.py")  # preempted: exit 128+signal

    metrics = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    if cfg.export_to:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        note = "rebuild: .venv/bin/python src/train_tokenizer.py " + " ".join(overrides)
        metrics["exported"] = str(save_vqgan(module.vqgan, cfg.export_to, note, overwrite=bool(cfg.overwrite)))
    print(json.dumps({"run_dir": str(cfg.paths.output_dir), **metrics}), flush=True)
    return metrics


@hydra_entry("train_tokenizer", __file__)
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
