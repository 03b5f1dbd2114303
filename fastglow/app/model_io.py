"""Models loaded from checkpoints for inference (``fastglow sample|eval|interpolate|morph``): a Glow's shape read
off rosinality's state_dict keys, the model built and checked against the flags given, and the data set and split
a loaded run is evaluated on.

A fastglow training checkpoint (:mod:`fastglow.app.checkpoint`) carries its run's config (image size, levels,
class names, data); a bare state_dict (rosinality's ``torch.save(model.state_dict())``) carries only weights, so
what it cannot tell comes from the flags or the defaults (:func:`bare_image_format`).
"""

from __future__ import annotations

import sys

import torch

from .. import Glow
from ..permutation import state_dict_permutation
from .checkpoint import FORMAT, load_file
from .data import DIGITS_LEVELS
from .distributed import pick_backend, pick_device
from .errors import CheckpointError, InputError, one_line

SHAPE_KEYS = ("in_channel", "n_flow", "n_block", "hidden", "affine", "conv_lu", "permutation")


def infer_shape(state_dict: dict, path) -> dict:
    """A Glow's constructor arguments read off rosinality's state_dict keys and tensor shapes."""
    try:
        n_block = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        n_flow = 1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith("blocks.0.flows."))
        squeezed = state_dict["blocks.0.flows.0.actnorm.loc"].shape[1]
        net0 = state_dict["blocks.0.flows.0.coupling.net.0.weight"]
        out4 = state_dict["blocks.0.flows.0.coupling.net.4.conv.weight"].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError):
        raise CheckpointError(f"{path}: not a Glow state_dict (rosinality's keys blocks.<i>.flows.<k>... "
                              "are missing)") from None
    permutation = state_dict_permutation(state_dict)
    return {"in_channel": squeezed // 4, "n_flow": n_flow, "n_block": n_block, "hidden": net0.shape[0],
            "affine": out4 == squeezed, "n_classes": _n_classes(state_dict, path), "permutation": permutation,
            # the last level always has LU weights: with one level, conv_lu cannot be told (and does not matter);
            # nor for fixed permutations, which have no 1x1 conv
            "conv_lu": ("blocks.0.flows.0.invconv.w_p" in state_dict
                        if n_block > 1 and permutation == "conv" else None)}


def _n_classes(state_dict: dict, path) -> int | None:
    """A class-conditional model's class count, read off class_prior.weight (2 C_top, n_classes); else None."""
    weight = state_dict.get("class_prior.weight")
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] < 2:
        raise CheckpointError(f"{path}: class_prior.weight is not a (channels, n_classes >= 2) matrix")
    return weight.shape[1]


def _flag(key: str, value) -> str:
    if key == "affine":
        return "--affine" if value else "--additive"
    if key == "conv_lu":
        return "LU 1x1 convs" if value else "--no-lu"
    return f"--{key.replace('_', '-')} {value}"


def load_model(path, flags: dict, device: str = "cpu", backend: str = "auto"):
    """A Glow from a fastglow checkpoint or a bare (rosinality) state_dict -> (model in eval mode, info).

    ``flags`` holds the model-shape flags the user gave (None when not given): they must agree with the
    checkpoint. info: img_size and n_bins (from the run's config, else :func:`bare_image_format`), the run's
    config (None for a bare state_dict), the model's shape and, class-conditional models, ``class_names``
    (from the config, else None).
    """
    ckpt = load_file(path)
    config = ckpt.get("config") if ckpt.get("format") == FORMAT else None
    state = ckpt["model"] if config is not None else ckpt
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    shape = infer_shape(state, path)
    for key in SHAPE_KEYS:
        given = flags.get(key)
        if given is not None and shape[key] is not None and given != shape[key]:
            raise CheckpointError(f"{path}: the checkpoint's model has {_flag(key, shape[key])}, "
                                  f"not {_flag(key, given)}")
    if config is not None:
        img_size, n_bins = config["img_size"], config["n_bins"]
        if flags.get("img_size") not in (None, img_size):
            raise CheckpointError(f"{path}: the model was trained at --img-size {img_size}, "
                                  f"not {flags['img_size']}")
        if flags.get("data") == "digits" and n_bins != DIGITS_LEVELS:
            raise InputError(f"{path}: the model was trained on {n_bins} levels per channel, the digits have "
                             f"{DIGITS_LEVELS}")
    else:
        img_size, n_bins = bare_image_format(flags)
    shape["conv_lu"] = shape["conv_lu"] is not False
    model = Glow(shape["in_channel"], shape["n_flow"], shape["n_block"], affine=shape["affine"],
                 conv_lu=shape["conv_lu"], hidden_channels=shape["hidden"], backend=backend, reversible=False,
                 n_classes=shape["n_classes"], permutation=shape["permutation"])
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit a Glow of that shape ({one_line(err)})") from None
    if img_size % 2 ** shape["n_block"]:
        raise CheckpointError(f"{path}: --img-size {img_size} is not a multiple of 2**n_block = "
                              f"{2 ** shape['n_block']}")
    class_names = (config or {}).get("class_names") if shape["n_classes"] else None
    return model.to(device).eval(), {"img_size": img_size, "n_bins": n_bins, "config": config,
                                     "class_names": class_names, "dataset": ckpt.get("dataset"), **shape}


def load_for_command(args):
    """:func:`load_model` of ``args.ckpt`` with a command's parsed flags (the shape flags it has, device,
    backend) -> (model, info)."""
    device = pick_device(args.device)
    flags = {k: getattr(args, k, None) for k in (*SHAPE_KEYS, "img_size", "n_bits", "data")}
    return load_model(args.ckpt, flags, device, pick_backend(args.backend, device))


def bare_image_format(flags: dict) -> tuple[int, int]:
    """What a bare state_dict cannot tell, -> (img_size, n_bins): from the flags, else from the data set named by
    ``flags["data"]`` (the digits: 8 and their 17 levels), else 64 and 2**5 (rosinality's defaults)."""
    if flags.get("data") == "digits":
        if flags.get("n_bits") is not None:
            raise InputError("--n-bits applies to 8-bit images; the digits have 17 levels of their own")
        return flags.get("img_size") or 8, DIGITS_LEVELS
    return flags.get("img_size") or 64, 2 ** (flags.get("n_bits") or 5)


def checkpoint_data(path, info: dict, data: str | None, n_bits: int | None, npz_key: str | None):
    """The data set a loaded checkpoint (``info`` from :func:`load_model`) is evaluated on: ``data``, else the
    run's own, checked against the model -> (its name, levels, int64 class labels, or None when the model is
    unconditional)."""
    from .data import load_dataset
    from .labels import load_labels

    config = info["config"] or {}
    data = data or config.get("data")
    if data is None:
        raise InputError(f"{path}: a bare state_dict has no training data recorded; pass --data")
    if data == "digits" and (info["in_channel"], info["img_size"]) != (1, 8):
        raise InputError(f"{path}: the model takes {info['in_channel']}x{info['img_size']}x{info['img_size']} "
                         "images, the digits are 1x8x8")
    if config and n_bits not in (None, config.get("n_bits")):
        trained = (f"on the digits' {DIGITS_LEVELS} levels (--n-bits does not apply)"
                   if config.get("n_bits") is None else f"with --n-bits {config.get('n_bits')}")
        raise InputError(f"{path}: the model was trained {trained}, not --n-bits {n_bits}")
    n_bits = n_bits if n_bits is not None else config.get("n_bits")
    levels, n_bins = load_dataset(data, None if data == "digits" else info["img_size"],
                                  None if data == "digits" else info["in_channel"], n_bits, npz_key)
    if n_bins != info["n_bins"]:
        raise InputError(f"{data}: has {n_bins} levels per channel, the model was trained on {info['n_bins']}")
    if not info["n_classes"]:
        return data, levels, None
    labels, names = load_labels(data, levels.shape[0])
    if info["class_names"] and names != info["class_names"]:
        raise InputError(f"{data}: has the classes {_some(names)}, the model was trained on "
                         f"{_some(info['class_names'])}")
    if len(names) != info["n_classes"]:
        raise InputError(f"{data}: has {len(names)} classes, the model was trained on {info['n_classes']}")
    return data, levels, labels


def _some(names: list[str]) -> str:
    return str(names) if len(names) <= 12 else f"{names[:10]} ... ({len(names)} classes)"


def run_split(levels, labels, data: str, info: dict):
    """A loaded checkpoint's (``info`` from :func:`load_model`) split of ``data`` -> ((train levels, labels),
    (test levels, labels)); ``labels`` None stays None. On the run's own data the held-out images are the ones
    it recorded (:func:`fastglow.app.fingerprint.recorded_split`; a warning line if the data changed since),
    else those of its test fraction and seed."""
    from .fingerprint import recorded_split, same_source

    config = info["config"] or {}
    saved = info.get("dataset") if same_source(data, config.get("data")) else None
    train, test, warning = recorded_split(data, levels, info["n_bins"], config, saved)
    if warning:
        print(f"fastglow: warning: {warning}", file=sys.stderr)
    if test.numel() == 0:
        raise InputError(f"{data}: none of the run's held-out images is there any more; pass --split all")
    return tuple((levels[idx], None if labels is None else labels[idx]) for idx in (train, test))
