"""Argument validation: every bad input is refused with a ValueError/TypeError naming the problem,
before any computation runs."""

from __future__ import annotations

import torch

from .reference import z_shapes

BACKENDS = ("auto", "eager", "triton")
AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)
MIX_PRECISIONS = ("ieee", "tf32x3")  # tl.dot input precision of the Triton 1x1 mix (float32; float64 is ieee)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_config(in_channel, n_flow, n_block, affine, conv_lu, hidden_channels, backend, reversible) -> None:
    """Validate the Glow constructor's arguments."""
    for name, value in (("in_channel", in_channel), ("n_flow", n_flow), ("n_block", n_block),
                        ("hidden_channels", hidden_channels)):
        _positive_int(name, value)
    for name, value in (("affine", affine), ("conv_lu", conv_lu), ("reversible", reversible)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_execution_options(autocast_dtype, channels_last, validate, mix_precision="ieee") -> None:
    """Validate the Glow constructor's execution options (how it runs, not what it computes)."""
    if mix_precision not in MIX_PRECISIONS:
        raise ValueError(f"mix_precision must be one of {MIX_PRECISIONS}, got {mix_precision!r}")
    if autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be one of {AUTOCAST_DTYPES}, got {autocast_dtype!r}")
    for name, value in (("channels_last", channels_last), ("validate", validate)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


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


def check_img_size(img_size, n_block: int) -> tuple[int, int]:
    """img_size (int or (H, W)) must be positive multiples of 2**n_block; returns (H, W)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    step = 2 ** n_block
    if h % step or w % step or h <= 0 or w <= 0:
        raise ValueError(f"image height and width ({h}x{w}) must be positive multiples of "
                         f"2**n_block = {step}")
    return h, w


def check_z_list(z_list, in_channel: int, n_block: int) -> None:
    """z_list must hold n_block finite floating tensors with the shapes of ``forward``'s z_outs."""
    if not isinstance(z_list, (list, tuple)):
        raise TypeError(f"z_list must be a list of tensors, got {type(z_list).__name__}")
    if len(z_list) != n_block:
        raise ValueError(f"z_list must hold n_block={n_block} tensors, got {len(z_list)}")
    for i, z in enumerate(z_list):
        _check_values(f"z_list[{i}]", z)
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


def check_matches_model(name: str, t: torch.Tensor, reference: torch.Tensor) -> None:
    """t must have the dtype and device of the model's parameters (``reference``)."""
    if t.dtype != reference.dtype:
        raise TypeError(f"{name} is {t.dtype} but the model's parameters are {reference.dtype}; "
                        f"convert one of them (e.g. model.to({t.dtype}))")
    if t.device != reference.device:
        raise ValueError(f"{name} is on {t.device} but the model is on {reference.device}")
