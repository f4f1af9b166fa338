"""Train CM3Leon with the CM3 objective (Lightning + Hydra: conf/train.yaml).

    python src/train.py                                  # tiny model, embedded world, CPU, minutes
    python src/train.py model=350m data=shutterstock trainer=fsdp trainer.devices=8 trainer.num_nodes=32
    python src/train.py model=7b dry_run=true            # sizes and FLOPs as one JSON line, nothing built
    python src/train.py -m optim.lr=1e-3,3e-3 trainer.max_steps=200     # a sweep, one run folder per job
    python src/train.py hydra.run.dir=DIR ckpt_path=last   # resume DIR (starts fresh when it has no last.ckpt)
    python src/train.py retrieval=ra                     # k retrieved documents before each example
    python src/train.py experiment=sft_world ckpt_init=data/shipped/world_lm.safetensors   # instruction tuning

Compose, instantiate the DataModule (it prepares its own data: the embedded world and retrieval
files on first use), the LightningModule, callbacks, loggers and trainer; fit. Everything of a run
lands in its Hydra run folder (`hydra.run.dir=DIR`): checkpoints/last.ckpt, CSV and W&B logs (W&B
offline unless WANDB_MODE=online), samples/*.png.

Faults: SIGTERM or SIGUSR1 (SLURM) saves last.ckpt of the current step and exits 128 + signal
(`cm3leon.lit.preemption`); checkpoints are written atomically and read with weights_only=True
(`cm3leon.lit.checkpoint_io`); a resumed run continues its CSV rows and W&B run (`cm3leon.lit.loggers`).
"""

from __future__ import annotations

import json
import os

from omegaconf import DictConfig

from cm3leon.cli import hydra_entry
from cm3leon.lit.checks import check_max_steps
from cm3leon.lit.recipe import accumulation, dry_run, max_steps

# Lightning and torch are imported inside train(), so that a dry run answers in seconds.


def train(cfg: DictConfig) -> dict:
    """Fit the composed run; returns the last metrics with the run folder and step."""
    from cm3leon.lit.init_from import init_for_run

    # ckpt_init: the architecture and vocabulary layout from the checkpoint, before anything reads them;
    # the weights to load when the model is built (None: no ckpt_init, or the run resumes)
    init_from = init_for_run(cfg)
    steps = max_steps(cfg)  # trainer.max_steps, else ceil(token_budget / global_batch_tokens)
    if not cfg.trainer.get("fast_dev_run"):
        check_max_steps(steps)  # the stream is endless: only max_steps ends the run
    # the user's token shards: missing ones stop here, before Lightning loads (SFT data checks its sources itself)
    if not cfg.data.embedded_world and "sources" not in cfg.data:
        from pathlib import Path

        from cm3leon.data.token_shards import load_token_vocab

        tokens = Path(cfg.data.tokens_dir)
        load_token_vocab(tokens / "train", tokens / "val", **(cfg.data.get("vocab") or {}))

    import hydra
    import lightning as L

    datamodule = hydra.utils.instantiate(cfg.data)
    L.seed_everything(cfg.seed, workers=True)
    module = hydra.utils.instantiate(cfg.module, init_from=init_from)
    os.environ.setdefault("WANDB_MODE", "offline")  # nothing reaches the network unless the user asks
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        accumulate_grad_batches=accumulation(cfg),
        max_steps=-1 if steps is None else steps,
    )
    from cm3leon.lit import preemption

    preemption.fit(trainer, module, datamodule, cfg.ckpt_path)  # preempted: exits 128 + signal
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    summary = {"run_dir": cfg.paths.output_dir, "global_step": trainer.global_step, **metrics}
    if trainer.is_global_zero:
        print(json.dumps(summary))
    return summary


@hydra_entry("train", __file__)
def main(cfg: DictConfig) -> float | None:
    if cfg.dry_run:
        if cfg.get("ckpt_init"):  # the checkpoint's architecture, as training would build it
            from cm3leon.lit.init_from import apply_init_config, init_hparams

            apply_init_config(cfg, init_hparams(cfg.ckpt_init))
        print(json.dumps(dry_run(cfg)))
        return None
    return train(cfg).get("val/loss")  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
