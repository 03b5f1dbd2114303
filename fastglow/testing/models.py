"""Models at random non-trivial weights and the error measures every comparison uses.

A fresh Glow is near-identity (zero-initialised coupling outputs and priors), which hides bugs; every
comparison is made after :func:`perturb_` has moved every parameter.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error ||actual - expected||_2 / ||expected||_2 (over all elements)."""
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error over the largest expected magnitude, max|actual - expected| / max|expected|,
    computed in float64."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


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
def initialized_model(model: nn.Module, x: torch.Tensor, sigma: float = 0.01, seed: int = 0,
                      y: torch.Tensor | None = None) -> nn.Module:
    """Run ActNorm's data-dependent init on ``x`` (with labels ``y`` for a class-conditional model), then
    perturb every parameter."""
    model(x) if y is None else model(x, y)
    return perturb_(model, sigma, seed)


def models_on_one_state(constructors: Sequence[Callable[[], nn.Module]], x_shape, *, sigma: float,
                        dtype: torch.dtype = torch.float64, seed: int = 0, y: torch.Tensor | None = None):
    """-> (x, [models]): after ``torch.manual_seed(seed)``, x ~ U(-0.5, 0.5) of ``x_shape``; the first model is
    ActNorm-initialised on x (and labels ``y``, class-conditional models) and perturbed by ``sigma``, every other
    one loads its ``state_dict`` (so a reference Glow and fastglow Glows of several backends or modes share
    exactly the same weights)."""
    torch.manual_seed(seed)
    x = torch.rand(*x_shape, dtype=dtype) - 0.5
    first = initialized_model(constructors[0]().to(dtype), x, sigma=sigma, y=y)
    models = [first]
    for make in constructors[1:]:
        model = make().to(dtype)
        model.load_state_dict(first.state_dict())
        models.append(model)
    return x, models


def coupling_activity(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Mean |NN output| of every coupling on input x: zero for a freshly initialised model."""
    seen = []
    hooks = [f.coupling.net.register_forward_hook(lambda m, i, out: seen.append(out.abs().mean().item()))
             for b in model.blocks for f in b.flows]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen
