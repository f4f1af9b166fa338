"""The Frechet / kernel distances against direct formulas, and the tiny-CLIP Frechet distance
(named for its feature space, never "fid") on a random-initialised tiny CLIP saved to a temp dir."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from cm3leon.eval.fid import feature_statistics, frechet_distance, kernel_distance
from eval_builders import make_tiny_clip

torch.set_num_threads(2)


def direct_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (float64)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_the_direct_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)).astype(np.float32)
    b = (rng.normal(size=(300, 6)) * 1.5 + 0.7).astype(np.float32)
    ours = frechet_distance(feature_statistics(a), feature_statistics(b))
    assert ours == pytest.approx(direct_frechet(a.astype(np.float64), b.astype(np.float64)), rel=1e-5)
    assert abs(frechet_distance(feature_statistics(a), feature_statistics(a))) < 1e-4


def test_kernel_distance_caps_the_subset_and_separates_sets():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(20, 4)) + 3.0
    same, _, size = kernel_distance(a, a[::-1].copy(), subsets=5, subset_size=1000)
    assert size == 30
    diff, _, size = kernel_distance(a, b, subsets=5, subset_size=1000)
    assert size == 20 and diff > 10 * abs(same)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(a[:1], b, subsets=2)


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip.pt")


def test_tiny_clip_frechet_is_named_for_its_space(clip_weights, tmp_path):
    from cm3leon.eval.frechet import compute_clip_frechet
    from cm3leon.eval.generation import world_references

    ref = world_references(12, seed=0, split="val")
    other = world_references(12, seed=0, split="val", start=100)[:, :, ::-1].copy()  # mirrored other scenes
    out = compute_clip_frechet(ref, ref, pretrained=clip_weights, cache_dir=tmp_path, kid_subsets=5, device="cpu")
    assert "fid" not in out and "fd_tiny_clip" in out and "kd_tiny_clip_mean" in out
    assert abs(out["fd_tiny_clip"]) < 1e-4
    assert out["feature_extractor"].startswith("world-tiny-clip image tower")
    assert out["feature_extractor_weights_sha256"] and len(out["feature_extractor_weights_sha256"]) == 64
    far = compute_clip_frechet(other, ref, pretrained=clip_weights, cache_dir=tmp_path, kid_subsets=5, device="cpu")
    assert far["fd_tiny_clip"] > 1e-3 and far["reference_cached"] and not far["generated_cached"]


def test_missing_tiny_clip_weights_name_the_command(tmp_path):
    from cm3leon.eval.frechet import ClipImageSpace

    with pytest.raises(FileNotFoundError, match="train_clip.py"):
        ClipImageSpace(pretrained=tmp_path / "world_clip.pt", device="cpu")
