"""Image pre/post-processing for the VQGAN (PAPER.md section 1, Chameleon's image tokenizer).

Preprocessing: any image mode is made 8-bit RGB by `to_rgb` (the project's one conversion: 16-bit
scaled, transparency blended on white), then the short side is resized with LANCZOS to `resolution`,
the centre square is cropped, and pixels are mapped to [-1, 1].
Postprocessing: [-1, 1] floats -> uint8 HWC arrays or PIL images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

ImageLike = Image.Image | np.ndarray


class UnsupportedImageMode(ValueError):
    """An image mode with no known 8-bit scale (the raw-sample decoder skips it as `unsupported_mode`)."""


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL image or a uint8 / uint16 array ([H, W], [H, W, 1|3|4]) -> PIL image (uint16: 16-bit, as in a PNG)."""
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"image arrays must be uint8 (or uint16) HWC, got dtype {arr.dtype}; convert with (x * 255).astype(np.uint8)"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"image array must be [H, W] or [H, W, 3|4], got shape {arr.shape}")
    if arr.dtype == np.uint16 and arr.ndim == 3:
        arr = _high_byte(arr)  # PIL has no 16-bit colour mode; a 2-D uint16 array stays I;16 for to_rgb
    return Image.fromarray(arr)


def _high_byte(arr: np.ndarray) -> np.ndarray:
    # 16 -> 8 bits: v >> 8 is the exact inverse of the usual 8 -> 16 expansion (v * 257) and what
    # PIL itself does when it opens a 16-bit RGB PNG, so grey and colour 16-bit files agree.
    return (arr.astype(np.uint32) >> 8).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, the one conversion every reader uses.

    - 16-bit grey (`I;16*`, and `I` holding 0..65535, which is how PIL opens 16-bit greys): the high
      byte, as PIL does for 16-bit RGB PNGs (PIL's own convert would clip them to white);
    - `F` (float) in [0, 1]: round(255 v);
    - transparency (RGBA, LA, PA, premultiplied RGBa/La, P/L/RGB with a tRNS entry): blended on white;
    - anything else (L, 1, CMYK, YCbCr, ...): PIL's convert.
    Raises UnsupportedImageMode for `I` outside 0..65535, `F` outside [0, 1] (their scale is unknown)
    and modes PIL cannot convert.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode == "I" or mode.startswith("I;16"):
        arr = np.asarray(image)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise UnsupportedImageMode(
                f"image mode I with values {arr.min()}..{arr.max()} (outside 0..65535): no known 8-bit scale"
            )
        return Image.fromarray(_high_byte(arr), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image)
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise UnsupportedImageMode(
                f"float image (mode F) with values {arr.min()}..{arr.max()} (outside [0, 1]): no known 8-bit scale"
            )
        return Image.fromarray(np.round(arr * 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:  # e.g. LAB, HSV without a colour profile
        raise UnsupportedImageMode(f"image mode {mode} cannot be converted to RGB ({e})") from None


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
