"""The density side of Glow: the latents' Gaussian priors, their per-sample shapes, and bits per dimension
(rosinality's ``calc_loss``). :mod:`fastglow.reference` builds its levels on these."""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_p(x, mean, log_sd):
    """Elementwise log N(x; mean, exp(log_sd)^2)."""
    return -0.5 * LOG_2PI - log_sd - 0.5 * (x - mean) ** 2 / torch.exp(2 * log_sd)


def gaussian_sample(eps, mean, log_sd):
    return mean + torch.exp(log_sd) * eps


def z_shapes(in_channel: int, img_size, n_block: int) -> list[tuple[int, int, int]]:
    """Per-sample shapes of the latents ``z_outs`` for an image of ``img_size`` (int or (H, W))."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    shapes, c = [], in_channel
    for _ in range(n_block - 1):
        h, w, c = h // 2, w // 2, c * 2
        shapes.append((c, h, w))
    shapes.append((c * 4, h // 2, w // 2))
    return shapes


def bits_per_dim(log_p, logdet, image_shape, n_bins: int | float, reduction: str = "mean"):
    """rosinality's ``calc_loss``: -(log_p + logdet - D log n_bins) / (D log 2), D = C*H*W of one image."""
    n_dims = math.prod(image_shape[-3:]) if len(image_shape) >= 3 else math.prod(image_shape)
    bpd = -(log_p + logdet - math.log(n_bins) * n_dims) / (math.log(2) * n_dims)
    if reduction == "mean":
        return bpd.mean()
    if reduction == "none":
        return bpd
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
