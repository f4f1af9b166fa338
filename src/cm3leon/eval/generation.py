"""Resumable, multi-device sample generation for evaluation prompts (Lightning predict; the prompt
sets themselves are in `cm3leon.eval.prompts`).

    prompts = coco_prompts("captions_val2014.json", n=30_000, seed=0)        # or world_prompts(...)
    module = GenerationModule(ckpt_path, out_dir / "images", decoding={...}, samples_per_caption=8,
                              rerank={"enabled": True, "model_name": "ViT-B-32", "pretrained": "..."})
    pending = pending_prompts(prompts, out_dir / "images")                  # resumable: skip what exists
    L.Trainer(devices="auto").predict(module, prompt_loader(pending, 4), return_predictions=False)

One PNG per prompt, `images/{index:06d}.png`: the best of `samples_per_caption` samples by CLIP
score (PAPER.md section 6: 8 samples per caption, CLIP re-ranked), written atomically (temp file +
rename) so that an interrupted run leaves only complete images, which the next run keeps. Lightning
splits the prompts over all devices and nodes (DistributedSampler); each rank writes its own files.
Each predict batch is sampled with its own seed (run seed, first prompt index): a run is
reproducible for a given device count and batch size; other counts draw other (equally valid) samples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch

# the prompt sets and the image naming live in cm3leon.eval.prompts (no Lightning); re-exported here
from cm3leon.eval.prompts import (  # noqa: F401
    Prompt, coco_prompts, image_path, pending_prompts, world_prompts, world_references, write_prompts,
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
    return torch.utils.data.DataLoader(PromptDataset(prompts), batch_size=captions_per_batch, shuffle=False,
                                       collate_fn=_as_list)


def resolve_path(path: str | Path) -> Path:
    """Absolute as given, else relative to the repository root (paths recorded in checkpoints)."""
    from cm3leon import PROJECT_ROOT

    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def load_lm(ckpt_path: str | Path):
    """(CM3LeonLM in eval mode on CPU, Vocab, data_meta dict) from a CM3LeonLitModule checkpoint."""
    from cm3leon.lit.lm_module import CM3LeonLitModule

    module = CM3LeonLitModule.load_from_checkpoint(str(ckpt_path), map_location="cpu")
    return module.model.eval().requires_grad_(False), module.vocab, dict(module.hparams.get("data_meta") or {})


def tokenizer_paths(meta: dict, image_tokenizer: str | None = None, text_tokenizer: str | None = None) -> tuple[Path, Path]:
    """The (image, text) tokenizer files: the overrides, else those recorded in the checkpoint."""
    out = []
    for key, given in (("image_tokenizer", image_tokenizer), ("text_tokenizer", text_tokenizer)):
        path = given or (meta.get(key) or {}).get("path")
        if not path:
            raise FileNotFoundError(f"the checkpoint records no {key}; pass {key}=PATH")
        out.append(resolve_path(path))
    return out[0], out[1]


def batch_seed(seed: int, first_index: int) -> int:
    """The sampling seed of a predict batch (a pure function of the run seed and its first prompt)."""
    return (int(seed) * 1_000_003 + int(first_index)) % (2**63 - 1)


def save_png_atomic(image, path: Path) -> None:
    """Write a PIL image as PNG via a hidden temp file + rename (never a half-written image)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


class GenerationModule(L.LightningModule):
    """Lightning predict wrapper: prompts -> the best of N samples per prompt as PNG files.

    Args:
        ckpt_path: a CM3LeonLitModule checkpoint.
        images_dir: where `{index:06d}.png` go.
        decoding: `DecodingConfig` fields (conf/decoding/*.yaml).
        samples_per_caption: N; with N > 1 `rerank.enabled` must be true.
        rerank: {enabled, model_name, pretrained} (open_clip; `cm3leon.rerank.ClipReranker`).
        retrieval: {retriever: a hydra node with retrieve(text, k) -> documents, or None; k}.
        max_rows: samples per model forward (each carries its unconditional stream with CFG).
        precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32.
        image_tokenizer / text_tokenizer: override the tokenizer files recorded in the checkpoint.
    """

    def __init__(self, ckpt_path: str | Path, images_dir: str | Path, decoding: dict | None = None,
                 samples_per_caption: int = 1, rerank: dict | None = None, retrieval: dict | None = None,
                 seed: int = 0, max_rows: int = 64, precision: str = "auto", cuda_graph: bool = False,
                 image_tokenizer: str | None = None, text_tokenizer: str | None = None):
        super().__init__()
        from cm3leon.decoding import DecodingConfig
        from cm3leon.tokenizers.text_tokenizer import TextTokenizer

        self.decoding = DecodingConfig.from_dict(decoding or {})
        self.n = int(samples_per_caption)
        self.rerank_cfg = dict(rerank or {})
        if self.n > 1 and not self.rerank_cfg.get("enabled"):
            raise ValueError(f"samples_per_caption={self.n} needs rerank.enabled=true (the best sample per caption "
                             "is kept by CLIP score)")
        self.retrieval_cfg = dict(retrieval or {})
        self.images_dir = Path(images_dir)
        self.seed, self.max_rows, self.precision, self.cuda_graph = int(seed), int(max_rows), precision, cuda_graph
        self.lm, self.vocab, meta = load_lm(ckpt_path)
        self.image_tokenizer_path, text_path = tokenizer_paths(meta, image_tokenizer, text_tokenizer)
        self.text_tok = TextTokenizer.from_file(text_path)
        self.image_tok = None  # built on the right device in on_predict_start
        self.reranker = None
        self.retriever = None
        self.n_written = 0

    def on_predict_start(self) -> None:
        from cm3leon.tokenizers.image_tokenizer import ImageTokenizer

        precision = self.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.lm.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision])
        self.image_tok = ImageTokenizer.from_checkpoint(self.image_tokenizer_path, device=self.device)
        if self.image_tok.n_codes != self.vocab.n_image_codes:
            raise ValueError(f"image tokenizer {self.image_tokenizer_path} has {self.image_tok.n_codes} codes but the "
                             f"model was trained with {self.vocab.n_image_codes}; pass the matching image_tokenizer=PATH")
        if self.n > 1:
            from cm3leon.rerank import ClipReranker

            self.reranker = ClipReranker(self.rerank_cfg["model_name"], str(self.rerank_cfg["pretrained"]),
                                         device=str(self.device))
        node = self.retrieval_cfg.get("retriever")
        if node and int(self.retrieval_cfg.get("k", 0)) > 0:
            import hydra

            self.retriever = hydra.utils.instantiate(node)
        self.images_dir.mkdir(parents=True, exist_ok=True)

    def predict_step(self, batch: list[dict], batch_idx: int) -> int:
        """Generate N samples for each prompt of the batch, keep the best, write it. Returns #written."""
        from cm3leon.decoding import generate_images
        from cm3leon.rerank import best_per_prompt
        from cm3leon.tokenizers.image_processing import postprocess_pil

        todo = [b for b in batch if not image_path(self.images_dir, b["index"]).is_file()]  # resumable
        if not todo:
            return 0
        n = self.n
        captions = [b["caption"] for b in todo for _ in range(n)]  # prompt-major: p's samples at p*n..
        ids = [np.asarray(self.text_tok.encode(c), dtype=np.int64) for c in captions]
        retrieved = None
        if self.retriever is not None:
            k = int(self.retrieval_cfg["k"])
            docs = [list(self.retriever.retrieve(b["caption"], k)) for b in todo]
            retrieved = [d for d in docs for _ in range(n)]
        codes = generate_images(
            self.lm, self.vocab, ids, self.image_tok.tokens_per_image, decoding=self.decoding,
            seed=batch_seed(self.seed, todo[0]["index"]), retrieved=retrieved, batch_size=self.max_rows,
            cuda_graph=self.cuda_graph,
        )
        images = postprocess_pil(self.image_tok.decode(codes))
        best = np.arange(len(todo)) * n
        if n > 1:
            best = best_per_prompt(self.reranker.scores(images, captions), n)
        for b, i in zip(todo, best.tolist()):
            save_png_atomic(images[i], image_path(self.images_dir, b["index"]))
        self.n_written += len(todo)
        return len(todo)


def generate_missing(module_kwargs: dict[str, Any], prompts: Sequence[Prompt], images_dir: str | Path,
                     trainer_kwargs: dict | None = None, captions_per_batch: int = 4) -> tuple[int, L.Trainer | None]:
    """Generate the images of `prompts` that are not on disk (all devices via Lightning predict).
    Returns (prompts that were pending, the trainer or None when nothing was pending)."""
    pending = pending_prompts(prompts, images_dir)
    if not pending:
        return 0, None
    module = GenerationModule(images_dir=images_dir, **module_kwargs)
    kwargs = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False, **(trainer_kwargs or {})}
    trainer = L.Trainer(**kwargs)
    trainer.predict(module, dataloaders=prompt_loader(pending, captions_per_batch), return_predictions=False)
    trainer.strategy.barrier()  # every rank's files are on disk before rank 0 scores them
    return len(pending), trainer
