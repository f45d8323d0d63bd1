import io

import numpy as np
import pytest
from PIL import Image

from workbench.data.images import UnreadableImage, array_to_image, open_rgb, to_rgb


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "RGB", "YCbCr"])
def test_plain_modes_become_rgb(mode):
    img = Image.new(mode, (5, 4))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 4)


def test_rgba_is_composited_on_black():
    img = Image.new("RGBA", (2, 1), (200, 100, 50, 0))
    img.putpixel((1, 0), (200, 100, 50, 255))
    out = np.asarray(to_rgb(img))
    assert out[0, 0].tolist() == [0, 0, 0]          # fully transparent -> background
    assert out[0, 1].tolist() == [200, 100, 50]     # opaque pixel kept


def test_la_and_palette_with_transparency():
    la = Image.new("LA", (1, 1), (120, 255))
    assert np.asarray(to_rgb(la))[0, 0].tolist() == [120, 120, 120]
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.info["transparency"] = 0
    assert np.asarray(to_rgb(p))[0, 0].tolist() == [10, 20, 30]


def test_16bit_is_stretched_not_truncated():
    # A 12-bit image stored in 16 bits: dividing by 256 would leave it almost black.
    arr = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = np.asarray(to_rgb(img))
    assert out[..., 0].tolist() == [[0, 64], [128, 255]]


def test_float_and_uint16_arrays():
    out = np.asarray(array_to_image(np.array([[0.0, 0.5], [1.0, 1.0]], dtype=np.float32)))
    assert out[..., 0].tolist() == [[0, 128], [255, 255]]
    assert array_to_image(np.zeros((3, 3, 1), np.uint8)).mode == "RGB"
    with pytest.raises(UnreadableImage, match="not an image"):
        array_to_image(np.zeros((2, 2, 2, 2)))


def test_corrupt_and_truncated_files_raise_clear_reason(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImage, match="UnidentifiedImageError"):
        open_rgb(bad)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UnreadableImage):
        open_rgb(trunc)
    with pytest.raises(UnreadableImage, match="not found"):
        open_rgb(tmp_path / "missing.png")
