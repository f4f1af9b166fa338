"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the paper's large models (`trainer=fsdp2`).

Lightning's `ModelParallelStrategy` leaves the parallelisation to `configure_model`; this is it.
The model is built on the meta device (a 7B model is never materialised whole on any rank),
sharded, then allocated shard by shard and initialised with the paper's init
(`CM3LeonLM.reset_parameters` works on the sharded DTensors). Layout, as the paper's FSDP:

- every `Block` is one FSDP unit (its parameters all-gathered just before its forward and
  backward, resharded after); the root unit holds the token and position tables, the final norm
  and the tied output head;
- one shard group over all ranks (full sharding, not hybrid);
- mixed precision follows `trainer.precision`: with bf16 the all-gathered parameters and the
  compute are bf16, gradients are reduced in fp32 and the optimizer keeps fp32 master weights;
- activation checkpointing is the model's own (`model.activation_checkpointing`: each block
  recomputed in backward), compile is per block (`compile=true`), applied before sharding.

Checkpoints are `torch.distributed.checkpoint` folders (one shard per rank, written in parallel)
that load on any number of ranks; `src/convert_checkpoint.py` turns one into full weights.
"""

from __future__ import annotations

import torch

from cm3leon.model import CM3LeonLM


def is_fsdp2(strategy) -> bool:
    """Is this Lightning strategy the one that asks configure_model to shard (ModelParallelStrategy)?"""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def shard_model(model: CM3LeonLM, device: torch.device, world_size: int, precision: str) -> CM3LeonLM:
    """Shard a meta-device model over `world_size` ranks (one FSDP unit per Block plus the root),
    allocate its shards on `device` and initialise them. Needs the process group to be up."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    if str(precision).startswith("bf16"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    with torch.no_grad():
        model.reset_parameters()
    return model
