"""CLIP score of generated images against their captions, with a configured open_clip model.

    from cm3leon.eval.clip_score import ClipScorer
    scorer = ClipScorer("ViT-B-32", pretrained="laion2b_s34b_b79k")      # or a local weights file
    out = scorer(images, captions)     # {'clip_score': 100 * mean(max(cos, 0)), 'clip_cosine': mean cos, ...}

Definition (torchmetrics' `CLIPScore`): 100 x max(cos(image, text), 0), averaged over pairs, with the
unit-normalised open_clip embeddings (`DocumentEncoder`, the encoder of retrieval and re-ranking).
Note: when the same model re-ranked the samples, the score is biased upwards; results record the
model of each so that this is visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class ClipScorer:
    """An open_clip model (by name + pretrained tag or local file) that scores (image, caption) pairs.

    encoder: an existing `DocumentEncoder` to reuse instead of loading one."""

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | Path | None = None,
        device: str | None = None,
        batch_size: int = 128,
        encoder=None,
    ):
        if encoder is None:
            from cm3leon.retrieval.clip_encoder import DocumentEncoder

            encoder = DocumentEncoder(model_name, pretrained=pretrained, device=device, batch_size=batch_size)
        self.encoder = encoder

    def cosines(self, images: Sequence, captions: Sequence[str]) -> np.ndarray:
        """images (PIL or uint8 HWC) and one caption each -> float32 [N] cosine similarities."""
        return self.encoder.pair_cosines(images, captions, who="CLIP score", noun="captions")

    def describe(self) -> dict:
        from cm3leon.utils import file_sha256

        p = Path(str(self.encoder.pretrained))
        return {
            "clip_score_model": self.encoder.model_name,
            "clip_score_pretrained": str(self.encoder.pretrained),
            "clip_score_pretrained_sha256": file_sha256(p)
            if p.is_file()
            else f"open_clip tag {self.encoder.pretrained}",
        }

    def __call__(self, images: Sequence, captions: Sequence[str]) -> dict:
        """-> {'clip_score', 'clip_cosine', 'n', 'clip_score_model', 'clip_score_pretrained(_sha256)'}."""
        cos = self.cosines(images, captions)
        if not len(cos):
            raise ValueError("CLIP score needs at least one (image, caption) pair")
        return {
            "clip_score": float(100.0 * np.maximum(cos, 0).mean()),
            "clip_cosine": float(cos.mean()),
            "n": len(cos),
            **self.describe(),
        }


def clip_score(
    images: Sequence,
    captions: Sequence[str],
    model_name: str = "ViT-B-32",
    pretrained: str | Path | None = None,
    device: str | None = None,
) -> dict:
    """One-call form of `ClipScorer(model_name, pretrained, device)(images, captions)`."""
    return ClipScorer(model_name, pretrained, device)(images, captions)
