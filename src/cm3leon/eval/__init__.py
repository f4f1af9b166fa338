"""Evaluation (PAPER.md section 6): zero-shot FID, CLIP score, the embedded world's metrics.

    from cm3leon.eval import compute_fid, compute_clip_frechet, ClipScorer
    compute_fid(generated, reference, weights_path=None, resize=ResizeProtocol("lanczos", 256))
    compute_clip_frechet(generated, reference, pretrained="data/shipped/world_clip.pt")  # fd_tiny_clip
    ClipScorer("ViT-B-32", "laion2b_s34b_b79k")(images, captions)                        # clip_score

Modules, one idea each:
- `fid`: image sets, the resize protocol, the content-hashed feature cache, Frechet/KID (torch-fidelity's
  functions) and `compute_fid` with torch-fidelity's Inception;
- `frechet`: the same distances in a CLIP image tower's space (`fd_tiny_clip`, never called FID);
- `clip_score`: 100 x mean max(cos, 0) with an open_clip model;
- `prompts`: evaluation prompts (MS-COCO, the embedded world), prompts.jsonl and the image naming;
- `generation`: resumable multi-device generation of those prompts (Lightning predict), used by
  `src/eval_fid.py`;
- `callback`: `FIDCallback`, the metrics every N training steps, logged with a sample grid.
"""

from cm3leon.eval.clip_score import ClipScorer, clip_score
from cm3leon.eval.fid import ImageSet, MissingWeightsError, ResizeProtocol, compute_fid
from cm3leon.eval.frechet import compute_clip_frechet

__all__ = [
    "ClipScorer",
    "ImageSet",
    "MissingWeightsError",
    "ResizeProtocol",
    "clip_score",
    "compute_clip_frechet",
    "compute_fid",
]
