"""A run's data, recorded so that its split and its images can be found again: the held-out images by name,
and a fingerprint that tells whether the data set changed since a checkpoint was written.

Each image has a key: its path relative to the folder (folders), else its index ("0".."N-1": the digits, .npz).
A checkpoint's ``dataset`` entry holds

    test         the keys of the held-out images, in the split's order
    fingerprint  count, shape (C, H, W), n_bins, sha256 of the keys, sha256 of up to 64 images of each split

``fastglow eval``/``morph`` take the held-out images by key (a folder that gained or lost images keeps its
split, and says so); ``--resume`` refuses data whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .datasets import split_indices
from .errors import InputError

PIXEL_SAMPLES = 64  # images per split whose bytes enter the fingerprint


def image_keys(source: str, n_images: int) -> list[str]:
    """Each image's key, in the data set's order: a folder's relative paths, else the indices."""
    from .images import image_files

    root = Path(source)
    if source != "digits" and root.is_dir():
        keys = [p.relative_to(root).as_posix() for p in image_files(root)]
        if len(keys) == n_images:
            return keys
    return [str(i) for i in range(n_images)]


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def _pixels(images) -> str:
    """sha256 of up to PIXEL_SAMPLES evenly spaced images of a levels tensor or a :class:`Split`."""
    picks = torch.linspace(0, len(images) - 1, min(PIXEL_SAMPLES, len(images))).long().unique().tolist()
    levels = images[picks] if isinstance(images, torch.Tensor) else images.read(picks)[0]
    return _digest(image.contiguous().numpy().tobytes() for image in levels)


def fingerprint(keys: list[str], train_set, test_set, n_bins: int) -> dict:
    """The data set's identity: count, image shape, levels, its keys' hash and its pixels' hash (the splits:
    levels tensors or :class:`~fastglow.app.datasets.Split` s)."""
    return {"count": len(keys), "shape": list(train_set.shape[1:]), "n_bins": int(n_bins),
            "keys": _digest(keys), "pixels": _pixels(train_set) + _pixels(test_set)}


def record(source: str, train_set, test_set, n_bins: int, test_fraction: float, split_seed: int) -> dict:
    """A checkpoint's ``dataset`` entry for a run's split of ``source``."""
    files = getattr(getattr(train_set, "images", None), "files", None)  # a folder's, already listed
    keys = ([Path(p).relative_to(source).as_posix() for p in files] if files is not None
            else image_keys(source, len(train_set) + len(test_set)))
    _, test = split_indices(len(keys), test_fraction, split_seed)
    return {"test": [keys[i] for i in test.tolist()], "fingerprint": fingerprint(keys, train_set, test_set, n_bins)}


def change(saved: dict, now: dict) -> str | None:
    """How the data set behind fingerprint ``now`` differs from ``saved`` (one phrase), or None."""
    if saved["count"] != now["count"]:
        return f"it holds {now['count']} images, {saved['count']} when the checkpoint was written"
    for key, what in (("shape", "image shape (C, H, W)"), ("n_bins", "levels per channel")):
        if saved[key] != now[key]:
            return f"its {what} is {now[key]}, {saved[key]} when the checkpoint was written"
    if saved["keys"] != now["keys"]:
        return "its file names differ from those the checkpoint was written with"
    if saved["pixels"] != now["pixels"]:
        return "its images differ from those the checkpoint was written with"
    return None


def check_resume(saved: dict | None, now: dict, source: str, path) -> None:
    """Refuse (one line) to resume the checkpoint at ``path`` on data that changed since it was written."""
    if saved is None:
        return  # a checkpoint from before fingerprints
    why = change(saved["fingerprint"], now["fingerprint"])
    if why:
        raise InputError(f"{source}: the data set changed since {path} was written ({why}); resume it on the "
                         "same data, or start a new run with another --out")


def recorded_split(source: str, levels: torch.Tensor, n_bins: int, config: dict, saved: dict | None):
    """(train, test) indices of a run's split over ``levels`` (its data set as it is now, in memory), and a
    warning (one line) if the data changed since: held-out images are found by key; every other image is
    training data."""
    n = levels.shape[0]
    fraction = config.get("test_fraction") or (0.2 if source == "digits" else 0.1)
    train, test = split_indices(n, fraction, config.get("split_seed", 0))
    if saved is None:
        return train, test, None
    keys = image_keys(source, n)
    if [keys[i] for i in test.tolist()] != saved["test"]:
        where = {key: i for i, key in enumerate(keys)}
        test = torch.tensor([where[k] for k in saved["test"] if k in where], dtype=torch.int64)
        held = torch.zeros(n, dtype=torch.bool)
        held[test] = True
        train = torch.arange(n)[~held]
    now = fingerprint(keys, levels[train], levels[test], n_bins) if test.numel() and train.numel() else None
    why = "its images are all held out or all gone" if now is None else change(saved["fingerprint"], now)
    if why is None:
        return train, test, None
    missing = len(saved["test"]) - test.numel()
    return train, test, (f"{source} changed since training ({why}): using the run's recorded held-out images"
                         + (f", {missing} of its {len(saved['test'])} no longer there" if missing else ""))


def same_source(a: str, b: str | None) -> bool:
    """Whether two --data values name the same data set."""
    if b is None:
        return False
    return a == b if "digits" in (a, b) else Path(a).resolve() == Path(b).resolve()


def check_out_outside_data(out, source: str | None) -> None:
    """Refuse a run folder inside an image folder data set (its sample grids would become training data)."""
    if not source or source == "digits" or not Path(source).is_dir():
        return
    data, folder = Path(source).resolve(), Path(out).resolve()
    if folder == data or data in folder.parents:
        raise InputError(f"--out {out} is inside --data {source}: its sample grids would become training "
                         "images; choose an --out outside the data folder")
