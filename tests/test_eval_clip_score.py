"""CLIP score = 100 x mean(max(cos, 0)) of unit image/text embeddings, on a random tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval_builders import make_tiny_clip

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from cm3leon.eval.clip_score import ClipScorer
    from cm3leon.retrieval.tiny_clip import TINY_CLIP

    return ClipScorer(TINY_CLIP, make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip.pt"), device="cpu")


def test_clip_score_matches_the_definition(scorer):
    from cm3leon.eval.generation import world_prompts, world_references

    images = list(world_references(6))
    captions = [p.caption for p in world_prompts(6)]
    out = scorer(images, captions)
    t = scorer.encoder.encode_texts(captions)
    i = scorer.encoder.encode_images(images)
    cos = (t * i).sum(-1) / np.linalg.norm(t, axis=-1) / np.linalg.norm(i, axis=-1)
    assert out["clip_score"] == pytest.approx(100 * np.maximum(cos, 0).mean(), rel=1e-5, abs=1e-5)
    assert out["clip_cosine"] == pytest.approx(cos.mean(), abs=1e-6)
    assert out["n"] == 6 and out["clip_score_model"] == "world-tiny-clip"
    assert len(out["clip_score_pretrained_sha256"]) == 64
    # repeated captions are encoded once but scored per pair
    assert scorer.cosines(images[:2], [captions[0]] * 2).shape == (2,)


def test_clip_score_refuses_mismatched_pairs(scorer):
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer.cosines([np.zeros((8, 8, 3), np.uint8)] * 2, ["a"])
