"""Map-style data sets read one image at a time (in DataLoader workers), never whole.

Every data set is an :class:`ImageSet` of N images (C, S, S) whose item i is the uint8 *levels*
``pixels(i) >> shift`` (shift = 8 - n_bits for 8-bit sources, 0 for the digits' own 17 levels):

    TensorImages   levels already in memory (the digits; a small .npz, read whole as before)
    FolderImages   one image file per item: decoded, shorter side resized to S (Lanczos), centre-cropped
    ArrayImages    a uint8 .npy (N, C, H, W), (N, H, W, C) or (N, H, W): item i reads image i only
    LmdbImages     rosinality's LMDB (stylegan2-pytorch prepare_data.py): key f"{S}-{i:05d}" holds image i's
                   encoded bytes, key "length" the count; each process opens its own environment

A :class:`Split` is the training or held-out part (a list of indices into the set). ``split[j]`` is
``(j, levels, reason)``: reason "" for a sound image, else why it could not be read (levels then zeros), so a
DataLoader never dies on a bad file. File descriptors and LMDB environments open lazily in the process that
reads (after a fork or a spawn), so a data set pickles as a few paths and numbers.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, one_line
from .images import GREY_MODES, IMAGE_EXTENSIONS, convert_channels, image_paths, read_image, refit

NPY_MAGIC = b"\x93NUMPY"
HEADER_SAMPLE = 256  # images whose headers are checked at start-up (all of them in a smaller set)


class ImageSet(torch.utils.data.Dataset):
    """N images of (channels, size, size) uint8 levels = pixels >> shift; subclasses give ``pixels(i)``."""

    in_memory = False

    def __init__(self, name: str, n: int, channels: int, size: int, shift: int):
        self.name, self.n, self.channels, self.size, self.shift = name, n, channels, size, shift

    def __len__(self) -> int:
        return self.n

    def pixels(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where image i comes from, for messages."""
        return f"{self.name}[{i}]"

    def levels(self, i: int) -> torch.Tensor:
        """Image i's levels (C, S, S) uint8; an unreadable image raises InputError naming it."""
        return torch.from_numpy(np.ascontiguousarray(self.pixels(i) >> self.shift))

    def item(self, i: int) -> tuple[torch.Tensor, str]:
        """(levels, "") or, for an image that cannot be read, (zeros, the reason in one line)."""
        try:
            return self.levels(i), ""
        except (InputError, OSError, ValueError) as err:
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), one_line(err)

    def __getitem__(self, i: int):
        return (i, *self.item(i))

    def materialise(self) -> torch.Tensor:
        """Every image's levels (N, C, S, S) in memory (eval and morph on small sets); a bad image refuses."""
        if not self.n:
            return torch.zeros(0, self.channels, self.size, self.size, dtype=torch.uint8)
        return torch.stack([self.levels(i) for i in range(self.n)])


class TensorImages(ImageSet):
    """Levels already in memory (N, C, S, S)."""

    in_memory = True

    def __init__(self, name: str, levels: torch.Tensor):
        super().__init__(name, levels.shape[0], levels.shape[1], levels.shape[2], 0)
        self.data = levels

    def levels(self, i: int) -> torch.Tensor:
        return self.data[i]

    def materialise(self) -> torch.Tensor:
        return self.data


class FolderImages(ImageSet):
    """Image files (sorted paths), each decoded, resized and centre-cropped when read."""

    def __init__(self, files: list[str], size: int, channels: int, shift: int, name: str):
        super().__init__(name, len(files), channels, size, shift)
        self.files = files

    def pixels(self, i: int) -> np.ndarray:
        return read_image(self.files[i], self.size, self.channels)

    def describe(self, i: int) -> str:
        return str(self.files[i])


class ArrayImages(ImageSet):
    """A C-order uint8 .npy read one image at a time at its offset in the file (``os.pread``, a descriptor per
    process): the page cache holds what is hot, nothing is mapped. (A memory map would do the same reads, but
    on Linux 6.x each page fault maps a whole large folio, about 1 MB: the resident size of a worker would
    grow by a megabyte per image it touched.) Images of another size are refitted, grey <-> RGB converted."""

    def __init__(self, path: Path, layout: str, size: int, channels: int, shift: int, n: int, offset: int,
                 item_shape: tuple[int, ...]):
        super().__init__(str(path), n, channels, size, shift)
        self.path, self.layout, self.offset, self.item_shape = path, layout, offset, item_shape
        self.item_bytes = int(np.prod(item_shape))
        self._fd, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

    def raw(self, i: int) -> np.ndarray:
        """Image i as stored, read from the file at its offset."""
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, self.item_bytes, self.offset + i * self.item_bytes)
        if len(data) != self.item_bytes:
            raise InputError(f"{self.path}: the file ends inside image {i} (truncated)")
        return np.frombuffer(data, dtype=np.uint8).reshape(self.item_shape)

    def pixels(self, i: int) -> np.ndarray:
        a = self.raw(i)
        a = a.transpose(2, 0, 1) if self.layout == "NHWC" else a[None] if self.layout == "NHW" else a
        if a.shape[0] != self.channels:
            a = convert_channels(a[None], self.channels)[0]
        if a.shape[1:] != (self.size, self.size):
            a = refit(a, self.size)
        return a


class LmdbImages(ImageSet):
    """rosinality's LMDB layout: key f"{size}-{i:05d}" -> encoded image bytes; opened once per process."""

    def __init__(self, path: Path, n: int, size: int, channels: int, shift: int):
        super().__init__(str(path), n, channels, size, shift)
        self.path = path

    def key(self, i: int) -> bytes:
        return f"{self.size}-{str(i).zfill(5)}".encode()

    def _get(self, key: bytes):
        env = open_lmdb(self.path)
        try:
            with env.begin(write=False) as txn:
                return txn.get(key)
        except Exception as err:  # noqa: BLE001 - lmdb.Error's many kinds (a corrupt page, a closed env)
            raise InputError(f"{self.path}[{key.decode()}]: cannot read from the LMDB ({one_line(err)})") from None

    def pixels(self, i: int) -> np.ndarray:
        raw = self._get(self.key(i))
        if raw is None:
            raise InputError(f"{self.describe(i)}: no such key in the LMDB")
        return read_image(io.BytesIO(raw), self.size, self.channels, name=self.describe(i))

    def describe(self, i: int) -> str:
        return f"{self.path}[{self.key(i).decode()}]"


_LMDB_ENVS: dict = {}  # (process id, path) -> environment: LMDB allows one per file and process


def open_lmdb(path: Path):
    """This process's read-only environment of the LMDB at ``path`` (opened on first use; no lock file: the
    data set is not written while training reads it)."""
    key = (os.getpid(), str(Path(path).resolve()))
    if key not in _LMDB_ENVS:
        for inherited in [k for k in _LMDB_ENVS if k[0] != key[0]]:  # a forked child never reads its parent's;
            _LMDB_ENVS.pop(inherited).close()  # closed, or py-lmdb refuses to open the file again here
        _LMDB_ENVS[key] = _open_lmdb(path)
    return _LMDB_ENVS[key]


def _open_lmdb(path: Path):
    try:
        import lmdb
    except ImportError:
        raise InputError(f"{path}: reading LMDB data sets needs the 'lmdb' package: pip install 'fastglow[lmdb]'"
                         ) from None
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
    except lmdb.Error as err:
        raise InputError(f"{path}: cannot open LMDB ({one_line(err)})") from None


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
class Split(torch.utils.data.Dataset):
    """Part of an ImageSet: item j is image ``indices[j]``; ``split[j]`` -> (j, levels, reason)."""

    def __init__(self, images: ImageSet, indices: torch.Tensor):
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return self.indices.shape[0]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.images.channels, self.images.size, self.images.size)

    def __getitem__(self, j: int):
        return (j, *self.images.item(int(self.indices[j])))

    def describe(self, j: int) -> str:
        return self.images.describe(int(self.indices[j]))

    def head(self, k: int) -> "Split":
        """The split's first ``k`` images."""
        return Split(self.images, self.indices[:k])

    def read(self, positions, threads: int = 4) -> tuple[torch.Tensor, list[str]]:
        """Levels (k, C, S, S) of the images at ``positions`` of the split and their reasons ("" when sound),
        decoded on ``threads`` threads (Pillow releases the GIL while decoding)."""
        positions = [int(j) for j in positions]
        if self.images.in_memory:
            return self.images.data[self.indices[positions]], [""] * len(positions)
        with ThreadPoolExecutor(max(1, min(threads, len(positions)))) as pool:
            items = list(pool.map(lambda j: self.images.item(int(self.indices[j])), positions))
        if not items:
            return torch.zeros(self.shape[1:], dtype=torch.uint8)[None][:0], []
        return torch.stack([levels for levels, _ in items]), [reason for _, reason in items]


def take(levels, labels, start: int, stop: int):
    """Images start..stop-1 of a tensor or a :class:`Split` (and their labels) for evaluation: a split's
    unreadable images are left out of both."""
    if isinstance(levels, torch.Tensor):
        return levels[start:stop], None if labels is None else labels[start:stop]
    batch, reasons = levels.read(range(start, min(stop, len(levels))))
    sound = torch.tensor([not r for r in reasons], dtype=torch.bool)
    if bool(sound.all()):
        return batch, None if labels is None else labels[start:stop]
    return batch[sound], None if labels is None else labels[start:stop][sound]


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices: a permutation of range(n) from a generator seeded ``seed``, the first
    round(n test_fraction) held out (the same split as :func:`fastglow.app.data.split_dataset`)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]


def sidecars(path: Path) -> tuple[Path, Path]:
    """A prepared array's label and metadata files: X.npy -> X.labels.npy, X.json."""
    return path.with_suffix(".labels.npy"), path.with_suffix(".json")


def prepared_meta(path: Path) -> dict:
    """The metadata ``fastglow prepare`` wrote beside an .npy ({} for an array from elsewhere)."""
    meta = sidecars(path)[1]
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{meta}: cannot read the prepared array's metadata ({one_line(err)})") from None


# ----------------------------------------------------------------------------------------------
# Opening (start-up work is flat in the data set's size: a listing, a header sample, an array header)
# ----------------------------------------------------------------------------------------------
def header_sample(n: int) -> list[int]:
    """Up to HEADER_SAMPLE indices spread evenly over range(n) (all of them when n is small)."""
    m = min(n, HEADER_SAMPLE)
    return sorted({round(k * (n - 1) / max(1, m - 1)) for k in range(m)})


def open_folder(root: Path, img_size: int, channels: int | None, shift: int) -> FolderImages:
    """Every image file under ``root``: sizes and modes of a sample of headers checked now (a bad one refuses),
    the rest when read; ``channels`` None: 1 if every sampled image is grey, else 3."""
    from PIL import Image

    files = image_paths(root)
    if not files:
        raise InputError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    modes = []
    for i in header_sample(len(files)):
        try:
            with Image.open(files[i]) as im:
                width, height, mode = im.width, im.height, im.mode
        except Exception as err:  # noqa: BLE001 - Pillow raises many types for a broken file
            raise InputError(f"{files[i]}: cannot read image ({one_line(err)})") from None
        if min(width, height) < img_size:
            raise InputError(f"{files[i]}: image is {width}x{height}, smaller than --img-size {img_size}")
        modes.append(mode)
    if channels is None:
        channels = 1 if all(m in GREY_MODES for m in modes) else 3
    return FolderImages(files, img_size, channels, shift, str(root))


def npy_layout(path: Path, shape: tuple, dtype) -> tuple[str, tuple[int, int, int]]:
    """The layout ("NCHW", "NHWC" or "NHW") and native (C, H, W) of a uint8 image array, or a refusal."""
    if dtype != np.uint8:
        raise InputError(f"{path}: the array has dtype {dtype}, expected uint8 images")
    if len(shape) == 3:
        layout, native = "NHW", (1, *shape[1:])
    elif len(shape) == 4 and shape[1] in (1, 3):
        layout, native = "NCHW", shape[1:]
    elif len(shape) == 4 and shape[3] in (1, 3):
        layout, native = "NHWC", (shape[3], *shape[1:3])
    else:
        layout = native = None
    if native is None or shape[0] == 0:
        raise InputError(f"{path}: the array has shape {shape}; expected uint8 images (N, H, W), (N, C, H, W) or "
                         "(N, H, W, C) with C = 1 or 3")
    return layout, tuple(int(s) for s in native)


def open_npy(path: Path, img_size: int | None, channels: int | None, n_bits: int | None):
    """An .npy (only its header is read now) -> (ArrayImages, n_bits); n_bits None: 5, or fewer
    if the array was prepared at fewer (its metadata), a finer one than that refused."""
    try:
        array = np.load(path, mmap_mode="r")  # reads the header only
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read .npy ({one_line(err)})") from None
    layout, native = npy_layout(path, array.shape, array.dtype)
    if not array.flags.c_contiguous:
        raise InputError(f"{path}: the array is stored in Fortran order; save it in C order (np.ascontiguousarray)")
    stored = prepared_meta(path).get("n_bits", 8)
    if n_bits is not None and n_bits > stored:
        raise InputError(f"{path}: prepared at --n-bits {stored}; it cannot be trained at --n-bits {n_bits}")
    n_bits = min(5, stored) if n_bits is None else n_bits
    if img_size is None and native[1] != native[2]:
        raise InputError(f"{path}: images are {native[2]}x{native[1]}; pass --img-size to centre-crop them square")
    size = img_size or native[1]
    if min(native[1:]) < size:
        raise InputError(f"{path}: images are {native[2]}x{native[1]}, smaller than --img-size {size}")
    images = ArrayImages(path, layout, size, channels or native[0], 8 - n_bits, array.shape[0], array.offset,
                         array.shape[1:])
    return images, n_bits


def open_lmdb_set(path: Path, img_size: int | None, channels: int | None, shift: int) -> LmdbImages:
    """rosinality's LMDB: its ``length`` key and the first image (for the size and mode) read now."""
    with open_lmdb(path).begin(write=False) as txn:
        length = txn.get(b"length")
    try:
        n = int(length.decode())
    except (AttributeError, ValueError):
        raise InputError(f"{path}: not a rosinality-style LMDB (no integer 'length' key)") from None
    if n <= 0:
        raise InputError(f"{path}: the LMDB holds no images (length {n})")
    size = img_size or 64
    images = LmdbImages(path, n, size, channels or 3, shift)
    raw = images._get(images.key(0))
    if raw is None:
        raise InputError(f"{path}: no images of size {size} (no key {images.key(0).decode()!r}); pass the "
                         "--img-size the LMDB was prepared at")
    if channels is None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(raw)) as im:
                images.channels = 1 if im.mode in GREY_MODES else 3
        except Exception as err:  # noqa: BLE001
            raise InputError(f"{images.describe(0)}: cannot read image ({one_line(err)})") from None
    images.levels(0)  # refuse a first image that does not decode before any work
    return images


def is_npy(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(NPY_MAGIC)) == NPY_MAGIC
