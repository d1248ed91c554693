"""The repeated-row PNG encoder: every image decodes (PIL, zlib's checksums) to exactly the array given."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import PIL.Image
import pytest

from llm_heatmap.viz.png import _adler32_repeat, encode_png


def image_with_repeats(height, width, seed, alpha=False):
    """Random pixels where each row repeats the one above with probability 0.7 (a nearest-upscaled grid)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    for y in range(1, height):
        if rng.random() < 0.7:
            rows[y] = rows[y - 1]
    if not alpha:
        rows[..., 3] = 255
    return rows


def chunks(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, found = 8, {}
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert crc == zlib.crc32(body, zlib.crc32(kind)), kind
        found[kind] = body
        position += 12 + length
    return found


@pytest.mark.parametrize("height,width", [(1, 1), (1, 9), (7, 1), (40, 33), (300, 257), (3, 12000)])
@pytest.mark.parametrize("alpha", [False, True])
def test_decodes_to_the_same_pixels(tmp_path, height, width, alpha):
    rgba = image_with_repeats(height, width, seed=height * width, alpha=alpha)
    path = tmp_path / "image.png"
    encode_png(rgba, path)
    with PIL.Image.open(path) as image:
        assert image.mode == ("RGBA" if alpha else "RGB")
        decoded = np.asarray(image)
    assert np.array_equal(decoded, rgba if alpha else rgba[..., :3])
    raw = zlib.decompress(chunks(path)[b"IDAT"])  # checks the Adler-32 of the whole stream
    assert len(raw) == height * (1 + width * (4 if alpha else 3))


@pytest.mark.parametrize("pattern", ["all rows equal", "no row repeats", "only the last row differs"])
def test_row_structures(tmp_path, pattern):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (50, 20, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    if pattern == "all rows equal":
        rgba[:] = rgba[0]
    elif pattern == "only the last row differs":
        rgba[:-1] = rgba[0]
    encode_png(rgba, tmp_path / "image.png")
    with PIL.Image.open(tmp_path / "image.png") as image:
        assert np.array_equal(np.asarray(image), rgba[..., :3])


def test_one_transparent_pixel_keeps_alpha_and_dpi_is_recorded(tmp_path):
    rgba = np.full((30, 30, 4), 255, dtype=np.uint8)
    rgba[29, 29, 3] = 0
    encode_png(rgba, tmp_path / "image.png", dpi=300)
    with PIL.Image.open(tmp_path / "image.png") as image:
        assert image.mode == "RGBA" and np.array_equal(np.asarray(image), rgba)
        assert image.info["dpi"] == pytest.approx((300, 300), abs=0.01)


def test_repeated_rows_cost_almost_no_bytes(tmp_path):
    rgba = image_with_repeats(4, 1000, seed=3)
    tall = np.repeat(rgba, 500, axis=0)
    encode_png(rgba, tmp_path / "short.png")
    encode_png(tall, tmp_path / "tall.png")
    short_size, tall_size = (tmp_path / "short.png").stat().st_size, (tmp_path / "tall.png").stat().st_size
    assert tall_size < short_size + 4 * 500 * 40  # 2000 more rows of 1000 px: a few dozen bytes each


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 1000])
def test_adler32_of_repeated_blocks(count):
    head, block = b"grid header", bytes([2]) + bytes(30)
    expected = zlib.adler32(head + block * count)
    assert _adler32_repeat(zlib.adler32(head), zlib.adler32(block), len(block), count) == expected


def test_rejects_arrays_that_are_not_rgba_bytes(tmp_path):
    for bad in (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.float32), np.zeros((0, 4, 4), np.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            encode_png(bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
