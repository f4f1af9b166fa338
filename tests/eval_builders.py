"""Builders of random-initialised evaluation artefacts (LM checkpoint, tiny VQGAN, tiny CLIP) and of
the eval_fid config, shared by the test_eval_* files (the fixture is in conftest.py).

Everything is random-initialised and saved to a temp dir; the numbers mean nothing, the pipeline
is what is tested."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from project import CONF_DIR, SHIPPED_DIR

CONF = CONF_DIR
BPE = SHIPPED_DIR / "world_bpe.json"


def make_tiny_clip(path: Path) -> Path:
    """A random-initialised world tiny CLIP saved as an open_clip state dict."""
    import open_clip

    from cm3leon.retrieval.tiny_clip import TINY_CLIP, register_tiny_clip

    register_tiny_clip()
    torch.manual_seed(0)
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), path)
    return path


def make_tiny_vqgan(path: Path) -> Path:
    """A random tiny VQGAN (the package config "tiny": 64 px -> 8x8 codes) with its config yaml beside it."""
    from cm3leon.tokenizers.image_tokenizer import CONFIG_DIR, ImageTokenizer

    torch.manual_seed(0)
    tok = ImageTokenizer.from_config("tiny")
    torch.save(tok.model.state_dict(), path)
    path.with_suffix(".yaml").write_text((CONFIG_DIR / "tiny.yaml").read_text())
    return path


def make_tiny_lm(path: Path, vqgan: Path, max_seq_len: int = 128, retrieval: dict | None = None) -> Path:
    """A random 2-layer CM3Leon saved through CM3LeonLitModule, its data_meta naming the tokenizers
    (and `retrieval` = {k, folder}: the memory bank of a run trained with retrieval)."""
    import lightning as L

    from cm3leon.lit.lm_module import CM3LeonLitModule
    from cm3leon.tokenizers.text_tokenizer import TextTokenizer
    from cm3leon.vocab import Vocab

    text = TextTokenizer.from_file(BPE)
    from cm3leon.tokenizers.image_tokenizer import ImageTokenizer

    n_codes = ImageTokenizer.from_checkpoint(vqgan).n_codes
    vocab = Vocab(text_size=text.vocab_size, n_image_codes=n_codes, n_sentinels=16)
    optim = dict(
        lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, warmup_steps=1, final_lr_ratio=0.1, max_steps=1
    )
    meta = {"tokens_per_image": 64, "image_tokenizer": {"path": str(vqgan)}, "text_tokenizer": {"path": str(BPE)}}
    if retrieval:
        meta["retrieval"] = retrieval
    torch.manual_seed(0)
    module = CM3LeonLitModule(
        model=dict(name="test", n_layer=2, d_model=64, n_head=2, max_seq_len=max_seq_len),
        vocab=vocab.to_dict(),
        optim=optim,
        data_meta=meta,
    )
    # zero-initialised residual outputs make a fresh model ignore its prompt: give them weights
    with torch.no_grad():
        for p in module.model.parameters():
            if p.dim() == 2 and float(p.abs().sum()) == 0:
                p.normal_(std=0.02)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


def compose_eval(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("eval_fid", overrides=overrides)


def embedded_overrides(run: dict, log_dir: Path, n: int = 4) -> list[str]:
    clip = str(run["clip"])
    return [
        "eval=embedded",
        f"ckpt={run['ckpt']}",
        f"paths.log_dir={log_dir}",
        f"cache_dir={log_dir / 'cache'}",
        f"eval.n_captions={n}",
        "eval.samples_per_caption=2",
        "captions_per_batch=4",
        "progress=false",
        f"eval.feature_clip.pretrained={clip}",
        f"eval.rerank.pretrained={clip}",
        f"eval.clip_score.pretrained={clip}",
        "fid.kid_subsets=5",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
    ]


def all_filled(obj, where="fid.json") -> list[str]:
    """Paths of every None / empty value in a JSON-like object."""
    if obj is None or obj == "" or obj == {} or obj == []:
        return [where]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in all_filled(v, f"{where}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in all_filled(v, f"{where}[{i}]")]
    return []
