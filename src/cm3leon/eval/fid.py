"""Zero-shot FID (PAPER.md section 6) with torch-fidelity, plus the machinery every Frechet-type
metric of the project shares: image sets, the resize protocol, content hashes, a feature cache.

    from cm3leon.eval.fid import compute_fid, ResizeProtocol
    out = compute_fid("samples/", "val2014_30k/", weights_path=None,        # None: torch-fidelity's
                      resize=ResizeProtocol("lanczos", 256), cache_dir="data/cache/eval")   # download
    out["fid"], out["kid_mean"], out["reference_hash"]

Protocol (recorded in every result, because FID numbers are only comparable under one protocol):
- images are read as uint8 (PNG for generated samples: JPEG shifts FID, so a generated folder holding
  .jpg files is refused); RGBA is blended on white;
- resize (stage 1, ours, configurable): `ResizeProtocol(method, size)` resizes the short side to
  `size` with PIL `method` (antialiased: lanczos | bicubic | bilinear | box) and crops the centre
  square; `method="none"` feeds images as they are (all must then have one size);
- stage 2 (torch-fidelity's Inception, fixed): uint8 -> TF1-compatible bilinear resize to 299x299
  -> pool3 features [N, 2048] (the pytorch-fid / TTUR network, `inception-v3-compat`);
- FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) and KID (polynomial kernel MMD over
  random subsets) are torch-fidelity's own functions on those features, so the numbers equal its
  `calculate_metrics` on the same images (tested to 1e-3 relative).

Features of every image set are cached as .npz keyed by a content hash (of the pixels' files or
array bytes), the feature extractor and its weights' hash, and the resize protocol: a second run
over the same reference set (or the same samples) extracts nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from cm3leon.safe_load import load_weights_only
from cm3leon.tokenizers.image_processing import to_pil, to_rgb
from cm3leon.utils import file_sha256

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
LOSSY_EXTS = ("jpg", "jpeg", "webp")
RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
INCEPTION_NAME = "inception-v3-compat"
INCEPTION_LAYER = "2048"  # FID's standard layer; the others are torch-fidelity's diagnostics (cheap early exits)
INCEPTION_LAYERS = {
    "64": "64 (first max-pool)",
    "192": "192 (second max-pool)",
    "768": "768 (Mixed_6e)",
    "2048": "2048 (pool3)",
}
ImageSource = str | Path | Sequence | np.ndarray | torch.Tensor


class MissingWeightsError(RuntimeError):
    """A feature extractor's weights are missing: the message is one line saying how to provide them."""


# =============================================================================================
# Image sets and the resize protocol
# =============================================================================================
@dataclass(frozen=True)
class ResizeProtocol:
    """Stage-1 resize applied to every image before the feature extractor.

    method: none | lanczos | bicubic | bilinear | box (PIL, antialiased when shrinking).
    size: the short side is resized to `size`, then the centre square is cropped (ignored for none).
    """

    method: str = "lanczos"
    size: int | None = 256

    def __post_init__(self) -> None:
        if self.method != "none" and self.method not in RESAMPLE:
            raise ValueError(f"resize.method={self.method!r} is not one of {['none', *RESAMPLE]}")
        if self.method != "none" and (self.size is None or int(self.size) < 1):
            raise ValueError(f"resize.size={self.size} must be a positive int with resize.method={self.method}")

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.method == "none":
            return image
        s = int(self.size)
        w, h = image.size
        if (w, h) == (s, s):
            return image
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        image = image.resize((nw, nh), resample=RESAMPLE[self.method])
        left, top = (nw - s) // 2, (nh - s) // 2
        return image.crop((left, top, left + s, top + s))

    def describe(self) -> str:
        if self.method == "none":
            return "none (images fed at their own size)"
        return f"PIL {self.method} short side to {self.size}, centre crop {self.size}x{self.size}"

    def to_dict(self) -> dict:
        return {**asdict(self), "description": self.describe()}

    @classmethod
    def from_dict(cls, d: Any) -> "ResizeProtocol":
        if isinstance(d, ResizeProtocol):
            return d
        d = dict(d or {})
        return cls(str(d.get("method", "lanczos")), d.get("size", 256))


def list_images(folder: str | Path, exts: Sequence[str] = IMAGE_EXTS) -> list[Path]:
    """Image files directly inside `folder` (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in exts)


class ImageSet(torch.utils.data.Dataset):
    """A set of images read as uint8 [3, H, W] tensors after the resize protocol.

    source: a folder (its image files, sorted), a list of file paths, a list of PIL images / uint8
    HWC arrays, a uint8 array [N, H, W, 3] or a uint8 tensor [N, 3, H, W].
    lossless_only: refuse JPEG/WebP files (generated samples must be stored as PNG).
    """

    def __init__(
        self,
        source: ImageSource,
        resize: ResizeProtocol = ResizeProtocol("none", None),
        lossless_only: bool = False,
        what: str = "images",
    ):
        self.resize, self.what = resize, what
        self.paths: list[Path] | None = None
        self.items: Sequence | None = None
        if isinstance(source, (str, Path)):
            self.paths = list_images(source)
            if not self.paths:
                raise FileNotFoundError(f"{what}: no image files ({', '.join(IMAGE_EXTS)}) in {source}")
        elif isinstance(source, torch.Tensor):
            if source.dtype != torch.uint8 or source.dim() != 4 or source.shape[1] != 3:
                raise ValueError(
                    f"{what}: a tensor must be uint8 [N, 3, H, W], got {source.dtype} {tuple(source.shape)}"
                )
            self.items = source.permute(0, 2, 3, 1).cpu().numpy()
        elif isinstance(source, np.ndarray):
            if source.dtype != np.uint8 or source.ndim != 4 or source.shape[3] != 3:
                raise ValueError(f"{what}: an array must be uint8 [N, H, W, 3], got {source.dtype} {source.shape}")
            self.items = source
        else:
            source = list(source)
            if source and isinstance(source[0], (str, Path)):
                self.paths = [Path(p) for p in source]
                missing = [p for p in self.paths if not p.is_file()]
                if missing:
                    raise FileNotFoundError(f"{what}: {len(missing)} image files not found, e.g. {missing[0]}")
            else:
                self.items = source
        if not len(self):
            raise ValueError(f"{what}: the image set is empty")
        if lossless_only and self.paths is not None:
            lossy = [p for p in self.paths if p.suffix.lower().lstrip(".") in LOSSY_EXTS]
            if lossy:
                raise ValueError(
                    f"{what}: {len(lossy)} files are lossy ({lossy[0].name}); save generated samples "
                    "as PNG (JPEG artefacts shift FID)"
                )

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.items)

    def pil(self, i: int) -> Image.Image:
        """Image i as RGB PIL after the resize protocol."""
        if self.paths is not None:
            with Image.open(self.paths[i]) as im:
                image = to_rgb(im)
                image.load()
        else:
            image = to_rgb(to_pil(self.items[i]))
        return self.resize(image)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.pil(i), dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def content_hash(self) -> str:
        """sha256 of the content (file names + file bytes, or array bytes); independent of resize."""
        h = hashlib.sha256()
        if self.paths is not None:
            for p in self.paths:
                h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
        elif isinstance(self.items, np.ndarray):
            h.update(f"{self.items.shape}".encode() + np.ascontiguousarray(self.items).tobytes())
        else:
            for item in self.items:
                arr = np.asarray(to_rgb(to_pil(item)))
                h.update(f"{arr.shape}".encode() + arr.tobytes())
        return h.hexdigest()


def collate_same_size(batch: list[torch.Tensor]) -> torch.Tensor:
    sizes = {tuple(x.shape) for x in batch}
    if len(sizes) > 1:
        raise ValueError(
            f"images of different sizes {sorted(sizes)[:3]} in one batch: set a resize protocol "
            "(resize.method=lanczos resize.size=256) instead of none"
        )
    return torch.stack(batch)


# =============================================================================================
# Feature spaces and their cache
# =============================================================================================
class FeatureSpace(Protocol):
    """What turns an ImageSet into features [N, D]; described in every result."""

    def describe(self) -> dict: ...  # name, layer, weights, weights_sha256 (all filled)

    def features(self, images: ImageSet) -> np.ndarray: ...


class FeatureCache:
    """Features (and their mean/covariance) of image sets as .npz files in `folder`, keyed by the
    content hash + feature space + resize protocol. Writes are atomic (temp file, rename)."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None

    @staticmethod
    def key(content_hash: str, space: dict, resize: ResizeProtocol) -> str:
        blob = json.dumps({"content": content_hash, "space": space, "resize": asdict(resize)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"features_{key}.npz"

    def load(self, key: str) -> np.ndarray | None:
        p = self.path(key)
        if p is None or not p.is_file():
            return None
        with np.load(p) as z:
            return z["features"]

    def save(self, key: str, features: np.ndarray, meta: dict) -> None:
        p = self.path(key)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        stats = feature_statistics(features)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".", suffix=".npz")
        os.close(fd)
        np.savez(tmp, features=features, mu=stats["mu"], sigma=stats["sigma"], meta=json.dumps(meta))
        os.replace(tmp, p)


def features_of(
    images: ImageSet, space: FeatureSpace, resize: ResizeProtocol, cache: FeatureCache
) -> tuple[np.ndarray, str, bool]:
    """(features [N, D] float32, content hash, whether they came from the cache)."""
    content = images.content_hash()
    key = cache.key(content, space.describe(), resize)
    cached = cache.load(key)
    if cached is not None:
        return cached, content, True
    feats = np.asarray(space.features(images), dtype=np.float32)
    cache.save(
        key,
        feats,
        {
            "content_hash": content,
            "n": len(images),
            "space": space.describe(),
            "resize": resize.to_dict(),
            "what": images.what,
        },
    )
    return feats, content, False


# =============================================================================================
# The metrics (torch-fidelity's functions, so the numbers match its calculate_metrics)
# =============================================================================================
def feature_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """features [N, D] -> {'mu': [D], 'sigma': [D, D]} (torch-fidelity's fid_features_to_statistics)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(torch.from_numpy(np.asarray(features, dtype=np.float32)))


def frechet_distance(stats1: dict, stats2: dict) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) (torch-fidelity's fid_statistics_to_metric:
    tr sqrt(S1 S2) as the sum of square roots of the eigenvalues of S1 S2)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(stats1, stats2, verbose=False)[KEY_METRIC_FID])


def kernel_distance(
    f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> tuple[float, float, int]:
    """KID (torch-fidelity's: cubic polynomial kernel, unbiased MMD^2, mean/std over random subsets).
    The subset size is capped at the smaller set. Returns (mean, std, subset size used)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(int(subset_size), len(f1), len(f2))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(f1)} and {len(f2)}")
    out = kid_features_to_metric(
        torch.from_numpy(np.asarray(f1, np.float32)),
        torch.from_numpy(np.asarray(f2, np.float32)),
        kid_subsets=int(subsets),
        kid_subset_size=size,
        rng_seed=int(seed),
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD]), size


def compare_image_sets(
    generated: ImageSource,
    reference: ImageSource,
    space: FeatureSpace,
    *,
    resize: ResizeProtocol,
    cache_dir: str | Path | None = None,
    kid: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
) -> dict:
    """Frechet distance (+ KID) between two image sets in a feature space. Keys: frechet, kid_mean,
    kid_std, kid_subset_size, n_generated, n_reference, generated_hash, reference_hash,
    reference_cached, generated_cached, feature_space, resize."""
    cache = FeatureCache(cache_dir)
    gen = ImageSet(generated, resize, lossless_only=True, what="generated images")
    ref = ImageSet(reference, resize, what="reference images")
    f_ref, ref_hash, ref_cached = features_of(ref, space, resize, cache)
    f_gen, gen_hash, gen_cached = features_of(gen, space, resize, cache)
    if len(f_gen) < 2 or len(f_ref) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 images per set, got {len(f_gen)} and {len(f_ref)}")
    out = {"frechet": frechet_distance(feature_statistics(f_gen), feature_statistics(f_ref))}
    if kid:
        out["kid_mean"], out["kid_std"], out["kid_subset_size"] = kernel_distance(
            f_gen, f_ref, kid_subsets, kid_subset_size, seed
        )
    out.update(
        n_generated=len(gen),
        n_reference=len(ref),
        generated_hash=gen_hash,
        reference_hash=ref_hash,
        generated_cached=gen_cached,
        reference_cached=ref_cached,
        feature_space=space.describe(),
        resize=resize.to_dict(),
    )
    return out


# =============================================================================================
# Inception (torch-fidelity) and compute_fid
# =============================================================================================
def inception_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def default_inception_path() -> Path:
    """Where torch.hub (and so torch-fidelity's default download) keeps the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_url().rsplit("/", 1)[-1]


def _how_to_provide(default: Path) -> str:
    return (
        f"download {inception_url()} on a machine with network access and pass "
        f"fid.inception_weights=PATH (or put the file at {default})"
    )


def resolve_inception_weights(
    weights_path: str | Path | None = None, download: bool = True, timeout_s: float = 20.0
) -> Path:
    """The Inception weights file: `weights_path` when given, else torch-hub's copy, downloaded
    (torch-fidelity's default URL, sha256-prefix checked) when missing and `download`.
    Raises MissingWeightsError with a one-line message otherwise."""
    default = default_inception_path()
    if weights_path:
        p = Path(weights_path).expanduser()
        if not p.is_file():
            raise MissingWeightsError(f"Inception weights {p} not found: {_how_to_provide(default)}")
        return p
    if default.is_file():
        return default
    if not download:
        raise MissingWeightsError(
            f"Inception weights for FID are missing ({default} does not exist and "
            f"fid.download=false): {_how_to_provide(default)}"
        )
    import urllib.request

    try:
        default.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=default.parent, prefix=default.name + ".")
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(inception_url(), timeout=timeout_s) as r:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
        prefix = default.stem.rsplit("-", 1)[-1]  # torch.hub convention: name-<sha256 prefix>.pth
        if not h.hexdigest().startswith(prefix):
            raise OSError(f"downloaded file's sha256 {h.hexdigest()[:12]} does not start with {prefix}")
        os.replace(tmp, default)
        return default
    except Exception as e:
        if "tmp" in locals() and os.path.exists(tmp):
            os.unlink(tmp)
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise MissingWeightsError(
            f"Inception weights for FID are missing: {default} does not exist and the "
            f"download failed ({reason}); {_how_to_provide(default)}"
        ) from None


class InceptionSpace:
    """torch-fidelity's `inception-v3-compat` extractor (pool3, 2048-d) as a FeatureSpace."""

    def __init__(
        self,
        weights_path: str | Path | None = None,
        download: bool = True,
        device: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        feature_layer: str = INCEPTION_LAYER,
    ):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.version import __version__ as tf_version

        if feature_layer not in INCEPTION_LAYERS:
            raise ValueError(f"feature_layer={feature_layer!r} is not one of {list(INCEPTION_LAYERS)}")
        self.layer = feature_layer

        self.weights = resolve_inception_weights(weights_path, download)
        self.weights_sha256 = file_sha256(self.weights)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        # torch-fidelity unpickles a weights file fully (weights_only=False): read it here with
        # weights_only=True and hand torch-fidelity our own serialisation of those tensors instead
        state = load_weights_only(self.weights, "Inception weights")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        self.model = FeatureExtractorInceptionV3(
            INCEPTION_NAME, [feature_layer], feature_extractor_weights_path=buffer, verbose=False
        ).to(self.device)
        self.tf_version = tf_version

    def describe(self) -> dict:
        return {
            "name": f"torch-fidelity {INCEPTION_NAME}",
            "layer": INCEPTION_LAYERS[self.layer],
            "weights": str(self.weights),
            "weights_sha256": self.weights_sha256,
            "input": "uint8 RGB -> TF1-compatible bilinear resize to 299x299 (inside the extractor)",
        }

    @torch.no_grad()
    def features(self, images: ImageSet) -> np.ndarray:
        loader = torch.utils.data.DataLoader(
            images, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_same_size
        )
        out = [self.model(batch.to(self.device))[0].float().cpu() for batch in loader]
        return torch.cat(out).numpy()


def evaluator_versions() -> dict:
    import torch_fidelity

    import cm3leon

    return {"torch_fidelity": torch_fidelity.__version__, "cm3leon": cm3leon.__version__, "torch": torch.__version__}


def compute_fid(
    generated: ImageSource,
    reference: ImageSource,
    *,
    weights_path: str | Path | None = None,
    download: bool = True,
    resize: ResizeProtocol | dict = ResizeProtocol("lanczos", 256),
    cache_dir: str | Path | None = None,
    kid: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    batch_size: int = 64,
    device: str | None = None,
    num_workers: int = 0,
    seed: int = 2020,
    feature_layer: str = INCEPTION_LAYER,
) -> dict:
    """FID (and KID) of generated vs reference images with torch-fidelity's Inception.

    generated / reference: folders, lists of files, uint8 arrays [N, H, W, 3] or tensors [N, 3, H, W].
    weights_path: a local Inception weights file (torch-fidelity format); None: torch-hub's copy,
        downloaded once from torch-fidelity's URL when `download`.
    resize: the stage-1 resize protocol (see the module docstring); `ResizeProtocol("none")` feeds
        images as they are, like torch-fidelity's `calculate_metrics` on folders.
    cache_dir: where features of each image set are cached by content hash (None: no cache).
    feature_layer: '2048' (pool3, FID's definition); '64' | '192' | '768' only for diagnostics.
    Returns a dict: fid, kid_mean, kid_std, kid_subset_size, n_generated, n_reference, evaluator,
    evaluator_version, feature_extractor, feature_extractor_weights(_sha256), resize,
    reference_hash, generated_hash, reference_cached, generated_cached.
    """
    resize = ResizeProtocol.from_dict(resize)
    space = InceptionSpace(weights_path, download, device, batch_size, num_workers, feature_layer)
    out = compare_image_sets(
        generated,
        reference,
        space,
        resize=resize,
        cache_dir=cache_dir,
        kid=kid,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        seed=seed,
    )
    desc = out.pop("feature_space")
    return {
        "fid": out.pop("frechet"),
        **out,
        "evaluator": "torch-fidelity",
        "evaluator_version": space.tf_version,
        "feature_extractor": desc["name"],
        "feature_extractor_layer": desc["layer"],
        "feature_extractor_weights": desc["weights"],
        "feature_extractor_weights_sha256": desc["weights_sha256"],
        "feature_extractor_input": desc["input"],
    }
