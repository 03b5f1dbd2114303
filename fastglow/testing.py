"""Helpers for tests and benchmarks: models at random non-trivial weights.

A fresh Glow is near-identity (zero-initialised coupling outputs and priors), which hides bugs; every
comparison is made after :func:`perturb_` has moved every parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def perturb_(module: nn.Module, sigma: float = 0.01, seed: int = 0) -> nn.Module:
    """p += sigma * randn / sqrt(fan_in) for every parameter; fan_in = numel of one output slice
    (a conv weight's in_channels * kh * kw), 1 for vectors."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        fan_in = p[0].numel() if p.dim() > 1 else 1
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
        p.add_((sigma * noise).to(p.device, p.dtype))
    return module


@torch.no_grad()
def initialized_model(model: nn.Module, x: torch.Tensor, sigma: float = 0.01, seed: int = 0) -> nn.Module:
    """Run ActNorm's data-dependent init on ``x``, then perturb every parameter."""
    model(x)
    return perturb_(model, sigma, seed)
