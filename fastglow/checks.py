"""Argument validation: every bad input is refused with a ValueError/TypeError naming the problem,
before any computation runs."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .kernels.utils import MIX_PRECISIONS  # the Triton 1x1 mix's tl.dot input precisions
from .likelihood import bits_per_dim, z_shapes

BACKENDS = ("auto", "eager", "triton")
AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)
MAX_N_BLOCK = 12  # images must be at least 2**n_block pixels a side: 4096 is already far beyond any Glow


def _is_int(value) -> bool:
    """Any integral number (int, numpy.int64, ...), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_bool(name: str, value) -> None:
    """A bool, or numpy's (np.bool_): anything else is refused, naming its type in full."""
    if not isinstance(value, (bool, np.bool_)):
        kind = type(value)
        raise TypeError(f"{name} must be a bool, got {kind.__module__ + '.' if kind.__module__ != 'builtins' else ''}"
                        f"{kind.__qualname__}")


def _positive_int(name: str, value) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_config(in_channel, n_flow, n_block, affine, conv_lu, hidden_channels, backend, reversible) -> None:
    """Validate the Glow constructor's arguments."""
    for name, value in (("in_channel", in_channel), ("n_flow", n_flow), ("n_block", n_block),
                        ("hidden_channels", hidden_channels)):
        _positive_int(name, value)
    check_n_block(n_block)
    for name, value in (("affine", affine), ("conv_lu", conv_lu), ("reversible", reversible)):
        _check_bool(name, value)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        check_triton_possible()


def check_triton_possible() -> None:
    """backend="triton" needs the triton package and a CUDA device, or TRITON_INTERPRET=1 (CPU tensors):
    refused when the model is built, not at its second forward."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend='triton' needs the triton package, which is not installed; use backend='auto'")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 to interpret it on the "
                         "CPU), and there is none here; use backend='auto' or 'eager'")


def check_execution_options(autocast_dtype, channels_last, validate, mix_precision="ieee") -> None:
    """Validate the Glow constructor's execution options (how it runs, not what it computes)."""
    if mix_precision not in MIX_PRECISIONS:
        raise ValueError(f"mix_precision must be one of {MIX_PRECISIONS}, got {mix_precision!r}")
    if autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be one of {AUTOCAST_DTYPES}, got {autocast_dtype!r}")
    for name, value in (("channels_last", channels_last), ("validate", validate)):
        _check_bool(name, value)


def _check_values(name: str, t, finite: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
    meta = t.device.type == "meta"  # shapes only, no values to check
    if finite and not capturing and not meta and not bool(torch.isfinite(t).all()):  # a host sync
        raise ValueError(f"{name} contains NaN or Inf values")


def check_image(x, in_channel: int, n_block: int, finite: bool = True) -> None:
    """x must be a floating (B, in_channel, H, W) tensor with H and W divisible by 2**n_block, and finite
    (``finite=False`` skips that check, the only one that reads values: a host sync on CUDA)."""
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        raise ValueError(f"input must have 4 dimensions (B, C, H, W), got shape {tuple(x.shape)}")
    _check_values("input", x, finite)
    b, c, h, w = x.shape
    if b < 1:
        raise ValueError("input has an empty batch")
    if c != in_channel:
        raise ValueError(f"input has {c} channels, the model was built for in_channel={in_channel}")
    check_img_size((h, w), n_block)


def check_n_block(n_block) -> None:
    """n_block is a positive int no larger than MAX_N_BLOCK (refused before anything is allocated)."""
    _positive_int("n_block", n_block)
    if n_block > MAX_N_BLOCK:
        raise ValueError(f"n_block={n_block} needs images of at least 2**{n_block} pixels a side and "
                         f"{2 ** (n_block + 1)}x the input channels at the last level; at most {MAX_N_BLOCK} "
                         "is supported")


def check_img_size(img_size, n_block: int) -> tuple[int, int]:
    """img_size (int or (H, W)) must be positive multiples of 2**n_block; returns (H, W)."""
    if _is_int(img_size):
        h = w = int(img_size)
    elif isinstance(img_size, (tuple, list, torch.Size)) and len(img_size) == 2 and all(map(_is_int, img_size)):
        h, w = (int(v) for v in img_size)
    else:
        raise TypeError(f"img_size must be an int or a pair (H, W) of ints, got {img_size!r}")
    step = 2 ** n_block
    if h % step or w % step or h <= 0 or w <= 0:
        raise ValueError(f"image height and width ({h}x{w}) must be positive multiples of "
                         f"2**n_block = {step}")
    return h, w


def check_z_list(z_list, in_channel: int, n_block: int, finite: bool = True) -> None:
    """z_list must hold n_block floating tensors with the shapes of ``forward``'s z_outs, finite (``finite=False``
    skips that check, the only one that reads values)."""
    if not isinstance(z_list, (list, tuple)):
        raise TypeError(f"z_list must be a list of tensors, got {type(z_list).__name__}")
    if len(z_list) != n_block:
        raise ValueError(f"z_list must hold n_block={n_block} tensors, got {len(z_list)}")
    for i, z in enumerate(z_list):
        _check_values(f"z_list[{i}]", z, finite)
        if z.dim() != 4:
            raise ValueError(f"z_list[{i}] must have 4 dimensions, got shape {tuple(z.shape)}")
    last = z_list[-1]
    scale = 2 ** n_block
    expected = z_shapes(in_channel, (last.shape[2] * scale, last.shape[3] * scale), n_block)
    for i, (z, shape) in enumerate(zip(z_list, expected)):
        if tuple(z.shape) != (last.shape[0], *shape):
            raise ValueError(f"z_list[{i}] has shape {tuple(z.shape)}, expected {(last.shape[0], *shape)}")
        if z.dtype != last.dtype or z.device != last.device:
            raise TypeError(f"z_list[{i}] is {z.dtype} on {z.device}, z_list[-1] is {last.dtype} on {last.device}")


def check_sample_args(n, temperature) -> None:
    """``Glow.sample``: n a positive int, temperature a finite number >= 0."""
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")


def check_matches_model(name: str, t: torch.Tensor, reference: torch.Tensor) -> None:
    """t must have the dtype and device of the model's parameters (``reference``)."""
    if t.dtype != reference.dtype:
        raise TypeError(f"{name} is {t.dtype} but the model's parameters are {reference.dtype}; "
                        f"convert one of them (e.g. model.to({t.dtype}))")
    if t.device != reference.device:
        raise ValueError(f"{name} is on {t.device} but the model is on {reference.device}")


def check_class_config(n_classes, class_weight) -> None:
    """n_classes: None (unconditional) or an int >= 2; class_weight: a finite number >= 0."""
    if n_classes is not None:
        _positive_int("n_classes", n_classes)
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2 (or None for an unconditional model), got {n_classes}")
    if isinstance(class_weight, bool) or not isinstance(class_weight, numbers.Real):
        raise TypeError(f"class_weight must be a number, got {type(class_weight).__name__}")
    if not 0 <= class_weight < float("inf"):
        raise ValueError(f"class_weight must be a finite number >= 0, got {class_weight}")


def check_labels(y, n_classes: int | None, batch: int, device: torch.device, required: bool = True) -> None:
    """y: int64 class labels of shape (batch,) in [0, n_classes), on ``device``; given exactly when the model is
    class-conditional (``required=False``: optional there, e.g. a reconstructing reverse)."""
    if n_classes is None:
        if y is not None:
            raise ValueError("y was given, but the model is unconditional (built with n_classes=None)")
        return
    if y is None:
        if required:
            raise ValueError(f"y (int64 class labels, shape [{batch}]) is required: the model was built with "
                             f"n_classes={n_classes}")
        return
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of int64 class labels, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise TypeError(f"y must have dtype torch.int64 (class labels), got {y.dtype}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"y must have shape ({batch},), one label per image, got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"y is on {y.device} but the images/latents are on {device}")
    capturing = y.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and batch and not bool(((y >= 0) & (y < n_classes)).all()):
        raise ValueError(f"y holds labels outside [0, {n_classes}): min {int(y.min())}, max {int(y.max())}")


def checked_z_shapes(in_channel, img_size, n_block) -> list[tuple[int, int, int]]:
    """``fastglow.z_shapes``: :func:`fastglow.likelihood.z_shapes` after refusing arguments it would silently
    get wrong (an image size that is not a multiple of 2**n_block, non-integers)."""
    _positive_int("in_channel", in_channel)
    check_n_block(n_block)
    return z_shapes(int(in_channel), check_img_size(img_size, n_block), int(n_block))


def checked_bits_per_dim(log_p, logdet, image_shape, n_bins, reduction: str = "mean"):
    """``fastglow.bits_per_dim``: :func:`fastglow.likelihood.bits_per_dim` after checking n_bins is a finite
    number >= 1 (log n_bins is in the formula)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Real):
        raise TypeError(f"n_bins must be a number, got {type(n_bins).__name__}")
    if not (math.isfinite(n_bins) and n_bins >= 1):
        raise ValueError(f"n_bins must be a finite number >= 1 (levels per channel, e.g. 256), got {n_bins}")
    return bits_per_dim(log_p, logdet, image_shape, n_bins, reduction)
