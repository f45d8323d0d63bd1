"""Turning whatever a dataset holds into an RGB PIL image.

Medical and remote-sensing sets come as grayscale, palette, CMYK, RGBA and 16-bit images;
CLIP encoders want 8-bit RGB. Conversion rules (why each one):

* ``L``/``1``: replicated to three channels (what ``Image.convert("RGB")`` does).
* ``RGBA``/``LA``/``P`` with transparency: composited on a black background, so a
  transparent border looks like the dark background of a scan rather than a white sheet.
* ``CMYK``/``YCbCr``/``HSV``/``LAB``: PIL's colour conversion.
* 16-bit and float (``I;16``, ``I``, ``F``): min–max stretched to 0–255 per image. Medical
  16-bit images often use 10–12 bits only, so dividing by 256 would leave them nearly black.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# A truncated JPEG must fail loudly, not decode into a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class UnreadableImage(Exception):
    """An image that could not be decoded; carries the reason for the skip record."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an 8-bit RGB copy of ``image`` whatever its mode (see module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.nan_to_num(scaled).round().astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_image(array: np.ndarray) -> Image.Image:
    """An RGB image from a HxW, HxWx1, HxWx3 or HxWx4 array (uint8, uint16 or float)."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        if arr.dtype == np.uint8:
            return Image.fromarray(arr, "L").convert("RGB")
        return to_rgb(Image.fromarray(arr.astype(np.float32), "F"))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if arr.dtype != np.uint8:
            lo, hi = float(arr.min()), float(arr.max())
            arr = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).round().astype(np.uint8)
        return to_rgb(Image.fromarray(arr, "RGBA" if arr.shape[-1] == 4 else "RGB"))
    raise UnreadableImage(f"array of shape {arr.shape} is not an image (expected HxW, HxWx1, HxWx3 or HxWx4)")


def open_rgb(source) -> Image.Image:
    """Decode a path, bytes, array or PIL image fully and return it as RGB.

    Raises :class:`UnreadableImage` with a short reason for anything that cannot be decoded,
    so the caller can skip and record it instead of crashing a long encoding run.
    """
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, np.ndarray):
            return array_to_image(source)
        elif isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, dict) and ("bytes" in source or "path" in source):
            # Hugging Face `datasets` Image feature with decode=False.
            if source.get("bytes"):
                image = Image.open(io.BytesIO(source["bytes"]))
            else:
                image = Image.open(source["path"])
        else:
            path = Path(source)
            if not path.is_file():
                raise UnreadableImage(f"file not found: {path}")
            image = Image.open(path)
        image.load()  # force the full decode here, where errors can be caught
        return to_rgb(image)
    except UnreadableImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from None
