"""Data sets and image files.

A data set is a map-style set of uint8 quantisation *levels* (C, H, W) in [0, n_bins) plus ``n_bins``
(:mod:`fastglow.app.datasets` reads them one image at a time):
    digits   scikit-learn's bundled 8x8 digits, 17 grey levels (n_bins = 17), no network
    folder   every image under a directory (Pillow), resized so the shorter side is ``img_size`` and
             centre-cropped; 8-bit pixels v become levels v >> (8 - n_bits), n_bins = 2**n_bits
    LMDB     a folder holding data.mdb in rosinality's layout (key f"{size}-{i:05d}" -> JPEG bytes, "length")
    .npy     a uint8 array (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3}, read image by image (e.g. from
             ``fastglow prepare``); quantised like a folder
    .npz     the same layout under the key ``images`` (or ``npz_key``; an archive with a single array needs
             none), read whole: for small sets (convert a large one to .npy, which is never read whole)
The model sees x = (level + u) / n_bins - 0.5 with u ~ U[0, 1) (uniform dequantisation, one bin wide).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from . import datasets
from .errors import InputError, one_line
from .images import convert_channels, refit

DIGITS_LEVELS = 17  # pixel values 0..16
NPZ_DEFAULT_KEY = "images"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_digits(generator: torch.Generator | None = None, test_fraction: float = 0.2):
    """(train, test) integer tensors of shape (N, 1, 8, 8) with values in 0..16, shuffled and split."""
    return split_dataset(digit_levels().to(torch.int64), test_fraction, generator)


def digit_levels() -> torch.Tensor:
    """All 1797 digits as uint8 levels (N, 1, 8, 8) in 0..16, read from the installed scikit-learn."""
    from sklearn.datasets import load_digits as sklearn_digits

    return torch.from_numpy(sklearn_digits().images.astype(np.uint8)).unsqueeze(1)


def split_dataset(levels: torch.Tensor, test_fraction: float, generator: torch.Generator | None = None):
    """Shuffle with ``generator`` and hold out round(N * test_fraction) images: -> (train, test)."""
    order = torch.randperm(levels.shape[0], generator=generator)
    n_test = int(round(levels.shape[0] * test_fraction))
    return levels[order[n_test:]], levels[order[:n_test]]


def load_dataset(source: str, img_size: int | None = None, channels: int | None = None,
                 n_bits: int | None = None, npz_key: str | None = None):
    """``source`` -> (every image's levels uint8 (N, C, H, W) in memory, n_bins): :func:`open_dataset`, read
    whole (eval and morph); an unreadable image refuses, naming it."""
    images, n_bins = open_dataset(source, img_size, channels, n_bits, npz_key)
    return images.materialise(), n_bins


def open_dataset(source: str, img_size: int | None = None, channels: int | None = None,
                 n_bits: int | None = None, npz_key: str | None = None):
    """``source`` ("digits", a folder of images, rosinality's LMDB folder, an .npy or an .npz) -> (a map-style
    :class:`~fastglow.app.datasets.ImageSet` of uint8 levels, n_bins), reading no more than a listing, a sample
    of headers or an array header. ``img_size`` None keeps the native size (folders, LMDB: 64); ``channels``
    None keeps the native count (folders: 1 if every sampled image is grey, else 3); ``n_bits`` None means 5
    for 8-bit sources (a prepared .npy: the bits it was prepared at)."""
    if source == "digits":
        if n_bits is not None:
            raise InputError("--n-bits applies to 8-bit images; the digits have 17 levels of their own")
        if channels not in (None, 1):
            raise InputError(f"the digits are grey (1 channel), --channels {channels} was given")
        if img_size not in (None, 8):
            raise InputError(f"the digits are 8x8, --img-size {img_size} was given")
        return datasets.TensorImages("digits", digit_levels()), DIGITS_LEVELS
    path = Path(source)
    if not (path.is_dir() or path.is_file()):
        raise InputError(f"{source}: no such folder or file (--data takes 'digits', a folder of images, an LMDB "
                         "folder, an .npy or an .npz)")
    if path.is_file() and datasets.is_npy(path):
        images, n_bits = datasets.open_npy(path, img_size, channels, n_bits)
        return images, 2 ** n_bits
    n_bits = 5 if n_bits is None else n_bits
    if not 1 <= n_bits <= 8:
        raise InputError(f"--n-bits must be in 1..8, got {n_bits}")
    if path.is_file():
        levels = torch.from_numpy(load_npz(path, npz_key, img_size, channels) >> (8 - n_bits))
        if levels.shape[2] != levels.shape[3]:
            raise InputError(f"{source}: images are {levels.shape[3]}x{levels.shape[2]}; pass --img-size to "
                             "centre-crop them square")
        return datasets.TensorImages(str(path), levels), 2 ** n_bits
    if (path / "data.mdb").is_file():
        return datasets.open_lmdb_set(path, img_size, channels, 8 - n_bits), 2 ** n_bits
    return datasets.open_folder(path, img_size or 64, channels, 8 - n_bits), 2 ** n_bits


def load_npz(path: Path, key: str | None, img_size: int | None, channels: int | None) -> np.ndarray:
    """A uint8 image array from an .npz -> (N, C, H, W); layout NHWC/NCHW/NHW detected from C in {1, 3}."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if key is None:
                key = NPZ_DEFAULT_KEY if NPZ_DEFAULT_KEY in names or len(names) != 1 else names[0]
            if key not in names:
                raise InputError(f"{path}: no array named {key!r} (it holds {names}); choose one with --npz-key")
            arr = archive[key]
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: cannot read .npz ({one_line(err)})") from None
    if arr.dtype != np.uint8:
        raise InputError(f"{path}: array {key!r} has dtype {arr.dtype}, expected uint8 images")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] not in (1, 3) and arr.shape[3] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[0] == 0:
        raise InputError(f"{path}: array {key!r} has shape {arr.shape}; expected uint8 images (N, H, W), "
                         "(N, C, H, W) or (N, H, W, C) with C = 1 or 3")
    if channels is not None and channels != arr.shape[1]:
        arr = convert_channels(arr, channels)
    if img_size is not None and arr.shape[2:] != (img_size, img_size):
        if min(arr.shape[2:]) < img_size:
            raise InputError(f"{path}: images are {arr.shape[3]}x{arr.shape[2]}, smaller than --img-size {img_size}")
        arr = np.stack([refit(a, img_size) for a in arr])
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def dequantize(levels: torch.Tensor, n_bins: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer levels in [0, n_bins) -> floats in [-0.5, 0.5) plus uniform noise of one bin's width."""
    noise = torch.rand(levels.shape, generator=generator, dtype=dtype)
    return (levels.to(dtype) + noise) / n_bins - 0.5


def bin_centres(levels: torch.Tensor, n_bins: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic dequantisation: each level to the centre of its bin, (level + 1/2) / n_bins - 1/2."""
    return (levels.to(dtype) + 0.5) / n_bins - 0.5


# ----------------------------------------------------------------------------------------------
# Writing images
# ----------------------------------------------------------------------------------------------
def to_pixels(x: torch.Tensor, n_bins: int) -> np.ndarray:
    """Model space [-0.5, 0.5] -> uint8 pixels v = round(255 level / (n_bins - 1)),
    level = clamp(floor((x + 1/2) n_bins), 0, n_bins - 1)."""
    levels = torch.clamp(torch.floor((x.detach().float().cpu() + 0.5) * n_bins), 0, n_bins - 1)
    return torch.round(levels * (255.0 / (n_bins - 1))).to(torch.uint8).numpy()


def to_levels(pixels: np.ndarray, n_bins: int) -> torch.Tensor:
    """uint8 pixels -> levels floor(v n_bins / 256) (v >> (8 - n_bits) for n_bins = 2**n_bits; inverts to_pixels)."""
    return torch.from_numpy((pixels.astype(np.int64) * n_bins) // 256).to(torch.uint8)


def image_grid(pixels: np.ndarray, nrow: int | None = None, padding: int = 2, zoom: int = 1) -> np.ndarray:
    """uint8 (N, C, H, W) -> one (C, rows*(H*zoom+p)+p, nrow*(W*zoom+p)+p) picture on a black background."""
    if zoom > 1:
        pixels = pixels.repeat(zoom, axis=2).repeat(zoom, axis=3)
    n, c, h, w = pixels.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = -(-n // nrow)
    grid = np.zeros((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), dtype=np.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid


def save_png(chw: np.ndarray, path) -> None:
    """Write uint8 (C, H, W), C in {1, 3}, as a PNG (through a temporary file and an atomic rename)."""
    import os

    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(chw[0] if chw.shape[0] == 1 else np.ascontiguousarray(chw.transpose(1, 2, 0)))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        im.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave the temporary file behind
        raise


def save_image_grid(x: torch.Tensor, path, n_bins: int, nrow: int | None = None, zoom: int = 1) -> None:
    """Images in model space (N, C, H, W) -> a PNG grid (quantised back to the data's levels)."""
    save_png(image_grid(to_pixels(x, n_bins), nrow=nrow, zoom=zoom), path)


def load_split(cfg, world: int) -> tuple[datasets.Split, datasets.Split]:
    """A run's data (``cfg``: its TrainConfig): open and split the data set, filling in cfg's data-derived
    fields (channels, img_size, n_bins, n_bits, test_fraction) -> (train, test) splits of uint8 levels."""
    images, n_bins = open_dataset(cfg.data, cfg.img_size, cfg.channels, cfg.n_bits, cfg.npz_key)
    cfg.channels, cfg.img_size, cfg.n_bins = images.channels, images.size, n_bins
    if cfg.data != "digits":
        cfg.n_bits = n_bins.bit_length() - 1
    if cfg.img_size % 2 ** cfg.n_block:
        raise InputError(f"{cfg.data}: image size {cfg.img_size} is not a multiple of 2**n_block = "
                         f"{2 ** cfg.n_block}: use a smaller --n-block or another --img-size")
    if cfg.test_fraction is None:
        cfg.test_fraction = 0.2 if cfg.data == "digits" else 0.1
    train, test = datasets.split_indices(len(images), cfg.test_fraction, cfg.split_seed)
    if test.shape[0] == 0 or train.shape[0] == 0:
        raise InputError(f"{cfg.data}: {len(images)} images split by --test-fraction {cfg.test_fraction} "
                         "leave an empty training or held-out set")
    if cfg.batch % world:
        raise InputError(f"--batch {cfg.batch} (the global batch) must be divisible by the {world} processes")
    return datasets.Split(images, train), datasets.Split(images, test)
