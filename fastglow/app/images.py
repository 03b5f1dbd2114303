"""Image files: finding them under a folder, decoding one to uint8 levels of a given size and channel count
(Pillow), and converting arrays of images between grey and RGB or to another size.

An image is resized (Lanczos) so its shorter side is ``img_size``, then centre-cropped; grey -> RGB repeats the
channel, RGB -> grey is ITU-R 601 luma (Pillow's "L"); 16-bit grey is scaled to 8 bits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError, one_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def image_files(root: Path) -> list[Path]:
    """Every image file under ``root``, recursively (not into symlinked folders), in the data set's order: sorted
    as paths (part by part)."""
    return [Path(p) for p in image_paths(root)]


def image_paths(root: Path) -> list[str]:
    """:func:`image_files` as strings: one ``scandir`` per folder, no stat per file, no Path objects."""
    found, folders = [], [str(root)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    folders.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    found.append(entry.path)
    return sorted(found, key=lambda p: p.split(os.sep))


def read_image(path, img_size: int, channels: int, name=None) -> np.ndarray:
    """One image (a file, or a file object named ``name``) -> uint8 (channels, img_size, img_size): shorter side
    resized, centre-cropped. A JPEG at least twice as large is decoded at a reduced scale (1/2, 1/4 or 1/8, in
    the DCT) no smaller than twice the target, then resized (Pillow's thumbnail with reducing_gap=2): a
    1024x1024 JPEG trained at 256 decodes to 512x512 at a quarter of the cost."""
    from PIL import Image

    name = path if name is None else name
    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and min(im.size) >= 2 * img_size:
                im.draft(None, (2 * img_size, 2 * img_size))
            im.load()
            if min(im.size) < img_size:
                raise InputError(f"{name}: image is {im.width}x{im.height}, smaller than --img-size {img_size}")
            pixels = fit_image(to_8_bit(im, name).convert("L" if channels == 1 else "RGB"), img_size)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{name}: cannot read image ({one_line(err)})") from None
    pixels = np.asarray(pixels, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def to_8_bit(im, path):
    """Pillow's 16-bit grey modes (and "I" holding 0..65535, as older Pillow loads 16-bit PNGs) scaled to 8-bit
    "L", v8 = round(v16 * 255 / 65535) (Pillow's own conversion clips them at 255); float images refused."""
    from PIL import Image

    if im.mode == "F":
        raise InputError(f"{path}: floating-point image (mode F) has no fixed range; save it as 8 or 16 bits")
    if not im.mode.startswith("I"):
        return im
    values = np.asarray(im).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise InputError(f"{path}: 32-bit image with values outside 0..65535; save it as 8 or 16 bits")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")


def fit_image(im, img_size: int):
    """Resize (Lanczos) so the shorter side is ``img_size``, then crop the centre square."""
    from PIL import Image

    w, h = im.size
    if min(w, h) != img_size:
        scale = img_size / min(w, h)
        w, h = max(img_size, round(w * scale)), max(img_size, round(h * scale))
        im = im.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - img_size) // 2, (h - img_size) // 2
    return im.crop((left, top, left + img_size, top + img_size))


def convert_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(N, C, H, W) uint8: grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma (Pillow's "L")."""
    if channels == 3:
        return np.repeat(arr, 3, axis=1)
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), arr.astype(np.float64), axes=([0], [1]))
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[:, None]


def refit(chw: np.ndarray, img_size: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0))
    out = np.asarray(fit_image(im, img_size), dtype=np.uint8)
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)
