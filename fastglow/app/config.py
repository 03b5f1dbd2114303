"""A training run's settings (:class:`TrainConfig`), and how given options, defaults and a resumed
checkpoint's settings combine into them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import InputError


@dataclasses.dataclass
class TrainConfig:
    """A run's settings; the fields resolved from the data (img_size, channels, test_fraction, n_bins)
    are filled in by the training loop and stored in every checkpoint."""
    out: str = "runs/glow"
    data: str = "digits"
    img_size: int | None = None
    channels: int | None = None
    n_bits: int | None = None
    npz_key: str | None = None
    test_fraction: float | None = None
    split_seed: int = 0
    n_flow: int = 16
    n_block: int = 2
    hidden: int = 16
    affine: bool = True
    conv_lu: bool = True
    permutation: str = "conv"  # "conv", "shuffle" or "reverse" (fastglow.permutation)
    reversible: bool = True
    backend: str = "auto"
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    cooldown: int | None = None  # None: the last half of the run (steps // 2)
    steps: int = 2000
    seed: int = 0
    device: str = "auto"
    eval_every: int = 500
    ckpt_every: int = 500
    keep: int = 3
    log_every: int = 10
    temperature: float = 0.7
    n_sample: int = 64
    zoom: int = 1
    max_bad_steps: int = 10
    eval_batch: int = 512
    progress: bool = True
    threads: int | None = None
    cuda_graph: bool = False
    workers: int | None = None  # DataLoader processes per training process (None: from the cores; 0: none)
    max_bad_images: float = 0.001  # stop when more than this share of the training images is unreadable
    n_bins: int | None = None
    conditional: bool = False  # class-conditional: y-conditioned top prior and auxiliary classifier
    class_weight: float = 0.01  # weight of the classifier's cross-entropy (bits) in the loss
    n_classes: int | None = None  # from the data's labels (class-conditional runs)
    class_names: list[str] | None = None  # class k's name (digits "0".."9", a folder's sorted subfolders)


# Settings that define the run (data, model, data order); a resume must not change them.
FIXED_ON_RESUME = ("data", "img_size", "channels", "n_bits", "npz_key", "test_fraction", "split_seed",
                   "n_flow", "n_block", "hidden", "affine", "conv_lu", "permutation", "batch",
                   "seed", "conditional")


def resolve_config(options: dict, saved: dict | None, where: str = "") -> TrainConfig:
    """Options given (None = not given) over the defaults; when resuming, over the checkpoint's config,
    refusing a change to anything in FIXED_ON_RESUME."""
    given = {k: v for k, v in options.items() if v is not None}
    if given.get("data") not in (None, "digits"):
        given["data"] = str(Path(given["data"]).resolve())
    if given.get("cuda_graph") and (given.get("conditional") or (saved or {}).get("conditional")):
        raise InputError("--cuda-graph does not support class-conditional runs yet (the graph holds no labels)")
    if not given.get("conv_lu", True) and given.get("permutation", "conv") != "conv":
        raise InputError("--no-lu applies to --permutation conv only")
    if saved is None:
        return TrainConfig(**given)
    for key in FIXED_ON_RESUME:
        if key in given and given[key] != saved.get(key, getattr(TrainConfig, key, None)):
            raise InputError(f"{where}: the run was started with {key}={saved.get(key)!r}; cannot resume it "
                             f"with {key}={given[key]!r} (use another --out for a new run)")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **given})
