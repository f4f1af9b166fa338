"""Sample from a trained CM3Leon checkpoint (PAPER.md section 5).

    python src/generate.py ckpt=RUN/checkpoints/last.ckpt prompt="a large red circle in the top left" n=8
    python src/generate.py ckpt=... prompt="..." n=8 decoding=cdk          # or topp_cfg (default), mixed
    python src/generate.py ckpt=... prompt="..." decoding.cfg_weight=5 decoding.temperature=0.8
    python src/generate.py ckpt=... prompt="..." rerank.enabled=true     # sort by CLIP score, best.png
    python src/generate.py ckpt=... task=caption image=photo.png         # prints the caption
    python src/generate.py ckpt=... task=vqa image=photo.png question="what colour is the circle?"
    python src/generate.py ckpt=... task=edit image=photo.png prompt="make the circle blue"
    python src/generate.py ckpt=... task=infill image=photo.png infill.region=[4,0,8,8]

Image tasks write every sample (`sample_00.png`, ...), a `grid.png` and `samples.json` (prompt,
decoding, CLIP scores) into the run folder (`hydra.run.dir=DIR`, default logs/generate/runs/DATE).
The tokenizers are the ones recorded in the checkpoint (the token shards' meta.json); override
with image_tokenizer=... text_tokenizer=.... Retrieval (for checkpoints trained with it):
`retrieval.folder=<tokens>/retrieval` (the memory bank of `python src/build_index.py`) retrieves
`retrieval.k` documents by the prompt text; they go before the prompt and stay in the
unconditional stream. Without it, a checkpoint trained with `retrieval=ra` uses the memory bank it
was trained with (recorded in the checkpoint) when that is still on disk.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cm3leon.cli import UsageError, hydra_entry
from cm3leon import PROJECT_ROOT

TASKS = ("image", "caption", "vqa", "edit", "infill")



def _resolve(path: str | Path) -> Path:
    """Absolute as given; relative to the repository root otherwise (paths recorded in checkpoints)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def _check_checkpoint(path) -> Path:
    if not path:
        raise UsageError("no checkpoint given: pass ckpt=PATH (a training run's checkpoints/last.ckpt; "
                         "`python src/train.py` makes one)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"checkpoint {p} not found: pass ckpt=PATH to an existing .ckpt "
                         "(a training run's checkpoints/last.ckpt; `python src/train.py` makes one)")
    return p


def load_checkpoint(path, device: str = "cpu", precision: str = "auto"):
    """(model in eval mode, vocab, data_meta) from a CM3LeonLitModule checkpoint."""
    path = _check_checkpoint(path)
    import torch

    from cm3leon.lit.lm_module import CM3LeonLitModule

    module = CM3LeonLitModule.load_from_checkpoint(str(path), map_location="cpu")
    model = module.model.eval().requires_grad_(False)
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    model = model.to(device=device, dtype=dtype)
    return model, module.vocab, dict(module.hparams.get("data_meta") or {})


def load_tokenizers(cfg: DictConfig, meta: dict, device: str = "cpu"):
    """(ImageTokenizer, TextTokenizer) from the config override or the checkpoint's data meta."""
    from cm3leon.tokenizers.image_tokenizer import ImageTokenizer
    from cm3leon.tokenizers.text_tokenizer import TextTokenizer

    def path_of(key: str) -> Path:
        given = cfg.get(key) or (meta.get(key) or {}).get("path")
        if not given:
            raise UsageError(f"the checkpoint records no {key}; pass {key}=PATH")
        return _resolve(given)

    return ImageTokenizer.from_checkpoint(path_of("image_tokenizer"), device=device), \
        TextTokenizer.from_file(path_of("text_tokenizer"))


def _retrieved(cfg: DictConfig, text: str, device: str, trained: dict | None = None):
    """The retrieved documents for a prompt text (PAPER.md: retrieval by the prompt text), or None.

    `retrieval.folder`: a memory bank from `python src/build_index.py` (cm3leon.retrieval.Retriever);
    or `retrieval.retriever`: any `_target_` whose object has documents(prompts, k) -> list[list[Document]].
    Neither given: the memory bank the checkpoint was trained with (`trained`, recorded by train.py
    under retrieval=ra), when it is still on disk; a checkpoint trained without retrieval gets none."""
    k = int(cfg.retrieval.k)
    folder = cfg.retrieval.get("folder")
    if not (folder or cfg.retrieval.get("retriever")) and trained:
        if Path(trained["folder"]).is_dir():
            folder = trained["folder"]
            print(f"[generate] retrieving {k} documents per prompt from {folder} (the checkpoint's memory bank)")
        else:
            print(f"[generate] warning: the checkpoint was trained with retrieval but its memory bank "
                  f"{trained['folder']} is gone: generating without retrieved documents "
                  "(pass retrieval.folder=<tokens>/retrieval from `python src/build_index.py`)", file=sys.stderr)
    if k <= 0 or not (folder or cfg.retrieval.get("retriever")):
        return None
    if folder:
        from cm3leon.retrieval.retriever import Retriever

        folder = _resolve(folder)
        if not folder.is_dir():
            raise UsageError(f"retrieval.folder={folder} not found: build the memory bank with `python src/build_index.py`")
        retriever = Retriever(folder, k=k, device=device)
    else:
        retriever = hydra.utils.instantiate(cfg.retrieval.retriever)
    return list(retriever.documents([text], k)[0])


def _open_image(path) -> "Image.Image":  # noqa: F821
    from PIL import Image

    if not path:
        raise UsageError("this task needs image=PATH")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"image {p} not found: pass image=PATH to an existing image file")
    return Image.open(p)


def _write_images(out_dir: Path, images, name: str, scores=None) -> Path:
    """Each image as NAME_XX.png plus grid.png (images float [N, 3, H, W] in [-1, 1])."""
    from torchvision.utils import make_grid, save_image

    out_dir.mkdir(parents=True, exist_ok=True)
    x = (images.float().clamp(-1, 1) + 1) / 2
    for i, im in enumerate(x):
        save_image(im, out_dir / f"{name}_{i:02d}.png")
    order = list(range(len(x))) if scores is None else sorted(range(len(x)), key=lambda i: -scores[i])
    grid = out_dir / "grid.png"
    save_image(make_grid(x[order], nrow=min(8, len(x)), padding=2, pad_value=1.0), grid)
    if scores is not None:
        save_image(x[order[0]], out_dir / "best.png")
    return grid


def run(cfg: DictConfig) -> dict:
    """Run one generation task; returns a summary dict (also printed as one JSON line)."""
    # input checks first: a wrong command line answers before torch is imported
    if cfg.task not in TASKS:
        raise UsageError(f"task={cfg.task!r} is not one of {TASKS}")
    if int(cfg.n) < 1:
        raise UsageError(f"n={cfg.n} must be >= 1")
    if cfg.task in ("image", "edit") and not cfg.prompt:
        raise UsageError(f'task={cfg.task} needs prompt="..."')
    if cfg.task == "vqa" and not cfg.question:
        raise UsageError('task=vqa needs question="..."')
    if cfg.task != "image":
        _open_image(cfg.image)
    _check_checkpoint(cfg.ckpt)

    import torch

    from cm3leon.decoding import (
        DecodingConfig, caption_images, edit_images, generate_images, image_region_spans, infill_images,
    )

    try:
        decoding = DecodingConfig.from_dict(OmegaConf.to_container(cfg.decoding, resolve=True))
    except ValueError as e:
        raise UsageError(str(e)) from None
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(min(torch.get_num_threads(), int(cfg.cpu_threads)))
    model, vocab, meta = load_checkpoint(cfg.ckpt, device, cfg.precision)
    image_tok, text_tok = load_tokenizers(cfg, meta, device)
    if image_tok.n_codes != vocab.n_image_codes:
        raise UsageError(f"image tokenizer has {image_tok.n_codes} codes but the model was trained with "
                         f"{vocab.n_image_codes}; pass the matching image_tokenizer=PATH")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    tpi = image_tok.tokens_per_image
    n, seed = int(cfg.n), int(cfg.seed)
    summary: dict = {"task": cfg.task, "ckpt": str(cfg.ckpt), "out_dir": str(out_dir)}

    if cfg.task == "image":
        text_ids = text_tok.encode(cfg.prompt)
        docs = _retrieved(cfg, cfg.prompt, device, meta.get("retrieval"))
        codes = generate_images(
            model, vocab, [text_ids] * n, tpi, decoding=decoding, seed=seed,
            retrieved=None if docs is None else [docs] * n, batch_size=int(cfg.batch_size),
            cuda_graph=bool(cfg.cuda_graph),
        )
        images = image_tok.decode(codes)
        scores = None
        if cfg.rerank.enabled:
            from cm3leon.rerank import ClipReranker
            from cm3leon.tokenizers.image_processing import postprocess_pil

            reranker = ClipReranker(cfg.rerank.model_name, cfg.rerank.pretrained, device=device)
            scores = reranker.scores(postprocess_pil(images), [cfg.prompt] * n).tolist()
        grid = _write_images(out_dir, images, "sample", scores)
        summary.update(prompt=cfg.prompt, n=n, grid=str(grid), n_retrieved=len(docs or []),
                       decoding=decoding.to_dict(), clip_scores=scores)
        (out_dir / "samples.json").write_text(json.dumps(summary, indent=1))
    elif cfg.task in ("caption", "vqa"):
        codes = image_tok.encode([_open_image(cfg.image)])
        if cfg.task == "caption":
            before = text_tok.encode(cfg.caption.prefix) if cfg.caption.prefix else []
            after: list[int] = []
        else:
            before, after = text_tok.encode(f"Question: {cfg.question} Answer:"), text_tok.encode(".")
        n = n if float(cfg.caption.temperature) > 0 else 1  # greedy: one answer
        ids = caption_images(
            model, vocab, codes.repeat(n, 1), text_before=before, text_after=after, max_len=int(cfg.caption.max_len),
            temperature=float(cfg.caption.temperature), top_p=cfg.caption.top_p, seed=seed,
        )
        texts = [text_tok.decode(t).strip() for t in ids]
        summary.update(image=str(cfg.image), texts=texts)
        for t in dict.fromkeys(texts):
            print(t)
    elif cfg.task == "edit":
        src = image_tok.encode([_open_image(cfg.image)])
        codes = edit_images(
            model, vocab, text_tok.encode(cfg.edit.prefix), src.repeat(n, 1), [text_tok.encode(cfg.prompt)] * n,
            decoding=decoding, seed=seed,
        )
        grid = _write_images(out_dir, image_tok.decode(codes), "edit")
        summary.update(prompt=cfg.prompt, image=str(cfg.image), grid=str(grid), decoding=decoding.to_dict())
    else:  # infill
        src = image_tok.encode([_open_image(cfg.image)])
        g = image_tok.latent_size
        region = list(cfg.infill.region) if cfg.infill.region is not None else [g // 2, 0, g, g]
        if len(region) != 4:
            raise UsageError(f"infill.region={region} must be [top, left, bottom, right] in code-grid cells")
        try:
            spans = image_region_spans(g, *map(int, region))
        except ValueError as e:
            raise UsageError(str(e)) from None
        text = [text_tok.encode(cfg.prompt)] * n if cfg.prompt else None
        codes = infill_images(model, vocab, src.repeat(n, 1), spans, text_ids=text,
                              temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k, seed=seed)
        grid = _write_images(out_dir, image_tok.decode(codes), "infill")
        summary.update(image=str(cfg.image), region=region, grid=str(grid))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("decoding", "clip_scores", "texts")}))
    return summary


@hydra_entry("generate", __file__)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
