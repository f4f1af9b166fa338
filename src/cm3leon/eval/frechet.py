"""Frechet distance in the feature space of a CLIP image tower (by default the project's tiny CLIP
trained on the embedded world): the embedded world's stand-in for FID, named as such, never "FID".

    from cm3leon.eval.frechet import ClipImageSpace, compute_clip_frechet
    out = compute_clip_frechet(generated_uint8, reference_uint8, pretrained="data/shipped/world_clip.pt")
    out["fd_tiny_clip"], out["kd_tiny_clip_mean"]

Features: the image tower's embedding (open_clip `encode_image`), L2-normalised, as the retrieval
stage embeds images (`cm3leon.retrieval.clip_encoder.DocumentEncoder`); the images pass through
open_clip's eval transform (bicubic resize of the short side to the tower's input size, centre
crop, CLIP normalisation) after the stage-1 resize protocol. The distance and kernel distance are
the same functions as FID's (`cm3leon.eval.fid`), only the feature space differs: Inception's 2048
pool3 features are for natural images; on 64 px synthetic scenes a tower trained on them is the
meaningful space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cm3leon.eval.fid import ImageSet, ImageSource, ResizeProtocol, compare_image_sets, evaluator_versions
from cm3leon.retrieval.clip_encoder import SHIPPED_WORLD_CLIP
from cm3leon.retrieval.tiny_clip import TINY_CLIP
from cm3leon.utils import file_sha256


def metric_tag(model_name: str) -> str:
    """'tiny_clip' for the project's tiny CLIP, 'clip_<name>' otherwise (used in metric keys)."""
    return "tiny_clip" if model_name == TINY_CLIP else "clip_" + model_name.replace("-", "_").replace("/", "_").lower()


class ClipImageSpace:
    """A CLIP image tower (open_clip by name + pretrained tag or local file) as a FeatureSpace.

    Also accepts an existing `DocumentEncoder` (`encoder=`) so that one model serves re-ranking,
    CLIP score and this distance."""

    def __init__(
        self,
        model_name: str = TINY_CLIP,
        pretrained: str | Path | None = SHIPPED_WORLD_CLIP,
        device: str | None = None,
        batch_size: int = 256,
        encoder=None,
    ):
        if encoder is None:
            from cm3leon.retrieval.clip_encoder import DocumentEncoder

            encoder = DocumentEncoder(model_name, pretrained=pretrained, device=device, batch_size=batch_size)
        self.encoder = encoder
        self.model_name = encoder.model_name
        p = Path(str(encoder.pretrained))
        self.weights_sha256 = file_sha256(p) if p.is_file() else f"open_clip tag {encoder.pretrained}"

    def describe(self) -> dict:
        size = self.encoder.model.visual.image_size
        return {
            "name": f"{self.model_name} image tower (open_clip)",
            "layer": f"encode_image, L2-normalised ({self.encoder.dim}-d)",
            "weights": str(self.encoder.pretrained),
            "weights_sha256": self.weights_sha256,
            "input": f"uint8 RGB -> open_clip eval transform (bicubic short side to {size}, centre crop, CLIP normalisation)",
        }

    def features(self, images: ImageSet) -> np.ndarray:
        return self.encoder.encode_images([images.pil(i) for i in range(len(images))])


def compute_clip_frechet(
    generated: ImageSource,
    reference: ImageSource,
    *,
    model_name: str = TINY_CLIP,
    pretrained: str | Path | None = SHIPPED_WORLD_CLIP,
    space: ClipImageSpace | None = None,
    resize: ResizeProtocol | dict = ResizeProtocol("none", None),
    cache_dir: str | Path | None = None,
    kid: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    device: str | None = None,
    seed: int = 2020,
) -> dict:
    """Frechet distance (+ kernel distance) of two image sets in a CLIP image tower's space.

    Keys: fd_<tag>, kd_<tag>_mean, kd_<tag>_std (tag: `metric_tag(model_name)`, 'tiny_clip' by
    default), kid_subset_size, n_generated, n_reference, evaluator, evaluator_version,
    feature_extractor, feature_extractor_weights(_sha256), resize, reference_hash, generated_hash,
    reference_cached, generated_cached."""
    space = space or ClipImageSpace(model_name, pretrained, device)
    tag = metric_tag(space.model_name)
    out = compare_image_sets(
        generated,
        reference,
        space,
        resize=ResizeProtocol.from_dict(resize),
        cache_dir=cache_dir,
        kid=kid,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        seed=seed,
    )
    desc = out.pop("feature_space")
    res = {f"fd_{tag}": out.pop("frechet")}
    if kid:
        res[f"kd_{tag}_mean"], res[f"kd_{tag}_std"] = out.pop("kid_mean"), out.pop("kid_std")
    versions = evaluator_versions()
    return {
        **res,
        **out,
        "evaluator": "cm3leon.eval.frechet (torch-fidelity's Frechet/KID functions on CLIP image features)",
        "evaluator_version": f"cm3leon {versions['cm3leon']}, torch-fidelity {versions['torch_fidelity']}",
        "feature_extractor": desc["name"],
        "feature_extractor_layer": desc["layer"],
        "feature_extractor_weights": desc["weights"],
        "feature_extractor_weights_sha256": desc["weights_sha256"],
        "feature_extractor_input": desc["input"],
    }
