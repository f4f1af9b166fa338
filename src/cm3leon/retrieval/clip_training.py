"""Training of the embedded world's tiny open_clip model (the logic of `src/train_clip.py`,
conf/train_clip.yaml): `train_clip(cfg)` trains with open_clip's `ClipLoss`, scores text->image and
image->text recall@k on the validation pairs, and writes the weights only when val text->image
recall@5 reaches `min_recall_at_5`.

Why a plain loop and not Lightning: the whole data set fits in memory as one uint8 tensor (no
DataLoader, no workers), one device, minutes; a loop of 30 lines is the clearest form here.
Images are not augmented: flips and crops would change the captions' positions. World captions
get two augmentations that raise the weight of a shape's kind in the embedding (object-only
captions, kind-swapped counterfactual pairs re-rendered by the world): see conf/train_clip.yaml.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cm3leon.data.checked_reader import iter_raw_samples
from cm3leon.retrieval.clip_encoder import recall_at_k
from cm3leon.retrieval.tiny_clip import TINY_CLIP, register_tiny_clip
from cm3leon.tokenizers.image_processing import resize_center_crop


def load_pairs(shards: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """Raw shards -> (uint8 [N, 3, size, size] images, N captions)."""
    images, captions = [], []
    for s in iter_raw_samples(shards):
        images.append(np.asarray(resize_center_crop(s.image, size), dtype=np.uint8))
        captions.append(s.caption)
    if not images:
        raise FileNotFoundError(f"no samples in {shards}")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


class Normalizer:
    """uint8 [B, 3, S, S] -> the model's normalised float input (open_clip's mean/std)."""

    def __init__(self, model):
        cfg = model.visual.preprocess_cfg
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


@torch.inference_mode()
def evaluate(model, norm: Normalizer, images: torch.Tensor, tokens: torch.Tensor, batch: int = 500) -> dict:
    """Recall@{1,5,10} text->image and image->text over all pairs."""
    model.eval()
    img = torch.cat(
        [model.encode_image(norm(images[s : s + batch]), normalize=True) for s in range(0, len(images), batch)]
    )
    txt = torch.cat([model.encode_text(tokens[s : s + batch], normalize=True) for s in range(0, len(tokens), batch)])
    model.train()
    t2i = recall_at_k(txt.numpy(), img.numpy())
    i2t = recall_at_k(img.numpy(), txt.numpy())
    return {**{f"t2i_{k}": round(v, 4) for k, v in t2i.items()}, **{f"i2t_{k}": round(v, 4) for k, v in i2t.items()}}


def object_caption(caption: str) -> str | None:
    """The world caption reduced to its objects: 'a red circle and a blue square on a white
    background' (no sizes, no positions); None when the caption is not a world caption."""
    from cm3leon.data.world import parse_caption

    try:
        scene = parse_caption(caption)
    except ValueError:
        return None
    objects = " and ".join(f"a {s.colour} {s.kind}" for s in scene.shapes)
    return f"{objects} on a {scene.background} background"


def kind_swaps(captions: list[str], size: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """Counterfactual pairs of world captions: one shape's kind changed, re-rendered with the
    world's own renderer. Returns (uint8 [M, 3, size, size] images, M captions); captions that are
    not world captions are skipped."""
    from cm3leon.data.world import KINDS, Scene, caption, parse_caption, render

    images, texts = [], []
    for c in captions:
        try:
            scene = parse_caption(c)
        except ValueError:
            continue
        j = int(rng.integers(len(scene.shapes)))
        shape = scene.shapes[j]
        kind = [k for k in KINDS if k != shape.kind][int(rng.integers(len(KINDS) - 1))]
        shapes = list(scene.shapes)
        shapes[j] = type(shape)(kind, shape.colour, shape.size, shape.position)
        new = Scene(scene.background, tuple(shapes))
        images.append(render(new, size))
        texts.append(caption(new))
    if not images:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), []
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), texts


def lr_at(step: int, total: int, cfg: DictConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_clip(cfg: DictConfig) -> dict:
    import open_clip

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    # open_clip logs every factory step at INFO, and warns that this new model has random weights
    logging.getLogger().setLevel(logging.ERROR)
    if cfg.model == TINY_CLIP:
        register_tiny_clip()
    if cfg.data.embedded_world:
        from cm3leon.data.world import ensure_world

        ensure_world(out_dir=str(Path(cfg.data.train_shards).parent))
    model = open_clip.create_model(cfg.model, device=cfg.device)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    norm = Normalizer(model)

    t0 = time.time()
    train_x, train_caps = load_pairs(cfg.data.train_shards, size)
    val_x, val_caps = load_pairs(cfg.data.val_shards, size)
    train_t, val_t = tokenizer(train_caps), tokenizer(val_caps)
    print(
        f"[train_clip] {len(train_caps)} train / {len(val_caps)} val pairs loaded in {time.time() - t0:.0f} s",
        flush=True,
    )

    # no weight decay on gains, biases, embeddings and the temperature (open_clip's training recipe)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = open_clip.ClipLoss()
    steps_per_epoch = len(train_caps) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    rng = np.random.default_rng(cfg.seed)
    history, step, t0 = [], 0, time.time()
    model.train()
    # object captions: see conf/train_clip.yaml `object_caption_rate`
    short = [object_caption(c) for c in train_caps] if cfg.object_caption_rate > 0 else [None] * len(train_caps)
    short_t = tokenizer([s or c for s, c in zip(short, train_caps)])
    has_short = torch.tensor([s is not None for s in short])
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(rng.permutation(len(train_caps)))
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            n_swap = int(cfg.kind_swap_rate * len(idx))
            if n_swap:  # the last n_swap places hold kind-swapped copies of the first n_swap pairs
                idx = idx[: len(idx) - n_swap]
            use_short = has_short[idx] & torch.from_numpy(rng.random(len(idx)) < cfg.object_caption_rate)
            texts = torch.where(use_short[:, None], short_t[idx], train_t[idx])
            images = train_x[idx]
            if n_swap:
                swap_x, swap_caps = kind_swaps([train_caps[i] for i in idx[:n_swap].tolist()], size, rng)
                images = torch.cat([images, swap_x])
                texts = torch.cat([texts, tokenizer(swap_caps)])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            img_f, txt_f, scale = model(norm(images).to(cfg.device), texts.to(cfg.device))[:3]
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # open_clip's clamp
            step += 1
            if cfg.print_every and step % cfg.print_every == 0:
                print(
                    f"[train_clip] epoch {epoch} step {step}/{total} loss {loss.item():.3f} "
                    f"scale {scale.item():.1f} {time.time() - t0:.0f} s",
                    flush=True,
                )
        if (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs:
            metrics = evaluate(model, norm, val_x, val_t)
            history.append({"epoch": epoch + 1, "step": step, "seconds": round(time.time() - t0, 1), **metrics})
            print(f"[train_clip] val {json.dumps(history[-1])}", flush=True)

    final = history[-1]
    result = {"model": cfg.model, "train_seconds": round(time.time() - t0, 1), **final}
    if final["t2i_r@5"] < cfg.min_recall_at_5:
        print(
            f"error: val text->image recall@5 {final['t2i_r@5']} < min_recall_at_5={cfg.min_recall_at_5}; "
            f"{cfg.out} not written (train longer: epochs=...)",
            file=sys.stderr,
        )
        sys.exit(1)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ckpt = {
        "state_dict": state,
        "model_name": cfg.model,
        "model_cfg": open_clip.get_model_config(cfg.model),
        "metrics": history,
        "train_cfg": OmegaConf.to_container(cfg, resolve=True),
    }
    tmp = out.with_name(out.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    print(json.dumps({**result, "out": str(out), "bytes": out.stat().st_size}))
    return result
