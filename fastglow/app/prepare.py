"""``fastglow prepare SRC OUT.npy``: decode, resize and centre-crop an image folder once into a uint8
array (N, C, S, S) that training reads without decoding (``--data OUT.npy``).

Pixels are stored quantised to ``n_bits``: v -> v & (255 << (8 - n_bits)), so training at n_bits' <= n_bits
gives the same levels v >> (8 - n_bits') as the folder; a finer --n-bits is refused at training.
Beside OUT.npy: OUT.json (source, size, channels, n_bits, count, class names, the unreadable files skipped)
and, for a folder of class subfolders (every image in one, at least two), OUT.labels.npy (int64 class ids).

Safety: the images go into a hidden ``.OUT.npy.partial`` in chunks (decoded by a pool of processes, written in
order); after each chunk the array is flushed and ``.OUT.npy.progress.json`` replaced atomically, so a run
that is killed resumes at the first unfinished chunk. OUT.npy appears only at the end, by a rename: a file of
that name is always complete. An existing OUT.npy is never overwritten (one-line refusal). Unreadable images
are skipped (the array holds the sound ones, in order) and listed in OUT.json.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np

from . import datasets
from .errors import InputError

CHUNK = 64  # images per task and per progress record
_IMAGES = None  # the FolderImages a pool process decodes (set by _init_pool)


def prepare(src: str, out: str, img_size: int, n_bits: int = 8, channels: int | None = None,
            workers: int | None = None, progress: bool = True) -> dict:
    """Prepare ``src`` (a folder of images) into ``out`` (.npy) -> the metadata written beside it."""
    src_path, out_path = Path(src), Path(out)
    if out_path.suffix != ".npy":
        raise InputError(f"{out}: the prepared array's name must end in .npy")
    if out_path.exists():
        raise InputError(f"{out}: already exists; remove it or choose another name (it is never overwritten)")
    if not src_path.is_dir():
        raise InputError(f"{src}: not a folder of images")
    images = datasets.open_folder(src_path, img_size, channels, 0)
    partial, record = _scratch(out_path)
    key = _key(images, src_path, n_bits)
    state = _resume_state(record, key, partial)
    shape = (images.n, images.channels, img_size, img_size)
    if state["done"] < images.n:
        state = _decode_all(images, partial, record, state, shape, n_bits, workers, progress)
    meta = _finish(images, src_path, out_path, partial, state, n_bits)
    record.unlink(missing_ok=True)
    return meta


def _scratch(out: Path) -> tuple[Path, Path]:
    return out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.progress.json")


def _key(images, src: Path, n_bits: int) -> dict:
    """What a partial result depends on: the source's files (names and sizes), the size, channels and bits."""
    digest = hashlib.sha256()
    for f in map(Path, images.files):
        digest.update(f"{f.relative_to(src)}\0{f.stat().st_size}\n".encode())
    return {"src": str(src.resolve()), "files": digest.hexdigest(), "n": images.n, "img_size": images.size,
            "channels": images.channels, "n_bits": n_bits}


def _resume_state(record: Path, key: dict, partial: Path) -> dict:
    """The progress of an earlier, interrupted run for the same ``key`` (else a fresh start)."""
    fresh = {"key": key, "done": 0, "written": 0, "bad": []}
    if not record.is_file() or not partial.is_file():
        return fresh
    try:
        state = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    if state.get("key") != key:
        print(f"fastglow prepare: {partial.name} is from another source or settings: starting over", file=sys.stderr)
        return fresh
    print(f"fastglow prepare: resuming after {state['done']} of {key['n']} images", file=sys.stderr)
    return state


def _decode_all(images, partial: Path, record: Path, state: dict, shape, n_bits: int, workers, progress) -> dict:
    """Decode the images from ``state["done"]`` on in chunks, appending the sound ones to the partial array."""
    from numpy.lib.format import open_memmap
    from tqdm import tqdm

    array = open_memmap(partial, mode="r+" if state["done"] else "w+", dtype=np.uint8, shape=shape)
    chunks = [(s, min(s + CHUNK, images.n)) for s in range(state["done"], images.n, CHUNK)]
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    bar = tqdm(total=images.n, initial=state["done"], unit="img", desc="prepare", disable=not progress or None,
               file=sys.stderr)
    pool = multiprocessing.get_context("fork").Pool(workers, _init_pool, (images, n_bits)) if workers else None
    try:
        if pool is None:
            _init_pool(images, n_bits)
        for start, pixels, reasons in (pool.imap if pool else map)(_decode_chunk, chunks):
            sound = [i for i, r in enumerate(reasons) if not r]
            array[state["written"]:state["written"] + len(sound)] = pixels[sound]
            array.flush()
            state["bad"] += [[start + i, r] for i, r in enumerate(reasons) if r]
            state["written"] += len(sound)
            state["done"] = start + len(reasons)
            _write_json(record, state)
            bar.update(len(reasons))
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    del array
    return state


def _init_pool(images, n_bits: int) -> None:
    global _IMAGES
    _IMAGES = (images, np.uint8((0xFF << (8 - n_bits)) & 0xFF))


def _decode_chunk(bounds: tuple[int, int]):
    """Images start..stop-1 -> (start, pixels (k, C, S, S) quantised (zeros where unreadable), reasons)."""
    images, mask = _IMAGES
    start, stop = bounds
    pixels = np.zeros((stop - start, images.channels, images.size, images.size), dtype=np.uint8)
    reasons = []
    for i in range(start, stop):
        try:
            pixels[i - start] = images.pixels(i) & mask
            reasons.append("")
        except (InputError, OSError, ValueError) as err:
            reasons.append(str(err))
    return start, pixels, reasons


def _finish(images, src: Path, out: Path, partial: Path, state: dict, n_bits: int) -> dict:
    """Trim the array to its sound images, write the labels and metadata, then rename it to ``out``."""
    written, bad = state["written"], state["bad"]
    if written == 0:
        raise InputError(f"{src}: no image could be read (the first: {bad[0][1]})")
    _trim(partial, written)
    labels, names = _class_labels(images, src)
    labels_path, meta_path = datasets.sidecars(out)
    if labels is not None:
        sound = np.setdiff1d(np.arange(images.n), np.array([i for i, _ in bad], dtype=np.int64))
        _atomic(labels_path, lambda f: np.save(f, labels[sound]))
    meta = {"source": str(src.resolve()), "count": written, "img_size": images.size, "channels": images.channels,
            "n_bits": n_bits, "classes": names, "skipped": [{"file": str(images.files[i]), "reason": r}
                                                            for i, r in bad]}
    _write_json(meta_path, meta)
    _fsync(partial)
    os.replace(partial, out)
    return meta


def _class_labels(images, src: Path):
    """(int64 labels, class names) when every image lies in a first-level subfolder and there are at least
    two of them (sorted names -> ids 0, 1, ...), else (None, None)."""
    parts = [Path(f).relative_to(src).parts for f in images.files]
    if any(len(p) < 2 for p in parts):
        return None, None
    names = sorted({p[0] for p in parts})
    if len(names) < 2:
        return None, None
    ids = {name: k for k, name in enumerate(names)}
    return np.array([ids[p[0]] for p in parts], dtype=np.int64), names


def _trim(path: Path, n: int) -> None:
    """Make the .npy at ``path`` hold its first ``n`` images: its header's shape rewritten in place (same
    length, padded with spaces) and the file cut after them. Idempotent."""
    from numpy.lib import format as npy

    with open(path, "r+b") as f:
        version = npy.read_magic(f)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        if shape[0] == n:
            return
        header = repr({"descr": npy.dtype_to_descr(dtype), "fortran_order": fortran, "shape": (n, *shape[1:])})
        room = offset - 10 if version == (1, 0) else offset - 12
        f.seek(offset - room)
        f.write(header.encode("latin1").ljust(room - 1) + b"\n")
        f.truncate(offset + n * int(np.prod(shape[1:])) * dtype.itemsize)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def add_prepare_command(sub) -> None:
    """The ``prepare`` subcommand of the ``fastglow`` parser."""
    from . import flags

    p = sub.add_parser("prepare", help="decode an image folder once into a uint8 .npy for training",
                       description="Decode, resize (shorter side) and centre-crop every image under SRC once, in "
                                   "parallel, into OUT.npy (uint8, N x C x S x S; OUT.labels.npy for a folder of "
                                   "class subfolders; OUT.json). Interrupted, the same command resumes; an "
                                   "existing OUT is never overwritten. Then: fastglow train --data OUT.npy")
    p.add_argument("src", metavar="SRC", help="a folder of images (searched recursively)")
    p.add_argument("out", metavar="OUT", help="the array to write (.npy)")
    p.add_argument("--img-size", type=flags.positive_int, required=True, help="side S of the square images")
    p.add_argument("--n-bits", type=flags.n_bits, default=8,
                   help="keep this many bits per channel (default 8; training may use as many or fewer)")
    p.add_argument("--channels", type=flags.channels, help="1 (grey), 3 (RGB) or auto (grey if every image is)")
    p.add_argument("--workers", type=flags.positive_int, help="decoding processes (default: one per core)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_prepare)


def _prepare(args) -> int:
    meta = prepare(args.src, args.out, args.img_size, args.n_bits, args.channels, args.workers, args.progress)
    skipped = f", {len(meta['skipped'])} unreadable skipped (listed in the .json)" if meta["skipped"] else ""
    classes = f", {len(meta['classes'])} classes" if meta["classes"] else ""
    print(f"{meta['count']} images of {meta['channels']}x{meta['img_size']}x{meta['img_size']} at {meta['n_bits']} "
          f"bits{classes}{skipped} -> {args.out}")
    return 0
