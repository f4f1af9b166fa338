"""Resumable, multi-device sample generation for evaluation prompts (Lightning predict; the prompt
sets themselves are in `cm3leon.eval.prompts`).

    prompts = coco_prompts("captions_val2014.json", n=30_000, seed=0)        # or world_prompts(...)
    module = GenerationModule(ckpt_path, out_dir / "images", decoding={...}, samples_per_caption=8,
                              rerank={"enabled": True, "model_name": "ViT-B-32", "pretrained": "..."},
                              retrieval={"k": 2, "dir": None})        # the checkpoint's memory bank
    pending = pending_prompts(prompts, out_dir / "images")                  # resumable: skip what exists
    L.Trainer(devices="auto").predict(module, prompt_loader(pending, 4), return_predictions=False)

One PNG per prompt, `images/{index:06d}.png`: the best of `samples_per_caption` samples by CLIP
score (PAPER.md section 6: 8 samples per caption, CLIP re-ranked), written atomically (temp file +
rename) so that an interrupted run leaves only complete images, which the next run keeps. With
`keep_samples=True` every sample is kept too: `samples/{index:06d}_{j:02d}.png` (j = 0..N-1, the
generation order) and `samples/{index:06d}.json` = {"index", "caption", "clip_scores": the N re-ranking
scores (null when N = 1: no re-ranking), "best": j of the image in images/}; the json is written last,
and a prompt counts as done only once it exists (`pending_prompts(..., require_samples=True)`). Lightning
splits the prompts over all devices and nodes (DistributedSampler); each rank writes its own files.
Each predict batch is sampled with its own seed (run seed, first prompt index): a run is
reproducible for a given device count and batch size; other counts draw other (equally valid) samples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

# the prompt sets and the image naming live in cm3leon.eval.prompts (no Lightning); re-exported here
from cm3leon.eval.prompts import (  # noqa: F401
    Prompt,
    coco_prompts,
    image_path,
    pending_prompts,
    prompt_done,
    sample_path,
    sample_record_path,
    samples_dir_of,
    world_prompts,
    world_references,
    write_prompts,
)


# =============================================================================================
# Generation
# =============================================================================================
class PromptDataset(torch.utils.data.Dataset):
    def __init__(self, prompts: Sequence[Prompt]):
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        p = self.prompts[i]
        return {"index": p.index, "caption": p.caption}


def _as_list(batch: list) -> list:
    return batch


def prompt_loader(prompts: Sequence[Prompt], captions_per_batch: int) -> torch.utils.data.DataLoader:
    """Batches of prompt dicts (lists, not tensors); Lightning adds the distributed sampler."""
    return torch.utils.data.DataLoader(
        PromptDataset(prompts), batch_size=captions_per_batch, shuffle=False, collate_fn=_as_list
    )


def batch_seed(seed: int, first_index: int) -> int:
    """The sampling seed of a predict batch (a pure function of the run seed and its first prompt)."""
    return (int(seed) * 1_000_003 + int(first_index)) % (2**63 - 1)


def save_png_atomic(image, path: Path) -> None:
    """Write a PIL image as PNG via a hidden temp file + rename (never a half-written image)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_json_atomic(record: dict, path: Path) -> None:
    """Write a JSON file via a hidden temp file + rename (never a half-written record)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


class GenerationModule(L.LightningModule):
    """Lightning predict wrapper: prompts -> the best of N samples per prompt as PNG files.

    Args:
        ckpt_path: a CM3LeonLitModule checkpoint.
        images_dir: where `{index:06d}.png` go.
        decoding: `DecodingConfig` fields (conf/decoding/*.yaml).
        samples_per_caption: N; with N > 1 `rerank.enabled` must be true.
        rerank: {enabled, model_name, pretrained} (open_clip; `cm3leon.generation.rerank.ClipReranker`).
        retrieval: the `conf/retrieval` node ({k, dir}; null: what the checkpoint was trained with),
            see `cm3leon.generation.pipeline`.
        max_rows: samples per model forward (each carries its unconditional stream with CFG).
        precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32.
        image_tokenizer / text_tokenizer: override the tokenizer files recorded in the checkpoint.
        keep_samples: also write every sample and its scores to `samples/` beside images_dir
            (`cm3leon.eval.prompts.samples_dir_of`); the best image is the same either way.
    """

    def __init__(
        self,
        ckpt_path: str | Path,
        images_dir: str | Path,
        decoding: dict | None = None,
        samples_per_caption: int = 1,
        rerank: dict | None = None,
        retrieval: dict | None = None,
        seed: int = 0,
        max_rows: int = 64,
        precision: str = "auto",
        cuda_graph: bool = False,
        image_tokenizer: str | None = None,
        text_tokenizer: str | None = None,
        keep_samples: bool = False,
    ):
        super().__init__()
        from cm3leon.generation.sampling import DecodingConfig

        self.decoding = DecodingConfig.from_dict(decoding or {})
        self.n = int(samples_per_caption)
        self.rerank_cfg = dict(rerank or {})
        if self.n > 1 and not self.rerank_cfg.get("enabled"):
            raise ValueError(
                f"samples_per_caption={self.n} needs rerank.enabled=true (the best sample per caption "
                "is kept by CLIP score)"
            )
        self.load_kwargs = {
            "ckpt": ckpt_path,
            "precision": precision,
            "image_tokenizer": image_tokenizer,
            "text_tokenizer": text_tokenizer,
            "retrieval": dict(retrieval or {}),
        }
        self.images_dir = Path(images_dir)
        self.keep_samples = bool(keep_samples)
        self.samples_dir = samples_dir_of(self.images_dir)
        self.seed, self.max_rows, self.cuda_graph = int(seed), int(max_rows), cuda_graph
        self.pipe = None  # loaded on the predict device in on_predict_start
        self.reranker = None
        self.n_written = 0

    def on_predict_start(self) -> None:
        from cm3leon.generation.pipeline import load_pipeline

        self.pipe = load_pipeline(device=str(self.device), **self.load_kwargs)
        if self.n > 1:
            from cm3leon.generation.rerank import ClipReranker

            self.reranker = ClipReranker(
                self.rerank_cfg["model_name"], str(self.rerank_cfg["pretrained"]), device=str(self.device)
            )
        self.images_dir.mkdir(parents=True, exist_ok=True)
        if self.keep_samples:
            self.samples_dir.mkdir(parents=True, exist_ok=True)

    def predict_step(self, batch: list[dict], batch_idx: int) -> int:
        """Generate N samples for each prompt of the batch, keep the best, write it (and with
        keep_samples every sample + its record). Returns #prompts written."""
        from cm3leon.generation.rerank import best_per_prompt
        from cm3leon.generation.tasks import generate_images
        from cm3leon.tokenizers.image_processing import postprocess_pil

        todo = [b for b in batch if not prompt_done(self.images_dir, b["index"], self.keep_samples)]  # resumable
        if not todo:
            return 0
        n, pipe = self.n, self.pipe
        captions = [b["caption"] for b in todo for _ in range(n)]  # prompt-major: p's samples at p*n..
        ids = [np.asarray(t, dtype=np.int64) for t in pipe.encode_captions(captions)]
        docs = pipe.retrieve([b["caption"] for b in todo])  # by the prompt text, once per prompt
        retrieved = None if docs is None else [d for d in docs for _ in range(n)]
        codes = generate_images(
            pipe.model,
            pipe.vocab,
            ids,
            pipe.tokens_per_image,
            decoding=self.decoding,
            seed=batch_seed(self.seed, todo[0]["index"]),
            retrieved=retrieved,
            batch_size=self.max_rows,
            cuda_graph=self.cuda_graph,
        )
        images = postprocess_pil(pipe.image_tokenizer.decode(codes))
        best = np.arange(len(todo)) * n
        scores = None
        if n > 1:
            scores = self.reranker.scores(images, captions)  # float32 [len(todo) * n], prompt-major
            best = best_per_prompt(scores, n)
        for p, (b, i) in enumerate(zip(todo, best.tolist())):
            if self.keep_samples:  # samples first, the record last: it marks the prompt complete
                for j in range(n):
                    save_png_atomic(images[p * n + j], sample_path(self.samples_dir, b["index"], j))
            save_png_atomic(images[i], image_path(self.images_dir, b["index"]))
            if self.keep_samples:
                record = {
                    "index": b["index"],
                    "caption": b["caption"],
                    "clip_scores": None if scores is None else [float(x) for x in scores[p * n : (p + 1) * n]],
                    "best": i - p * n,
                }
                save_json_atomic(record, sample_record_path(self.samples_dir, b["index"]))
        self.n_written += len(todo)
        return len(todo)


def generate_missing(
    module_kwargs: dict[str, Any],
    prompts: Sequence[Prompt],
    images_dir: str | Path,
    trainer_kwargs: dict | None = None,
    captions_per_batch: int = 4,
) -> tuple[int, L.Trainer | None]:
    """Generate the images of `prompts` that are not on disk (all devices via Lightning predict).
    Returns (prompts that were pending, the trainer or None when nothing was pending)."""
    pending = pending_prompts(prompts, images_dir, require_samples=bool(module_kwargs.get("keep_samples")))
    if not pending:
        return 0, None
    module = GenerationModule(images_dir=images_dir, **module_kwargs)
    kwargs = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False, **(trainer_kwargs or {})}
    trainer = L.Trainer(**kwargs)
    trainer.predict(module, dataloaders=prompt_loader(pending, captions_per_batch), return_predictions=False)
    trainer.strategy.barrier()  # every rank's files are on disk before rank 0 scores them
    return len(pending), trainer
