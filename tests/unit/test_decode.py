"""data.decode_rgb: JPEGs through TurboJPEG (simplejpeg) give Pillow's pixels exactly; the rest,
and JPEGs simplejpeg refuses, get Pillow's decode and its verdict."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmpipe.data import decode_rgb
from mmpipe.shard import encode_jpeg


def pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)


def photo_like(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: chroma detail that up-sampling methods would render apart."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, mode: str = "RGB", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", **save)
    return buf.getvalue()


@pytest.mark.parametrize("size", [17, 64, 224])
def test_shard_samples_decode_to_pillows_pixels(size):
    for seed in range(8):
        data = encode_jpeg(Image.fromarray(photo_like(size, size, seed)), 90)
        got = decode_rgb(data)
        assert got.dtype == np.uint8 and got.shape == (size, size, 3)
        assert got.flags.writeable  # torch.from_numpy without a warning
        np.testing.assert_array_equal(got, pillow(data))


@pytest.mark.parametrize(
    "mode,save",
    [
        ("RGB", {"subsampling": 0, "quality": 95}),  # 4:4:4
        ("RGB", {"subsampling": 1}),  # 4:2:2
        ("RGB", {"progressive": True}),
        ("L", {}),  # greyscale: three equal channels
        ("CMYK", {}),  # Pillow's CMYK -> RGB, not TurboJPEG's
    ],
)
def test_other_jpeg_layouts_match_pillow(mode, save):
    data = jpeg(photo_like(48, 80, 3), mode, **save)
    np.testing.assert_array_equal(decode_rgb(data), pillow(data))


def test_png_and_broken_jpegs_get_pillows_decode_and_verdict():
    buf = io.BytesIO()
    Image.fromarray(photo_like(20, 30, 1)).save(buf, format="PNG")
    np.testing.assert_array_equal(decode_rgb(buf.getvalue()), photo_like(20, 30, 1))
    data = jpeg(photo_like(64, 64, 2))
    with pytest.raises(OSError, match="truncated"):  # Pillow's error, as the loader reported it
        decode_rgb(data[: len(data) // 2])
    with pytest.raises(OSError):
        decode_rgb(b"\xff\xd8not a jpeg at all")
