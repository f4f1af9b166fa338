"""Inference: one loader, one decode session, the tasks, the decoding maths.

    pipeline.py  load_pipeline(ckpt, device, precision, ...): model, vocab, tokenizers, retriever
    tasks.py     generate_images, edit_images, caption_images, infill_images, generate
    sft.py       the instruction-tuning tasks (edit, control, grounded, vqa, caption) from SFT templates' prompts
    session.py   DecodeSession: batched prefill + KV-cached decode steps (CUDA graph, compile)
    sampling.py  logit processors, DecodingConfig, Picker (CFG, instruct-CFG, CD-K, top-p/top-k)
    rerank.py    CLIP re-ranking of N samples per prompt
    grid.py      sample PNGs and grids

Prompts are laid out by `cm3leon.data.sequences`, the module that lays out training sequences.
"""

from cm3leon.generation.pipeline import Pipeline, load_pipeline
from cm3leon.generation.sampling import DecodingConfig, Picker
from cm3leon.generation.session import DecodeSession
from cm3leon.generation.tasks import caption_images, edit_images, generate, generate_images, infill_images

__all__ = [
    "DecodeSession",
    "DecodingConfig",
    "Picker",
    "Pipeline",
    "caption_images",
    "edit_images",
    "generate",
    "generate_images",
    "infill_images",
    "load_pipeline",
]
