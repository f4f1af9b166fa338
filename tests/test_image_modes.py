"""Image modes beyond 8-bit RGB through the one conversion (`image_processing.to_rgb`) and the raw-sample
decoder (`checked_reader.decode_image`): 16-bit data is scaled (not clipped to white), transparency is
blended on white, CMYK goes through PIL, and modes without a known 8-bit scale are skipped by name."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cm3leon.data.checked_reader import SKIP_REASONS, SkippedSample, decode_image
from cm3leon.tokenizers.image_processing import UnsupportedImageMode, preprocess, to_pil, to_rgb

V16 = np.array([[0, 4000, 32768, 65535, 257 * 7]], dtype=np.uint16)
V16_TO_8 = np.array([[0, 15, 128, 255, 7]], dtype=np.uint8)  # the high byte: the inverse of x * 257


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3]) written by hand: PIL cannot write 16-bit RGB."""
    h, w = arr.shape[:2]
    colour_type = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def rgb(data: bytes) -> np.ndarray:
    image = decode_image(data)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_16bit_grey_png_is_scaled_not_clipped():
    image = Image.open(io.BytesIO(png16(V16)))
    assert image.mode == "I;16"  # what PIL makes of it
    out = rgb(png16(V16))
    assert (out == V16_TO_8[..., None]).all()  # grey in all three channels
    # the float pipeline the VQGAN sees agrees: mid-grey stays mid-grey, not white
    assert preprocess(Image.open(io.BytesIO(png16(np.full((8, 8), 32768, np.uint16)))), 8).abs().max() < 0.01


def test_16bit_rgb_png_keeps_its_high_byte():
    arr = np.stack([V16, V16[:, ::-1], np.full_like(V16, 32768)], -1)
    out = rgb(png16(arr))
    assert (out[..., 0] == V16_TO_8).all() and (out[..., 1] == V16_TO_8[:, ::-1]).all() and (out[..., 2] == 128).all()


def test_palette_with_transparency_is_blended_on_white():
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    image.putpixel((1, 0), 1)
    image.putpixel((2, 0), 2)
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=1)  # palette entry 1 (blue) is fully transparent: a tRNS chunk
    out = rgb(buf.getvalue())
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 255, 0]]


def test_cmyk_goes_through_pil():
    image = Image.new("CMYK", (3, 1))
    for x, px in enumerate([(0, 255, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)]):
        image.putpixel((x, 0), px)
    out = rgb(encoded(image, "TIFF"))
    assert out[0].tolist() == [[255, 0, 0], [0, 0, 0], [255, 255, 255]]


def test_grey_with_alpha_is_blended_on_white():
    arr = np.array([[[0, 0], [100, 255], [0, 128]]], dtype=np.uint8)  # (L, A)
    out = rgb(encoded(Image.fromarray(arr, "LA"), "PNG"))
    assert out[0, :, 0].tolist() == [255, 100, 127] and (out[..., 0] == out[..., 2]).all()


def test_32bit_int_is_read_as_16bit():
    arr = V16.astype(np.int32)
    out = rgb(encoded(Image.fromarray(arr), "TIFF"))
    assert Image.fromarray(arr).mode == "I" and (out == V16_TO_8[..., None]).all()


def test_32bit_int_outside_16bit_is_skipped_by_name():
    arr = np.array([[-5, 70000]], dtype=np.int32)
    with pytest.raises(SkippedSample) as e:
        decode_image(encoded(Image.fromarray(arr), "TIFF"))
    assert e.value.reason == "unsupported_mode" and "unsupported_mode" in SKIP_REASONS
    with pytest.raises(UnsupportedImageMode, match="I"):
        to_rgb(Image.fromarray(arr))


def test_float_in_unit_range_is_scaled_and_other_floats_skipped():
    arr = np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32)
    out = rgb(encoded(Image.fromarray(arr), "TIFF"))
    assert out[0, :, 1].tolist() == [0, 128, 255, 64]
    with pytest.raises(SkippedSample, match="unsupported_mode"):
        decode_image(encoded(Image.fromarray(arr * 255), "TIFF"))


def test_uint16_arrays_are_scaled_like_16bit_files():
    assert (np.asarray(to_rgb(to_pil(V16))) == V16_TO_8[..., None]).all()
    arr = np.stack([V16] * 3, -1)
    assert (np.asarray(to_rgb(to_pil(arr))) == V16_TO_8[..., None]).all()
