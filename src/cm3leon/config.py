"""Typed Hydra schemas of the main job's config groups, registered in Hydra's ConfigStore.

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


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent). Call before composing a config that
    uses the `model` group: `cm3leon.cli.hydra_entry` does it for every script, tests/conftest.py
    for the tests."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="model", name=MODEL_SCHEMA, node=ModelSchema)


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
