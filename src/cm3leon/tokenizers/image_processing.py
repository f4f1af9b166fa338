"""Image pre/post-processing for the VQGAN (PAPER.md section 1, Chameleon's image tokenizer).

Preprocessing: transparent images are blended on white, then the short side is resized with
LANCZOS to `resolution`, the centre square is cropped, and pixels are mapped to [-1, 1].
Postprocessing: [-1, 1] floats -> uint8 HWC arrays or PIL images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

ImageLike = Image.Image | np.ndarray


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL image or a uint8 array ([H, W], [H, W, 1|3|4]) -> PIL image."""
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8 HWC, got dtype {arr.dtype}; convert with (x * 255).astype(np.uint8)"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"image array must be [H, W] or [H, W, 3|4], got shape {arr.shape}")
    return Image.fromarray(arr)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency (RGBA, LA, P with transparency) is blended on white."""
    if image.mode == "RGB":
        return image
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to `resolution` with LANCZOS, then crop the centre square."""
    w, h = image.size
    if (w, h) == (resolution, resolution):
        return image
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), resample=Image.Resampling.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def preprocess(image: ImageLike, resolution: int) -> torch.Tensor:
    """One image -> float tensor [3, resolution, resolution] in [-1, 1]."""
    image = resize_center_crop(to_rgb(to_pil(image)), resolution)
    arr = np.asarray(image, dtype=np.float32)  # [R, R, 3] in [0, 255]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def preprocess_batch(images: Sequence[ImageLike], resolution: int) -> torch.Tensor:
    """A list of images -> float tensor [B, 3, resolution, resolution] in [-1, 1]."""
    return torch.stack([preprocess(im, resolution) for im in images])


def postprocess(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] (or [3, H, W]) in [-1, 1] -> uint8 array [B, H, W, 3] (or [H, W, 3])."""
    x = images.detach().float().clamp(-1, 1)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8).cpu()
    return x.movedim(-3, -1).numpy()


def postprocess_pil(images: torch.Tensor) -> list[Image.Image]:
    """float [B, 3, H, W] in [-1, 1] -> list of RGB PIL images."""
    arr = postprocess(images if images.dim() == 4 else images[None])
    return [Image.fromarray(a) for a in arr]
