"""PNG encoding for images made mostly of repeated rows, such as grids upscaled by nearest neighbour.

At 300 dpi a grid repeats every token row dozens of times, and a general encoder (PIL) filters and
deflates every one of them: for a 57-megapixel grid that is most of the time `save_grid` takes.
Here only the rows that differ from the row above are filtered ("Sub") and deflated. A repeated row
is the "Up" filter of the row above, all zeros, and is deflated once; its bytes are then copied.
Every deflated piece comes from a fresh compressor and ends byte-aligned (a sync flush), so the
pieces concatenate into one valid zlib stream (the way pigz splits work), and runs of new rows
are deflated on several threads (zlib releases the GIL).
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_SUB, FILTER_UP = 1, 2
ADLER_BASE = 65521


def encode_png(rgba: np.ndarray, path, *, dpi: float | None = None) -> None:
    """Write an `(height, width, 4)` uint8 RGBA array to `path` as a PNG: RGB when every pixel is opaque."""
    data = png_bytes(rgba, dpi=dpi)
    with open(path, "wb") as file:
        file.write(data)


def png_bytes(rgba: np.ndarray, *, dpi: float | None = None) -> bytes:
    """The PNG file of an `(height, width, 4)` uint8 RGBA array (see the module docstring)."""
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4 or 0 in rgba.shape:
        raise ValueError(f"encode_png takes a non-empty (height, width, 4) uint8 array, not {rgba.dtype} {rgba.shape}")
    height, width = rgba.shape[:2]
    pixels = np.ascontiguousarray(rgba).view(np.uint32).reshape(height, width)
    new_row = np.ones(height, dtype=bool)
    new_row[1:] = (pixels[1:] != pixels[:-1]).any(axis=1)
    starts = np.flatnonzero(new_row)  # rows that differ from the row above (row 0 always)
    rows = rgba[starts]
    opaque = bool((rows[..., 3] == 255).all())
    if opaque:
        rows = rows[..., :3]
    filtered = _sub_filter(np.ascontiguousarray(rows).reshape(len(starts), -1), rows.shape[-1])

    # pieces of the stream: each run of consecutive new rows, then the repeats that follow it
    run_begin = np.flatnonzero(np.diff(starts, prepend=-2) != 1)
    run_end = np.append(run_begin[1:], len(starts))
    repeats = np.diff(np.append(starts, height))[run_end - 1] - 1
    up_row = np.zeros(filtered.shape[1], dtype=np.uint8)
    up_row[0] = FILTER_UP
    up_deflated, up_adler = _deflate(up_row), zlib.adler32(up_row)

    runs = [filtered[begin:end] for begin, end in zip(run_begin, run_end)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        done = list(pool.map(lambda run: (_deflate(run), zlib.adler32(run)), runs))
    pieces, adler = [b"\x78\x01"], 1
    for run, (data, run_adler), count in zip(runs, done, repeats):
        pieces.append(data)
        adler = _adler32_combine(adler, run_adler, run.size)
        if count:
            pieces.append(up_deflated * int(count))
            adler = _adler32_repeat(adler, up_adler, up_row.size, int(count))
    pieces.append(zlib.compressobj(1, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # the final, empty block
    pieces.append(struct.pack(">I", adler))

    color_type = 2 if opaque else 6
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))]
    if dpi:
        per_metre = round(dpi / 0.0254)
        chunks.append(_chunk(b"pHYs", struct.pack(">IIB", per_metre, per_metre, 1)))
    chunks += [_chunk(b"IDAT", b"".join(pieces)), _chunk(b"IEND", b"")]
    return SIGNATURE + b"".join(chunks)


def _sub_filter(rows: np.ndarray, bytes_per_pixel: int) -> np.ndarray:
    """`"rows bytes"` -> the same rows with PNG filter 1 (each byte minus the byte one pixel left, mod 256)."""
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = FILTER_SUB
    out[:, 1:1 + bytes_per_pixel] = rows[:, :bytes_per_pixel]
    np.subtract(rows[:, bytes_per_pixel:], rows[:, :-bytes_per_pixel], out=out[:, 1 + bytes_per_pixel:])
    return out


def _deflate(data) -> bytes:
    """Raw deflate of `data` on its own, ending byte-aligned and not final."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


def _adler32_combine(adler_a: int, adler_b: int, length_b: int) -> int:
    """Adler-32 of `a + b` from the checksums of `a` and `b` (zlib's adler32_combine)."""
    low = ((adler_a & 0xFFFF) + (adler_b & 0xFFFF) - 1) % ADLER_BASE
    high = ((adler_a >> 16) + (adler_b >> 16) + length_b * (adler_a & 0xFFFF) - length_b) % ADLER_BASE
    return low | (high << 16)


def _adler32_repeat(adler: int, adler_b: int, length_b: int, count: int) -> int:
    """Adler-32 after appending `count` copies of a block `b` (by doubling, so a long run costs log2(count))."""
    block, block_length = adler_b, length_b
    while count:
        if count & 1:
            adler = _adler32_combine(adler, block, block_length)
        block = _adler32_combine(block, block, block_length)
        block_length *= 2
        count >>= 1
    return adler


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
