"""CLIP re-ranking (PAPER.md section 5): generate N samples per prompt, keep the best by CLIP score.

    reranker = ClipReranker("ViT-B-32", pretrained="laion2b_s34b_b79k")          # open_clip tag
    reranker = ClipReranker(TINY_CLIP, pretrained="data/shipped/world_clip.pt")  # or a local file
    scores = reranker.scores(images, texts)            # float32 [N]: cos(image_i, text_i)
    order = reranker.rank(images, "a red circle")      # indices, best first
    best = best_per_prompt(scores, n_per_prompt=8)     # int64 [P]: index of each prompt's best

The CLIP score is the cosine similarity of the L2-normalised image and text embeddings (the usual
"CLIP score" is 100 x max(cos, 0); the ranking is the same). The encoder is the retrieval stage's
`DocumentEncoder` (open_clip by name with a pretrained tag or a local weights file; it refuses to run
without trained weights), so generation, retrieval and evaluation embed images the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ClipReranker:
    """Scores generated images against their prompts with an open_clip model.

    Args:
        model_name: open_clip model name ('ViT-B-32'; `cm3leon.retrieval.tiny_clip.TINY_CLIP` for the
            embedded world).
        pretrained: open_clip pretrained tag or a local weights file (required).
        device: default cuda when available.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        device: str | None = None,
        batch_size: int = 64,
    ):
        from cm3leon.retrieval.clip_encoder import DocumentEncoder

        self.encoder = DocumentEncoder(model_name, pretrained=pretrained, device=device, batch_size=batch_size)

    def scores(self, images: Sequence, texts: Sequence[str]) -> np.ndarray:
        """images (PIL or uint8 HWC) and one text each -> float32 [N] cosine similarities."""
        return self.encoder.pair_cosines(images, texts, who="ClipReranker.scores")

    def rank(self, images: Sequence, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Samples of one prompt -> (indices best first int64 [N], their scores float32 [N])."""
        s = self.scores(images, [text] * len(images))
        order = np.argsort(-s, kind="stable")
        return order, s[order]


def best_per_prompt(scores: np.ndarray, n_per_prompt: int) -> np.ndarray:
    """scores [P * n] laid out prompt-major (prompt p's samples at p*n .. p*n+n-1) -> int64 [P]: the
    global index of each prompt's best sample (first on ties)."""
    scores = np.asarray(scores)
    if n_per_prompt < 1 or scores.size % n_per_prompt:
        raise ValueError(f"{scores.size} scores cannot be split into groups of n_per_prompt={n_per_prompt}")
    grid = scores.reshape(-1, n_per_prompt)
    return grid.argmax(1) + np.arange(grid.shape[0]) * n_per_prompt
