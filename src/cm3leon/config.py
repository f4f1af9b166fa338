"""Typed Hydra schemas of the project's configs, registered in Hydra's ConfigStore: the model (its
sizes) and the VQGAN tokenizer's training recipe.

The model sizes live in one place: `conf/model/<size>.yaml` holds only what differs between sizes
(name, n_layer, d_model, n_head, max_seq_len, the training recipe) on top of `model_schema`, which
is `ModelConfig` itself: every architectural field with its paper default. So every field stays
overridable and typed from the command line (`model.norm=rmsnorm`, `model.n_layer=2`), and an
unknown key (`model.n_layers=2`) or a wrong type (`model.n_layer=abc`) stops Hydra at compose time.

    register_configs()                      # before composing (cm3leon.cli does it for the scripts)
    cfg = load_model_config(conf_dir, "350m", max_seq_len=2048)   # a ModelConfig, outside Hydra apps
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from cm3leon.errors import UsageError
from cm3leon.model import ModelConfig
from cm3leon.tokenizers.vqgan import VQGANConfig
from cm3leon.tokenizers.vqgan_loss import VQGANLossConfig

MODEL_SCHEMA = "model_schema"  # the name a size yaml lists in its `defaults`


@dataclass
class RecipeConfig:
    """A size's training recipe (read by conf/optim and conf/train.yaml; not architecture)."""

    lr: float = MISSING  # peak learning rate
    warmup_steps: int = MISSING
    global_batch_tokens: int | None = None  # null: keep trainer.accumulate_grad_batches


@dataclass
class ModelSchema(ModelConfig):
    """The `model` node: ModelConfig's fields and defaults, plus the recipe. OmegaConf reads the
    fields only (ModelConfig's checks run when the model is built, `ModelConfig.from_dict`)."""

    # Optional[...] rather than `int | None`: OmegaConf reads these annotations (Python 3.9-safe)
    vocab_size: int | None = None  # null: the data's Vocab.size, set when the model is built
    recipe: RecipeConfig = field(default_factory=RecipeConfig)


# ---- the VQGAN tokenizer's training (conf/train_tokenizer.yaml `module`; the architecture is
# `VQGANConfig`, its losses `VQGANLossConfig`) -------------------------------------------------------
@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)  # taming's, for its GAN phase
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then a cosine to lr * min_lr_ratio at total_steps
    min_lr_ratio: float = 1.0
    total_steps: int = 0  # the cosine's length (0: constant lr); may exceed max_steps
    grad_clip: float = 0.0  # gradient norm clip of the autoencoder (0: off)
    disc_lr: float | None = None  # None: same as lr


@dataclass
class CodebookConfig:
    window: int = 50  # batches over which usage / perplexity / dead codes are counted
    restart_every: int = 0  # restart dead codes every N batches (0: never)
    restart_until: float | None = None  # no restarts from this step on (<= 1: a fraction of total_steps)
    ema: bool = False  # EMA codebook instead of the codebook loss
    ema_decay: float = 0.99


@dataclass
class CropConfig:
    """Train on random crops aligned to the code grid first, full images after (a 32 px crop of a
    64 px image costs 4x less per step)."""

    size: int | None = None  # px; None: full images throughout
    until: float = 0.0  # fraction of total_steps trained on crops


@dataclass
class ValConfig:
    caption_accuracy: bool = False  # score reconstructions with the world's pixel checker
    caption_samples: int = 1000


@dataclass
class VQGANTrainingConfig:
    """The arguments of `VQGANModule` but the architecture: the schema of train_tokenizer's `module`."""

    _target_: str = "cm3leon.lit.vqgan_module.VQGANModule"
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    val: ValConfig = field(default_factory=ValConfig)
    # train post_quant_conv + decoder only: the encoder, quant_conv and codebook are frozen and codes
    # are never restarted, so every code (and every token shard made with them) stays valid
    decoder_only: bool = False


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent): `model/model_schema` (conf/model/*.yaml)
    and `vqgan_architecture` / `vqgan_training` (conf/train_tokenizer.yaml). Call before composing:
    `cm3leon.cli.hydra_entry` does it for every script, tests/conftest.py for the tests."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="model", name=MODEL_SCHEMA, node=ModelSchema)
    cs.store(name="vqgan_architecture", node=VQGANConfig)
    cs.store(name="vqgan_training", node=VQGANTrainingConfig)


def load_model_config(conf_dir: str | Path, size: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of `conf_dir/model/<size>.yaml` with fields overridden (benchmarks, notebooks).

    Composes with Hydra's compose API, so it must not run inside a running Hydra app (there, use
    `ModelConfig.from_dict(cfg.model)`). vocab_size left null becomes the paper's table size.
    """
    from hydra import compose, initialize_config_dir

    register_configs()
    options = sorted(p.stem for p in (Path(conf_dir) / "model").glob("*.yaml"))
    if size not in options:
        raise UsageError(f"unknown model size {size!r}: choose one of {options} (the files in {conf_dir}/model)")
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        node = compose(overrides=[f"+model={size}"]).model
    return ModelConfig.from_dict(node, **overrides)
