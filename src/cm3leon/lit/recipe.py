"""The training recipe's arithmetic on a composed `conf/train.yaml`: processes (devices x nodes),
the gradient accumulation that reaches the global batch in tokens, and the dry run (the model's
sizes and FLOPs built on the meta device: nothing allocated, no data read but meta.json).

    trainer = hydra.utils.instantiate(cfg.trainer, accumulate_grad_batches=accumulation(cfg), ...)
    print(json.dumps(dry_run(cfg)))         # python src/train.py model=7b dry_run=true
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cm3leon.errors import UsageError


def world_size(trainer_cfg: DictConfig) -> int:
    """Training processes: trainer.devices (a count, a list of ids, or "auto") x trainer.num_nodes."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices == "auto":
        import torch

        devices = max(1, torch.cuda.device_count()) if trainer_cfg.accelerator == "gpu" else 1
    n = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)) else int(devices)
    return n * int(trainer_cfg.get("num_nodes", 1))


def accumulation(cfg: DictConfig) -> int:
    """trainer.accumulate_grad_batches that reaches `global_batch_tokens` (null: the trainer's value).

    tokens per optimizer step = processes x data.micro_batch_size x data.seq_len x accumulation.
    """
    if cfg.global_batch_tokens is None:
        return int(cfg.trainer.accumulate_grad_batches)
    per_step = world_size(cfg.trainer) * cfg.data.micro_batch_size * cfg.data.seq_len
    if cfg.global_batch_tokens % per_step:
        raise UsageError(
            f"global_batch_tokens={cfg.global_batch_tokens} is not a multiple of devices x nodes x "
            f"micro_batch_size x seq_len = {per_step}; change data.micro_batch_size or trainer.devices"
        )
    return cfg.global_batch_tokens // per_step


def dry_run(cfg: DictConfig) -> dict:
    """Model sizes, batch and FLOPs of the composed run, without allocating anything (meta device).

    The vocabulary is the token shards' when their meta.json exists, else the paper's table.
    """
    import torch

    from cm3leon.data.token_shards import load_token_vocab
    from cm3leon.model import CM3LeonLM, ModelConfig
    from cm3leon.vocab import Vocab

    tokens = Path(cfg.data.tokens_dir)
    try:
        vocab, _ = load_token_vocab(tokens / "train", tokens / "val", **cfg.data.get("vocab", {}))
        vocab_source = "token shards"
    except FileNotFoundError:
        vocab, vocab_source = Vocab.paper(), "paper (no token shards found)"
    with torch.device("meta"):
        model = CM3LeonLM(ModelConfig.from_dict(cfg.model, vocab_size=vocab.size))
    accum = accumulation(cfg)
    tokens_per_step = world_size(cfg.trainer) * cfg.data.micro_batch_size * cfg.data.seq_len * accum
    fpt = model.flops_per_token(cfg.data.seq_len)
    return {
        "model": cfg.model.name,
        "params": model.num_params(),
        "params_non_embedding": model.num_params(exclude_embeddings=True),
        "vocab_size": vocab.size,
        "vocab_source": vocab_source,
        "seq_len": cfg.data.seq_len,
        "world_size": world_size(cfg.trainer),
        "micro_batch_size": cfg.data.micro_batch_size,
        "accumulate_grad_batches": accum,
        "tokens_per_step": tokens_per_step,
        "flops_per_token": fpt,
        "flops_per_step": fpt * tokens_per_step,
        "lr": cfg.optim.lr,
        "warmup_steps": cfg.optim.warmup_steps,
    }
