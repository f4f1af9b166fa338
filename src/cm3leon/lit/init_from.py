"""Start a run from a pretrained model's weights: `ckpt_init=PATH` (instruction tuning, PAPER.md section 7).

    python src/train.py experiment=sft_world ckpt_init=data/shipped/world_lm.safetensors

`ckpt_init` is a training checkpoint (.ckpt) or a weights-only file (.safetensors, `cm3leon.lm_weights`).

- Before anything reads the config (`init_for_run`, from src/train.py): the architecture comes from
  the checkpoint's hyperparameters (every `model` field but the runtime ones, RUNTIME_FIELDS, so
  `model=` need not be repeated), and so does the vocabulary layout (`data.vocab`: base_size,
  sentinels, padding; the sizes come from the data's tokenizers). data.seq_len must fit the
  checkpoint's position table.
- When the model is built (`load_init_weights`, from `CM3LeonLitModule.configure_model`): the
  weights are read by the one checkpoint reader (`generation.pipeline.load_lm`) and copied in; the
  optimizer, scheduler and step are not (the run starts at step 0 with a fresh optimizer). A
  vocabulary, tokenizer or tensor-shape mismatch with the data is refused in one line (the
  vocabulary before Lightning loads when the data's shards already exist, `check_data_vocab`).
- Resuming wins: a run that resumes (`ckpt_path=PATH`, or `ckpt_path=last` with a last.ckpt in the
  run's checkpoint folder) loads its own checkpoint, and ckpt_init's weights are ignored, with a
  note (`resume_checkpoint`: the same rule Lightning applies to `last`). So one command line both
  starts and resumes an SFT run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from cm3leon.errors import UsageError

# model fields that are how the model runs, not what it is: the composed config's values are kept
RUNTIME_FIELDS = ("attn_impl", "activation_checkpointing", "dropout", "recipe", "vocab_size")
VOCAB_LAYOUT = ("base_size", "n_sentinels", "pad_multiple")  # Vocab fields data.vocab may set


def init_hparams(path: str | Path) -> dict:
    """{'model', 'vocab', ...}: the hyperparameters a checkpoint or weights file records, read
    without its weights (a .ckpt memory-mapped, a .safetensors header)."""
    from cm3leon.generation.pipeline import check_checkpoint

    if not Path(str(path)).expanduser().exists():
        raise UsageError(
            f"ckpt_init={path} not found: pass a pretrained model (RUN/checkpoints/last.ckpt or a .safetensors; "
            "the shipped world model: `make world-model`)"
        )
    path = check_checkpoint(path)
    if path.suffix == ".safetensors":
        from cm3leon.lm_weights import read_lm_weights

        hp = read_lm_weights(path, tensors=False)[1]  # tokenizer paths resolved against the file's folder
    else:
        from cm3leon.safe_load import load_weights_only

        container = load_weights_only(path, "checkpoint", mmap=True)
        hp = (container.get("hyper_parameters") if isinstance(container, Mapping) else None) or {}
    if not hp.get("model") or not hp.get("vocab"):
        raise UsageError(
            f"ckpt_init={path} records no model and vocab hyperparameters: pass a CM3Leon training checkpoint "
            "(RUN/checkpoints/last.ckpt) or weights file (src/convert_checkpoint.py)"
        )
    return dict(hp)


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint this run resumes from: ckpt_path, or for `last` the newest last*.ckpt of the
    run's checkpoint folder (none there: the run starts fresh, as Lightning does)."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    if ckpt_path != "last":
        return Path(str(ckpt_path))
    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath") or f"{cfg.paths.output_dir}/checkpoints"
    found = sorted(Path(folder).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def vocab_layout(vocab: Mapping) -> dict:
    """The `data.vocab` fields of a checkpoint's vocabulary: sentinels and padding, and base_size when it
    leaves a gap after the image codes (as the paper's 65,536): a default base_size is left to the data's
    sizes, so that other tokenizers meet the one-line vocabulary check, not a Vocab error."""
    layout = {k: vocab[k] for k in VOCAB_LAYOUT}
    if layout["base_size"] == vocab["text_size"] + vocab["n_image_codes"]:
        del layout["base_size"]
    return layout


def apply_init_config(cfg: DictConfig, hp: Mapping) -> None:
    """Set cfg.model's architecture and cfg.data.vocab's layout from the checkpoint's hyperparameters."""
    arch = {k: v for k, v in hp["model"].items() if k in cfg.model and k not in RUNTIME_FIELDS}
    with open_dict(cfg):
        for key, value in arch.items():
            cfg.model[key] = value
        if "vocab" in cfg.data:
            cfg.data.vocab = vocab_layout(hp["vocab"])
    if int(cfg.data.seq_len) > int(cfg.model.max_seq_len):
        raise UsageError(
            f"data.seq_len={cfg.data.seq_len} exceeds the position table of ckpt_init ({cfg.model.max_seq_len} "
            "positions): lower data.seq_len"
        )


def init_for_run(cfg: DictConfig) -> str | None:
    """Apply ckpt_init to the composed config (architecture, vocabulary layout); return the path to
    load weights from, or None without ckpt_init or when the run resumes (ckpt_path wins; a note says so)."""
    init = cfg.get("ckpt_init")
    if init == "scratch":
        return None
    if not init:
        if "sources" in cfg.data and not cfg.get("dry_run") and resume_checkpoint(cfg) is None:
            raise UsageError(
                "instruction tuning starts from a pretrained model: pass ckpt_init=PATH (a .ckpt or .safetensors); "
                "ckpt_init=scratch trains from random weights"
            )
        return None
    path = str(init)
    hp = init_hparams(path)
    apply_init_config(cfg, hp)
    m = cfg.model
    print(
        f"[init] architecture from ckpt_init={path}: {m.name}, n_layer {m.n_layer}, d_model {m.d_model}, "
        f"n_head {m.n_head}, max_seq_len {m.max_seq_len}",
        flush=True,
    )
    if "vocab" in cfg.data and not cfg.data.get("embedded_world", True):
        check_data_vocab(cfg, hp, path)  # the shards are final: a mismatch stops here, before Lightning loads
    resumed = resume_checkpoint(cfg)
    if resumed is not None:
        print(f"[init] note: resuming from {resumed}: ckpt_init's weights are ignored (the run's own are loaded)")
        return None
    return path


def check_vocab(init: Mapping, data: Mapping, path: str | Path) -> None:
    """The checkpoint's vocabulary (a `Vocab.to_dict()`, or its sizes) must be the data's: one line naming
    the fields that differ."""
    diff = [k for k in data if init.get(k) != data[k]]
    if diff:
        theirs = ", ".join(f"{k} {init.get(k)}" for k in diff)
        ours = ", ".join(f"{k} {data[k]}" for k in diff)
        raise UsageError(
            f"ckpt_init={path} does not read the data's tokens: its vocabulary has {theirs}, the data's {ours} "
            "(make the SFT shards with the checkpoint's tokenizers: python src/make_sft_shards.py ckpt=PATH)"
        )


def check_tokenizers(init_meta: Mapping, data_meta: Mapping, path: str | Path) -> None:
    """The data's tokenizer files must be the checkpoint's (compared by sha256 when both record it)."""
    for key in ("image_tokenizer", "text_tokenizer"):
        theirs, ours = ((m.get(key) or {}).get("sha256") for m in (init_meta, data_meta))
        if theirs and ours and theirs != ours:
            raise UsageError(
                f"ckpt_init={path} was trained with another {key} than the data's ({data_meta[key].get('path')}): "
                "make the SFT shards with the checkpoint's tokenizers (python src/make_sft_shards.py ckpt=PATH)"
            )


def check_data_vocab(cfg: DictConfig, hp: Mapping, path: str) -> None:
    """Compare the checkpoint's vocabulary and tokenizers with the data's token shards (their
    meta.json), when they exist."""
    from cm3leon.data.token_shards import load_token_vocab, read_meta

    tokens = Path(str(cfg.data.tokens_dir))
    if not ((tokens / "train" / "meta.json").is_file() and (tokens / "val" / "meta.json").is_file()):
        return  # the DataModule says what is missing
    meta = read_meta(tokens / "train")
    check_vocab(hp["vocab"], meta["vocab"], path)  # other tokenizer sizes: refused before a layout is applied
    check_tokenizers(hp.get("data_meta") or {}, meta, path)
    data_vocab, _ = load_token_vocab(tokens / "train", tokens / "val", **cfg.data.vocab)
    check_vocab(hp["vocab"], data_vocab.to_dict(), path)


def load_init_weights(module, path: str | Path) -> None:
    """Copy the weights of `path` into `module.model` (a CM3LeonLitModule whose model is built):
    the vocabulary, tokenizers (when both record hashes) and every tensor shape must match."""
    import torch

    from cm3leon.generation.pipeline import load_lm

    model, vocab, meta = load_lm(path)
    check_vocab(vocab.to_dict(), module.vocab.to_dict(), path)
    check_tokenizers(meta, module.hparams.get("data_meta") or {}, path)
    state, mine = model.state_dict(), module.model.state_dict()
    for name in sorted(set(state) | set(mine)):
        a, b = state.get(name), mine.get(name)
        if a is None or b is None or tuple(a.shape) != tuple(b.shape):
            raise UsageError(
                f"ckpt_init={path}: tensor {name} is {None if a is None else tuple(a.shape)} there and "
                f"{None if b is None else tuple(b.shape)} in the model built for this run: the architectures differ"
            )
    sharded = any(type(p).__name__ == "DTensor" for p in module.model.parameters())
    if sharded:  # FSDP2 (trainer=fsdp2): every rank holds the full state, each keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module.model, state, options=StateDictOptions(full_state_dict=True))
    else:
        with torch.no_grad():
            module.model.load_state_dict(state, strict=True)
    print(f"[init] loaded the weights of {path} (optimizer, schedule and step start fresh)", flush=True)
