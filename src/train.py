"""Train CM3Leon with the CM3 objective (Lightning + Hydra).

    python src/train.py                                  # tiny model, embedded world, CPU, minutes
    python src/train.py model=350m data=shutterstock trainer=fsdp trainer.devices=8 trainer.num_nodes=32
    python src/train.py model=7b dry_run=true            # sizes and FLOPs as one JSON line, nothing built
    python src/train.py -m optim.lr=1e-3,3e-3 trainer.max_steps=200     # a sweep, one run folder per job
    python src/train.py ckpt_path=DIR/checkpoints/last.ckpt hydra.run.dir=DIR   # resume

Everything of a run lands in its Hydra run folder (`hydra.run.dir=DIR`): checkpoints/last.ckpt,
CSV and W&B logs (W&B offline unless WANDB_MODE=online), samples/*.png.
"""

from __future__ import annotations

import json
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from cm3leon.cli import hydra_entry
from cm3leon.data.token_shards import load_token_vocab
from cm3leon.vocab import Vocab

# Lightning, torch and the data stack are imported inside the functions that need them, so that a
# missing data folder or a dry run answers in seconds.



def _data_kwargs(cfg: DictConfig) -> dict:
    """cfg.data without the keys that are not DataModule arguments."""
    d = OmegaConf.to_container(cfg.data, resolve=True)
    d.pop("embedded_world", None)
    d.pop("root", None)
    return d


def _model_kwargs(cfg: DictConfig) -> dict:
    """cfg.model without the training recipe (not a ModelConfig field)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "recipe"}


def _world_size(cfg: DictConfig) -> int:
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, str) and devices == "auto":
        import torch

        devices = max(1, torch.cuda.device_count()) if cfg.trainer.accelerator == "gpu" else 1
    n = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    return n * int(cfg.trainer.get("num_nodes", 1))


def _accumulation(cfg: DictConfig) -> int:
    """trainer.accumulate_grad_batches that reaches `global_batch_tokens` (or the trainer's value)."""
    if cfg.global_batch_tokens is None:
        return int(cfg.trainer.accumulate_grad_batches)
    per_step = _world_size(cfg) * cfg.data.micro_batch_size * cfg.data.seq_len
    if cfg.global_batch_tokens % per_step:
        raise ValueError(
            f"global_batch_tokens={cfg.global_batch_tokens} is not a multiple of devices x nodes x "
            f"micro_batch_size x seq_len = {per_step}; change data.micro_batch_size or trainer.devices"
        )
    return cfg.global_batch_tokens // per_step


def dry_run(cfg: DictConfig) -> dict:
    """Model sizes and FLOPs without allocating anything (meta device)."""
    import torch

    from cm3leon.model import CM3LeonLM, ModelConfig

    try:
        vocab, _ = load_token_vocab(cfg.data.train_dir, cfg.data.val_dir, **cfg.data.get("vocab", {}))
        vocab_source = "token shards"
    except FileNotFoundError:
        vocab, vocab_source = Vocab.paper(), "paper (no token shards found)"
    with torch.device("meta"):
        model = CM3LeonLM(ModelConfig.from_dict(_model_kwargs(cfg), vocab_size=vocab.size))
    accum = _accumulation(cfg)
    tokens_per_step = _world_size(cfg) * cfg.data.micro_batch_size * cfg.data.seq_len * accum
    fpt = model.flops_per_token(cfg.data.seq_len)
    return {
        "model": cfg.model.name,
        "params": model.num_params(),
        "params_non_embedding": model.num_params(exclude_embeddings=True),
        "vocab_size": vocab.size,
        "vocab_source": vocab_source,
        "seq_len": cfg.data.seq_len,
        "world_size": _world_size(cfg),
        "micro_batch_size": cfg.data.micro_batch_size,
        "accumulate_grad_batches": accum,
        "tokens_per_step": tokens_per_step,
        "flops_per_token": fpt,
        "flops_per_step": fpt * tokens_per_step,
        "lr": cfg.optim.lr,
        "warmup_steps": cfg.optim.warmup_steps,
    }


def train(cfg: DictConfig) -> dict:
    if cfg.dry_run:
        out = dry_run(cfg)
        print(json.dumps(out))
        return out
    if cfg.data.get("embedded_world", False):
        from cm3leon.data.embedded import ensure_embedded_tokens

        ensure_embedded_tokens(cfg.paths.world_dir, cfg.paths.shipped_dir, num_workers=cfg.data.num_workers)
    # fail fast on missing token shards, before the heavy imports
    load_token_vocab(cfg.data.train_dir, cfg.data.val_dir, **cfg.data.get("vocab", {}))

    import lightning as L

    from cm3leon.lit.lm_module import CM3LeonLitModule

    dm = hydra.utils.instantiate(_data_kwargs(cfg))
    vocab = dm.load_meta()
    data_meta = dict(dm.meta)
    if cfg.retrieval.get("k", 0) > 0:
        from pathlib import Path

        from cm3leon.retrieval.neighbours import build_neighbour_source

        # retrieved documents go before each query; the embedded world builds its memory bank on first use
        token_root = Path(cfg.data.train_dir).parent
        dm.neighbours = build_neighbour_source(cfg.retrieval, token_root, build_missing=cfg.data.get("embedded_world", False))
        # recorded in the checkpoint: generate.py retrieves from the same memory bank by default
        data_meta["retrieval"] = {"k": int(cfg.retrieval.k), "folder": str(dm.neighbours.folder.resolve())}
    L.seed_everything(cfg.seed, workers=True)
    module = CM3LeonLitModule(
        model=_model_kwargs(cfg),
        vocab=vocab.to_dict(),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        compile=cfg.compile,
        data_meta=data_meta,
    )
    os.environ.setdefault("WANDB_MODE", "offline")  # nothing reaches the network unless the user asks
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, accumulate_grad_batches=_accumulation(cfg)
    )
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    summary = {"run_dir": cfg.paths.output_dir, "global_step": trainer.global_step, **metrics}
    if trainer.is_global_zero:
        print(json.dumps(summary))
    return summary


@hydra_entry("train", __file__)
def main(cfg: DictConfig) -> float | None:
    summary = train(cfg)
    return summary.get("val/loss")  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
