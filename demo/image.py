"""Image grids and a dependency-free PNG writer (zlib + struct, PNG spec ISO/IEC 15948).

The demo must run with only torch + numpy, so it writes 8-bit greyscale or RGB PNGs
itself: signature, ``IHDR``, optional ``tEXt`` chunks, one ``IDAT`` with filter type 0
per scanline, ``IEND``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["PNG_SIGNATURE", "grid", "tile", "to_uint8", "write_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def write_png(path: str | Path, pixels: np.ndarray, text: Mapping[str, str] | None = None) -> Path:
    """Write ``pixels`` (uint8, ``(H, W)`` grey or ``(H, W, 3)`` RGB) as a PNG file."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"write_png needs uint8 (H, W) or (H, W, 3), got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2
    rows = pixels.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    body = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
    for key, value in (text or {}).items():
        body += _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1", "replace"))
    body += _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    path = Path(path)
    path.write_bytes(PNG_SIGNATURE + body)
    return path


def to_uint8(images: Tensor) -> np.ndarray:
    """Map images in ``[-1, 1]`` to uint8 ``(N, H, W)`` (first channel) or ``(N, H, W, 3)``."""
    images = images.detach().to("cpu", torch.float32)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return pixels[:, 0] if pixels.shape[1] == 1 else pixels[:, :3].transpose(0, 2, 3, 1)


def tile(pixels: np.ndarray, columns: int, pad: int = 1, fill: int = 0) -> np.ndarray:
    """Arrange ``(N, H, W)`` uint8 images in a grid with ``columns`` per row."""
    n, h, w = pixels.shape
    rows = -(-n // columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad), fill, np.uint8)
    for k in range(n):
        r, c = divmod(k, columns)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        out[top:top + h, left:left + w] = pixels[k]
    return out


def grid(
    cells: Sequence[Sequence[np.ndarray | None]], scale: int = 2, gap: int = 4, fill: int = 40
) -> np.ndarray:
    """Join a 2-D table of equally sized uint8 tiles (``None`` = empty cell) into one image.

    Each tile is enlarged ``scale`` times by pixel repetition; ``gap`` pixels of grey
    ``fill`` separate the cells.
    """
    sample = next(c for row in cells for c in row if c is not None)
    h, w = sample.shape[0] * scale, sample.shape[1] * scale
    n_rows, n_cols = len(cells), max(len(row) for row in cells)
    out = np.full((n_rows * (h + gap) + gap, n_cols * (w + gap) + gap), fill, np.uint8)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            big = np.repeat(np.repeat(cell, scale, axis=0), scale, axis=1)
            top, left = gap + r * (h + gap), gap + c * (w + gap)
            out[top:top + h, left:left + w] = big
    return out
