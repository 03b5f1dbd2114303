"""Sizes checked before any work: a picture the command would write, and how many images are decoded at once.

A grid of n images of C x S x S pixels, zoomed by z, nrow to a row, 2 pixels of padding, holds
    C * (rows (S z + 2) + 2) * (nrow (S z + 2) + 2) bytes,  rows = ceil(n / nrow)
and its latents 4x as many (float32). Past MAX_GRID_BYTES the command refuses in one line, naming the size,
instead of running out of memory (a MemoryError, or the kernel's OOM kill) after the work.
"""

from __future__ import annotations

import math

from .errors import InputError

MAX_GRID_BYTES = 2 ** 28  # 256 MiB of pixels (1 GiB of float32 latents): 16k 64x64 RGB images, 4M digits
DECODE_BATCH = 64  # images decoded at once (the coupling networks' activations grow with it)


def grid_bytes(n: int, channels: int, size: int, zoom: int = 1, nrow: int | None = None, padding: int = 2) -> int:
    """Bytes of the uint8 grid :func:`fastglow.app.data.image_grid` builds (nrow None: a square grid)."""
    nrow = nrow or math.isqrt(n - 1) + 1  # ceil(sqrt(n)), n >= 1
    rows = -(-n // nrow)
    cell = size * zoom + padding
    return channels * (rows * cell + padding) * (nrow * cell + padding)


def check_grid(n: int, channels: int, size: int, zoom: int = 1, nrow: int | None = None, what: str = "--n") -> None:
    """Refuse (one line) a picture larger than MAX_GRID_BYTES."""
    size_bytes = grid_bytes(n, channels, size, zoom, nrow)
    if size_bytes > MAX_GRID_BYTES:
        raise InputError(f"{what}: a picture of {n} images of {channels}x{size}x{size} at --zoom {zoom} would take "
                         f"{size_bytes / 2 ** 30:.3g} GiB (the limit is {MAX_GRID_BYTES / 2 ** 30:.3g} GiB); use "
                         "fewer images or a smaller --zoom")
