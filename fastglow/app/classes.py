"""What the application does with a class-conditional Glow (``fastglow train --conditional``): labels beside
the data split, class-grid sampling, held-out classification accuracy, class-mean latents and morphing.

Morphing (openai/glow's attribute manipulation): with mu_c the mean latent (every level) of the training images
of class c, an image's latents z move along the class difference, z_t = z + t (mu_to - mu_from), t in [0, 1],
and decode exactly (``reverse(..., reconstruct=True)``): t = 0 gives the image back.
"""

from __future__ import annotations

import torch

from .data import bin_centres, split_dataset
from .datasets import take
from .errors import InputError
from .labels import load_labels


def split_labels(labels: torch.Tensor | None, test_fraction: float, split_seed: int):
    """(train, test) labels of the images ``split_dataset`` splits with the same seed (the same permutation:
    ``randperm`` of the same length from an identically seeded generator); (None, None) without labels."""
    if labels is None:
        return None, None
    return split_dataset(labels, test_fraction, torch.Generator().manual_seed(split_seed))


def run_labels(cfg, n_images: int):
    """Class-conditional runs: the data's labels split like the images, filling in cfg.n_classes and
    cfg.class_names -> (train, test) int64 labels; (None, None) for an unconditional run."""
    if not cfg.conditional:
        return None, None
    labels, cfg.class_names = load_labels(cfg.data, n_images)
    cfg.n_classes = len(cfg.class_names)
    return split_labels(labels, cfg.test_fraction, cfg.split_seed)


def sample_grid_latents(cfg) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A run's fixed sample-grid latents (seeded by cfg.seed + 1), and the classes of a class-conditional run's
    grid (one row per class; None otherwise), after checking the grid's size."""
    from .. import z_shapes
    from .limits import check_grid

    n_sample, nrow, y = cfg.n_sample, None, None
    if cfg.conditional:
        nrow = max(1, cfg.n_sample // cfg.n_classes)
        y, n_sample = class_grid_labels(cfg.n_classes, nrow), nrow * cfg.n_classes
    check_grid(n_sample, cfg.channels, cfg.img_size, cfg.zoom, nrow, "--n-sample/--zoom")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return [cfg.temperature * torch.randn(n_sample, *s, generator=gen)
            for s in z_shapes(cfg.channels, cfg.img_size, cfg.n_block)], y


def class_grid_labels(n_classes: int, per_class: int, device=None) -> torch.Tensor:
    """Labels of a grid with one row per class: 0 x per_class, 1 x per_class, ..."""
    return torch.arange(n_classes, device=device).repeat_interleave(per_class)


def resolve_class(text: str, names: list[str] | None, n_classes: int, flag: str) -> int:
    """A class given on the command line, by name (a folder's subfolder) or id, -> its id."""
    if names and text in names:
        return names.index(text)
    try:
        k = int(text)
    except ValueError:
        k = -1
    if not 0 <= k < n_classes:
        known = f"names {names} or " if names and names != [str(i) for i in range(n_classes)] else ""
        raise InputError(f"{flag} {text}: not a class of the model ({known}ids 0..{n_classes - 1})")
    return k


def sample_labels(classes: str | None, n: int | None, nrow: int | None, info: dict, gen: torch.Generator,
                  ckpt) -> tuple[torch.Tensor | None, int | None]:
    """``fastglow sample``'s --class, --n and --nrow on a loaded model (``info``: its n_classes, class_names) ->
    (the samples' labels or None for an unconditional model, images per row); ``ckpt`` names it in errors."""
    n_classes = info["n_classes"]
    if n_classes is None:
        if classes is not None:
            raise InputError(f"{ckpt}: the model is unconditional; --class needs a checkpoint trained "
                             "with --conditional")
        return None, nrow
    if classes == "all":
        per_class = n or 10
        return class_grid_labels(n_classes, per_class), per_class
    n = n or 64
    if classes is None:
        return torch.randint(n_classes, (n,), generator=gen), nrow
    k = resolve_class(classes, info["class_names"], n_classes, "--class")
    return torch.full((n,), k, dtype=torch.int64), nrow


@torch.no_grad()
def classification_accuracy(model, levels: torch.Tensor, labels: torch.Tensor, n_bins: int, batch: int,
                            device) -> float:
    """Share of images whose ``model.classify`` argmax is their label (images at their bins' centres)."""
    correct = total = 0
    for start in range(0, levels.shape[0], batch):
        chunk, chunk_labels = take(levels, labels, start, start + batch)
        x = bin_centres(chunk, n_bins).to(device)
        correct += int((model.classify(x).argmax(1).cpu() == chunk_labels).sum())
        total += chunk.shape[0]
    return correct / max(total, 1)


@torch.no_grad()
def class_mean_latents(model, levels: torch.Tensor, labels: torch.Tensor, classes, n_bins: int, batch: int,
                       device) -> dict[int, list[torch.Tensor]]:
    """class -> per level, the mean latent (1, C, H, W) of that class's images (at their bins' centres)."""
    means = {}
    for c in classes:
        members = levels[labels == c]
        if members.shape[0] == 0:
            raise InputError(f"class {c} has no training images to average")
        sums = None
        for start in range(0, members.shape[0], batch):
            x = bin_centres(members[start:start + batch], n_bins).to(device)
            y = torch.full((x.shape[0],), c, dtype=torch.int64, device=device)
            z_outs = model(x, y)[2]
            part = [z.sum(0, keepdim=True) for z in z_outs]
            sums = part if sums is None else [s + p for s, p in zip(sums, part)]
        means[c] = [s / members.shape[0] for s in sums]
    return means


def morph_path(z_outs, mean_from, mean_to, steps: int):
    """Latents of one image (batch 1) moved along mu_to - mu_from: ``steps`` points t = 0..1, every level."""
    t = torch.linspace(0, 1, steps, device=z_outs[0].device, dtype=z_outs[0].dtype).view(-1, 1, 1, 1)
    return [z + t * (b - a) for z, a, b in zip(z_outs, mean_from, mean_to)]
