"""Turning whatever a dataset holds into an RGB PIL image.

Medical and remote-sensing sets come as grayscale, palette, CMYK, RGBA and 16-bit images;
CLIP encoders want 8-bit RGB. Conversion rules (why each one):

* ``L``/``1``: replicated to three channels (what ``Image.convert("RGB")`` does).
* ``RGBA``/``LA``/``P`` with transparency: composited on a black background, so a
  transparent border looks like the dark background of a scan rather than a white sheet.
* ``CMYK``/``YCbCr``/``HSV``/``LAB``: PIL's colour conversion.
* 16-bit and float (``I;16``, ``I``, ``F``): min–max stretched to 0–255 per image. Medical
  16-bit images often use 10–12 bits only, so dividing by 256 would leave them nearly black.

Two more rules for image files:

* EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo stored sideways with
  an orientation tag is encoded the way every viewer shows it.
* Size limit: an image with more than ``max_image_pixels`` pixels (default: PIL's
  ``Image.MAX_IMAGE_PIXELS``, about 89 Mpx) is refused *before* it is decoded, as a possible
  decompression bomb, and reported as unreadable (skipped with its file name) like any broken
  file. Raise the limit for trusted large scans, e.g. ``from_folder(..., max_image_pixels=400_000_000)``.
"""
from __future__ import annotations

import contextlib
import io
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

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
    if arr.dtype == object:
        raise UnreadableImage("an array of Python objects is not an image (expected numbers)")
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            # min/max scaling would turn the whole image black (or NaN): skip it like an undecodable file
            raise UnreadableImage(f"{bad} of {arr.size} pixel values are NaN or infinite")
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


_PIL_LIMIT_LOCK = threading.Lock()


def effective_pixel_limit(max_image_pixels: int | None) -> int | None:
    """The limit in force: the caller's, else PIL's ``Image.MAX_IMAGE_PIXELS`` (None: no limit)."""
    if max_image_pixels is None:
        return Image.MAX_IMAGE_PIXELS
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, (int, np.integer)) \
            or max_image_pixels < 1:
        from ..errors import ConfigError

        raise ConfigError(f"max_image_pixels must be a positive integer (pixels per image), got {max_image_pixels!r}.")
    return int(max_image_pixels)


@contextlib.contextmanager
def _pil_size_check_lifted(limit: int | None):
    """PIL refuses images above 2 × ``Image.MAX_IMAGE_PIXELS`` inside ``Image.open``; our own check
    (right after opening) replaces it, so lift PIL's while a caller's larger limit applies."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pil_limit = Image.MAX_IMAGE_PIXELS
        if pil_limit is None or (limit is not None and limit <= pil_limit):
            yield
            return
        with _PIL_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = None
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit


def _open_file(opener, limit: int | None) -> Image.Image:
    with _pil_size_check_lifted(limit):
        image = opener()
    pixels = image.size[0] * image.size[1]
    if limit is not None and pixels > limit:
        raise UnreadableImage(f"image is {image.size[0]}x{image.size[1]} = {pixels:,} pixels, above "
                              f"max_image_pixels={limit:,} (a possible decompression bomb); if the file is "
                              "trusted, raise max_image_pixels")
    return image


def open_rgb(source, max_image_pixels: int | None = None) -> Image.Image:
    """Decode a path, bytes, array or PIL image fully and return it as RGB.

    Raises :class:`UnreadableImage` with a short reason for anything that cannot be decoded
    (including an image above ``max_image_pixels``, see the module docstring), so the caller
    can skip and record it instead of crashing a long encoding run.
    """
    limit = effective_pixel_limit(max_image_pixels)
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, np.ndarray):
            return array_to_image(source)
        elif isinstance(source, (bytes, bytearray)):
            image = _open_file(lambda: Image.open(io.BytesIO(source)), limit)
        elif isinstance(source, dict) and ("bytes" in source or "path" in source):
            # Hugging Face `datasets` Image feature with decode=False.
            if source.get("bytes"):
                image = _open_file(lambda: Image.open(io.BytesIO(source["bytes"])), limit)
            else:
                image = _open_file(lambda: Image.open(source["path"]), limit)
        else:
            path = Path(source)
            if not path.is_file():
                raise UnreadableImage(f"file not found: {path}")
            image = _open_file(lambda: Image.open(path), limit)
        with _pil_size_check_lifted(limit):
            image.load()  # force the full decode here, where errors can be caught
        return to_rgb(_upright(image))
    except UnreadableImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from None


def check_decodes(path, max_image_pixels: int | None = None) -> None:
    """Raise :class:`UnreadableImage` if the file at ``path`` would not decode; return nothing.

    The load-time check of every file, made so that the full decode happens once, when the image
    is encoded:

    * JPEG: decoded at 1/8 scale (libjpeg's DCT scaling still reads the whole compressed stream,
      so a truncated or corrupt file fails, at about a third of the cost of a full decode);
    * PNG: every chunk's CRC is checked without inflating the pixels (``Image.verify``), which
      catches truncation and corruption at a fraction of a decode's cost — a large scan or tile
      is decompressed once, by the encoder;
    * other formats (TIFF, BMP, WebP, ...): decoded fully.

    A file that passes here but still fails to decode when encoded is skipped then, with its
    reason, like any unreadable image.
    """
    limit = effective_pixel_limit(max_image_pixels)
    path = Path(path)
    if not path.is_file():
        raise UnreadableImage(f"file not found: {path}")
    try:
        image = _open_file(lambda: Image.open(path), limit)
        if image.format == "PNG":
            image.verify()
            return
        if image.format == "JPEG":
            image.draft(image.mode, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
        with _pil_size_check_lifted(limit):
            image.load()
    except UnreadableImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error,
            Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (cameras store the sensor's rows and a tag saying how to turn them)."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block: keep the pixels as stored rather than drop the image
        return image
    return ImageOps.exif_transpose(image) if orientation not in (None, 1) else image
