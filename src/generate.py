"""Sample from a trained CM3Leon checkpoint (PAPER.md section 5).

    python src/generate.py prompt="a large red circle in the top left" n=8     # the shipped world model
    python src/generate.py task=vqa image=scene.png question="what colour is the circle?"   # the shipped SFT model
    python src/generate.py ckpt=RUN/checkpoints/last.ckpt prompt="..." n=8     # a run of yours
    python src/generate.py ckpt=... prompt="..." n=8 decoding=cdk          # or topp_cfg (default), mixed
    python src/generate.py ckpt=... prompt="..." decoding.guidance_scale=5 decoding.temperature=0.8
    python src/generate.py ckpt=... prompt="..." rerank.enabled=true     # sort by CLIP score, best.png
    python src/generate.py ckpt=... task=caption image=photo.png         # prints the caption
    python src/generate.py ckpt=... task=caption image=photo.png caption.describe=true   # "Describe the given picture."
    python src/generate.py ckpt=... task=vqa image=photo.png question="what colour is the circle?"
    python src/generate.py ckpt=... task=edit image=photo.png instruction="make the circle blue"   # instruct-CFG
    python src/generate.py ckpt=... task=control image=edges.png kind=canny prompt="a large red circle ..."
    python src/generate.py ckpt=... task=grounded prompt="a large red circle ..." boxes="red circle at (3, 3) -> (83, 83)"
    python src/generate.py ckpt=... task=infill image=photo.png infill.region=[4,0,8,8]

Image tasks write every sample (`sample_00.png`, ...), a `grid.png` and `samples.json` (prompt,
decoding, CLIP scores) into the run folder (`hydra.run.dir=DIR`, default logs/generate/runs/DATE).
The instruction-tuning tasks (edit, control, grounded, vqa, caption; PAPER.md section 7) prompt
with the SFT templates (`cm3leon.data.sft_templates`) through `cm3leon.generation.sft`, the
functions the SFT evaluation calls: edit with instruct-CFG (`edit.image_weight` / `edit.text_weight`,
1.5 / 7.5), control and grounded with CFG (`decoding.guidance_scale`, 3), vqa and caption by
infilling; they write `samples.json` (the request, the template text, the outputs) too.
The tokenizers are the ones recorded in the checkpoint (the token shards' meta.json); override
with image_tokenizer=... text_tokenizer=.... Retrieval (`conf/retrieval/checkpoint.yaml`): a checkpoint trained with `retrieval=ra` retrieves
its k documents per prompt by the prompt text from the memory bank it was trained with (recorded
in the checkpoint); `retrieval.k=K` and `retrieval.dir=<tokens>/retrieval` (a memory bank of
`python src/build_index.py`) choose others, `retrieval=none` none. Retrieved documents go before
the prompt and stay in the unconditional stream. The SFT tasks retrieve by the prompt's text
(instruction, caption or question; captioning has none); infilling retrieves nothing.

Everything is loaded by `cm3leon.generation.load_pipeline`; this script checks the command line,
runs one task of `cm3leon.generation.tasks` and writes the results.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cm3leon.cli import UsageError, hydra_entry

TASKS = ("image", "caption", "vqa", "edit", "control", "grounded", "infill")
SFT_TASKS = ("caption", "vqa", "edit", "control", "grounded")  # prompted with the SFT templates


def _open_image(path):
    from PIL import Image

    if not path:
        raise UsageError("this task needs image=PATH")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"image {p} not found: pass image=PATH to an existing image file")
    return Image.open(p)


def _warn_world_clip_rerank(cfg: DictConfig) -> None:
    """The world's tiny CLIP knows only world captions: warn when it re-ranks any other prompt."""
    from cm3leon.data.world import parse_caption
    from cm3leon.lit.checks import warn_world_clip

    try:
        parse_caption(cfg.prompt)
    except ValueError:
        warn_world_clip("rerank", cfg.rerank, f"prompt={cfg.prompt!r} is not an embedded-world caption")


def shipped_model(task: str, shipped_dir) -> tuple[Path, str]:
    """(file, the make target that makes it) of the shipped world model a task uses when no ckpt= is
    given: the instruction-tuned one for the SFT tasks, the pretrained one for the others."""
    name, recipe = ("world_sft", "make sft") if task in SFT_TASKS else ("world_lm", "make world-model")
    return Path(shipped_dir) / f"{name}.safetensors", recipe


def check_command_line(cfg: DictConfig):
    """Input checks first: a wrong command line answers before torch is imported. Returns the
    DecodingConfig; an unset ckpt becomes the task's shipped model."""
    from cm3leon.generation.pipeline import check_checkpoint

    if cfg.task not in TASKS:
        raise UsageError(f"task={cfg.task!r} is not one of {TASKS}")
    if not cfg.ckpt:
        shipped, recipe = shipped_model(cfg.task, cfg.paths.shipped_dir)
        if not shipped.is_file():
            raise UsageError(f"the shipped model {shipped} is missing: `{recipe}` makes it, or pass ckpt=PATH")
        cfg.ckpt = str(shipped)
    if int(cfg.n) < 1:
        raise UsageError(f"n={cfg.n} must be >= 1")
    if cfg.task == "image" and not cfg.prompt:
        raise UsageError(f'task={cfg.task} needs prompt="..."')
    if cfg.task in SFT_TASKS:
        sft_request(cfg)  # its one-line errors: missing instruction, question, kind, boxes, caption
    if cfg.task not in ("image", "grounded"):
        _open_image(cfg.image)
    check_checkpoint(cfg.ckpt)
    if cfg.task == "image" and cfg.rerank.enabled:
        _warn_world_clip_rerank(cfg)
    from cm3leon.generation.sampling import DecodingConfig

    try:
        return DecodingConfig.from_dict(OmegaConf.to_container(cfg.decoding, resolve=True))
    except ValueError as e:
        raise UsageError(str(e)) from None


def sft_request(cfg: DictConfig):
    """The command line of an SFT task as an `SftSample` (its target left empty), or a UsageError."""
    from cm3leon.generation import sft

    task = cfg.task
    try:
        if task == "edit":
            instruction = cfg.get("instruction") or cfg.prompt  # prompt=: the older name, still accepted
            if not instruction:
                raise UsageError('task=edit needs instruction="..." (the edit to make)')
            return sft.edit_request(instruction)
        if task == "vqa":
            if not cfg.question:
                raise UsageError('task=vqa needs question="..."')
            return sft.vqa_request(cfg.question, str(cfg.vqa.template))
        if task == "caption":
            return sft.caption_request(bool(cfg.caption.describe))
        if not cfg.prompt:
            raise UsageError(f'task={task} needs prompt="..." (the caption of the image to make)')
        if task == "control":
            if not cfg.get("kind"):
                raise UsageError("task=control needs kind=canny|seg|... (what the control image shows)")
            return sft.control_request(str(cfg.kind), cfg.prompt)
        boxes = cfg.get("boxes")
        if not boxes:
            raise UsageError(
                "task=grounded needs boxes=[[NAME,x1,y1,x2,y2],...] or boxes='NAME at (x1, y1) -> (x2, y2), ...'"
            )
        boxes = OmegaConf.to_container(boxes, resolve=True) if not isinstance(boxes, str) else boxes
        return sft.grounded_request(cfg.prompt, boxes)
    except ValueError as e:
        raise UsageError(f"task={task}: {e}") from None


def _run_sft(cfg: DictConfig, pipe, decoding, out_dir: Path) -> dict:
    """One SFT task (`cm3leon.generation.sft.sft_generate`): n samples of one request."""
    import dataclasses

    from cm3leon.data.sft_templates import render_sft_text
    from cm3leon.generation.grid import save_samples
    from cm3leon.generation.sft import INPUT_SLOT, sft_generate

    request = sft_request(cfg)
    n, task = int(cfg.n), cfg.task
    images = [{INPUT_SLOT[task]: _open_image(cfg.image).convert("RGB")}] * n if task in INPUT_SLOT else [{}] * n
    out: dict = {"template": request.template, "request": render_sft_text(request)}
    if task in ("caption", "vqa"):
        n = n if float(cfg.caption.temperature) > 0 else 1  # greedy: one answer
        texts = sft_generate(
            pipe,
            [request] * n,
            images[:n],
            max_len=int(cfg.caption.max_len),
            temperature=float(cfg.caption.temperature),
            top_p=cfg.caption.top_p,
            seed=int(cfg.seed),
            batch_size=int(cfg.batch_size),
        )
        for t in dict.fromkeys(texts):
            print(t)
        out.update(image=str(cfg.image), texts=texts)
    else:
        if task == "edit":  # instruct-CFG weights (PAPER.md section 5: image 1.5, text 7.5)
            decoding = dataclasses.replace(
                decoding, image_weight=float(cfg.edit.image_weight), text_weight=float(cfg.edit.text_weight)
            )
        generated = sft_generate(
            pipe, [request] * n, images, decoding=decoding, seed=int(cfg.seed), batch_size=int(cfg.batch_size)
        )
        grid = save_samples(out_dir, generated, task)
        out.update(n=n, grid=str(grid), decoding=decoding.to_dict())
        if task != "grounded":
            out["image"] = str(cfg.image)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "samples.json").write_text(json.dumps({"task": task, **out}, indent=1))
    return out


def run(cfg: DictConfig) -> dict:
    """Run one generation task; returns a summary dict (also printed as one JSON line)."""
    decoding = check_command_line(cfg)
    import torch
    from hydra.core.hydra_config import HydraConfig

    from cm3leon.generation import tasks
    from cm3leon.generation.grid import save_samples
    from cm3leon.generation.pipeline import load_pipeline, resolve_device

    device = resolve_device(cfg.device)
    torch.set_num_threads(min(torch.get_num_threads(), int(cfg.cpu_threads)))
    # image and SFT prompts retrieve by their text (SFT: `retrieval_query`); infilling retrieves nothing
    retrieval = OmegaConf.to_container(cfg.retrieval, resolve=True) if cfg.task != "infill" else {"k": 0}
    pipe = load_pipeline(cfg.ckpt, device, cfg.precision, cfg.image_tokenizer, cfg.text_tokenizer, retrieval)
    image_tok, text_tok = pipe.image_tokenizer, pipe.text_tokenizer
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    n, seed = int(cfg.n), int(cfg.seed)
    summary: dict = {"task": cfg.task, "ckpt": str(cfg.ckpt), "out_dir": str(out_dir)}

    if cfg.task == "image":
        docs = pipe.retrieve([cfg.prompt])
        if docs is not None:
            print(f"[generate] {len(docs[0])} retrieved documents from {pipe.retriever.folder} go before the prompt")
        from tqdm import tqdm

        bar = tqdm(total=n * pipe.tokens_per_image, desc="generate", unit="tok", disable=not cfg.get("progress", True))
        codes = tasks.generate_images(
            pipe.model,
            pipe.vocab,
            pipe.encode_captions([cfg.prompt]) * n,
            pipe.tokens_per_image,
            decoding=decoding,
            seed=seed,
            retrieved=None if docs is None else docs * n,
            batch_size=int(cfg.batch_size),
            cuda_graph=bool(cfg.cuda_graph),
            progress=lambda done, total: bar.update(done - bar.n),
        )
        bar.close()
        images = image_tok.decode(codes)
        scores = None
        if cfg.rerank.enabled:
            from cm3leon.generation.rerank import ClipReranker
            from cm3leon.tokenizers.image_processing import postprocess_pil

            reranker = ClipReranker(cfg.rerank.model_name, cfg.rerank.pretrained, device=device)
            scores = reranker.scores(postprocess_pil(images), [cfg.prompt] * n).tolist()
        grid = save_samples(out_dir, images, "sample", scores)
        summary.update(
            prompt=cfg.prompt,
            n=n,
            grid=str(grid),
            n_retrieved=len(docs[0]) if docs else 0,
            decoding=decoding.to_dict(),
            clip_scores=scores,
        )
        (out_dir / "samples.json").write_text(json.dumps(summary, indent=1))
    elif cfg.task in SFT_TASKS:
        summary.update(_run_sft(cfg, pipe, decoding, out_dir))
    else:  # infill
        src = image_tok.encode([_open_image(cfg.image)])
        g = image_tok.latent_size
        region = list(cfg.infill.region) if cfg.infill.region is not None else [g // 2, 0, g, g]
        if len(region) != 4:
            raise UsageError(f"infill.region={region} must be [top, left, bottom, right] in code-grid cells")
        try:
            spans = tasks.image_region_spans(g, *map(int, region))
        except ValueError as e:
            raise UsageError(str(e)) from None
        text = [text_tok.encode(cfg.prompt)] * n if cfg.prompt else None
        codes = tasks.infill_images(
            pipe.model,
            pipe.vocab,
            src.repeat(n, 1),
            spans,
            text_ids=text,
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            top_k=decoding.top_k,
            seed=seed,
        )
        grid = save_samples(out_dir, image_tok.decode(codes), "infill")
        summary.update(image=str(cfg.image), region=region, grid=str(grid))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("decoding", "clip_scores", "texts")}))
    return summary


@hydra_entry("generate", __file__)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
