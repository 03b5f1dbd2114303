"""Class labels of a data set (class-conditional runs), in the order :func:`fastglow.app.data.load_dataset` gives
its images.

Labels (:func:`load_labels`): the digits' own 0..9; a folder's first-level
subfolders, one per class (sorted names -> ids 0, 1, ...); an .npz's integer array ``labels`` (N,), whose values
present, in increasing order, are the classes (ids 0, 1, ..., named by their value); a prepared .npy's
``X.labels.npy`` (names in ``X.json``).
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import datasets
from .errors import InputError, one_line
from .images import image_files

NPZ_LABELS_KEY = "labels"


def load_labels(source: str, n_images: int) -> tuple[torch.Tensor, list[str]]:
    """Class labels of the ``n_images`` images of ``source`` (as :func:`fastglow.app.data.load_dataset` orders them) ->
    (int64 labels (N,), class names; id k names class k)."""
    if source == "digits":
        from sklearn.datasets import load_digits as sklearn_digits

        labels, names = torch.from_numpy(sklearn_digits().target.astype(np.int64)), [str(k) for k in range(10)]
    elif (Path(source) / "data.mdb").is_file():
        raise InputError(f"{source}: an LMDB data set holds no class labels; train it without --conditional")
    elif Path(source).is_dir():
        labels, names = folder_labels(Path(source))
    elif datasets.is_npy(Path(source)):
        labels, names = npy_labels(Path(source))
    else:
        labels, names = npz_labels(Path(source))
    if labels.shape != (n_images,):
        raise InputError(f"{source}: {labels.shape[0]} labels for {n_images} images")
    if len(names) < 2:
        raise InputError(f"{source}: a class-conditional run needs at least 2 classes, found {names}")
    return labels, names


def folder_labels(root: Path) -> tuple[torch.Tensor, list[str]]:
    """One first-level subfolder per class: sorted subfolder names -> class ids 0, 1, ..."""
    files = image_files(root)
    loose = [f for f in files if f.parent == root]
    if loose:
        raise InputError(f"{loose[0]}: an image outside the class subfolders; a class-conditional run takes "
                         f"one subfolder of {root} per class")
    classes = [f.relative_to(root).parts[0] for f in files]
    names = sorted(set(classes))
    warn_empty_class_folders(root, names)
    ids = {name: k for k, name in enumerate(names)}
    return torch.tensor([ids[c] for c in classes], dtype=torch.int64), names


def npz_labels(path: Path) -> tuple[torch.Tensor, list[str]]:
    """The integer array ``labels`` (N,) of an .npz, values >= 0; the classes are the values present
    (:func:`labels_present`)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if NPZ_LABELS_KEY not in archive.files:
                raise InputError(f"{path}: no array named {NPZ_LABELS_KEY!r} (it holds {list(archive.files)}); "
                                 "a class-conditional run needs one class label per image")
            labels = archive[NPZ_LABELS_KEY]
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: cannot read .npz ({one_line(err)})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InputError(f"{path}: {NPZ_LABELS_KEY!r} must be a 1-D integer array, got {labels.dtype} "
                         f"of shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise InputError(f"{path}: {NPZ_LABELS_KEY!r} holds a negative class id ({labels.min()})")
    return labels_present(labels.astype(np.int64))


def npy_labels(path: Path) -> tuple[torch.Tensor, list[str]]:
    """A prepared .npy's labels (``X.labels.npy`` beside it) and class names (its metadata ``X.json``)."""
    labels_path = datasets.sidecars(path)[0]
    if not labels_path.is_file():
        raise InputError(f"{path}: no {labels_path.name} beside it; a class-conditional run needs one class label "
                         "per image (fastglow prepare writes it for a folder of class subfolders)")
    try:
        labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"{labels_path}: cannot read labels ({one_line(err)})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise InputError(f"{labels_path}: expected a 1-D array of class ids >= 0")
    names = datasets.prepared_meta(path).get("classes")
    if not names:
        return labels_present(labels.astype(np.int64))
    return torch.from_numpy(labels.astype(np.int64)), list(names)


def labels_present(raw) -> tuple[torch.Tensor, list[str]]:
    """Integer labels (N,) -> (ids 0..N_classes-1, names): the classes are the label values present, in
    increasing order, named by their value ({0, 5} -> ids {0, 1} named "0", "5"; none created empty)."""
    values, ids = torch.unique(torch.as_tensor(raw, dtype=torch.int64), sorted=True, return_inverse=True)
    return ids, [str(v) for v in values.tolist()]


def warn_empty_class_folders(root, names: list[str]) -> None:
    """Say (one line) which subfolders of a class-folder data set hold no image, and so are no class."""
    empty = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and p.name not in names)
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        print(f"fastglow: warning: {root}: subfolders without images are not classes: {shown}", file=sys.stderr)
