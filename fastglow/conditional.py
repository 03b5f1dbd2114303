"""Class-conditional Glow (Kingma & Dhariwal, 2018, Sec. 5; openai/glow's ``--ycond``): the pieces the
reference model adds when built with ``n_classes=N``.

Only the top level's learned prior sees the class y; the flow itself (every step, every split prior below the
top) is unchanged, so both backends and reversible backprop run it as they run the unconditional model:

    top prior        h = ZeroConv2d(0) + ClassPrior(onehot(y))      (broadcast over the top level's H x W)
                     mean, log_sd = h.chunk(2)                      log p(z_top | y) = Σ log N(z_top; mean, e^log_sd)
    classifier       logits = Classifier(mean_{H,W} z_top)         (auxiliary, on the top latent)
    class loss       class_weight * CE(logits, y) / ln 2            (bits; openai's weight_y, default 0.01)

ClassPrior and Classifier are zero-initialised linear maps (output times exp(3 * scale), as ZeroConv2d): a fresh
conditional model has exactly the unconditional model's density and uniform class logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_CLASS_WEIGHT = 0.01


class ZeroLinear(nn.Module):
    """y = (x W^T + b) * exp(3 * scale), every parameter zero-initialised (the linear twin of ZeroConv2d)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * torch.exp(self.scale * 3)


def class_prior_shift(class_prior: ZeroLinear, y: torch.Tensor) -> torch.Tensor:
    """The top prior's class term: ClassPrior(onehot(y)) of shape (B, 2 C_top), added to (mean, log_sd)."""
    n_classes = class_prior.weight.shape[1]
    return class_prior(F.one_hot(y, n_classes).to(class_prior.weight.dtype))


def top_latent_logits(classifier: ZeroLinear, z_top: torch.Tensor) -> torch.Tensor:
    """Class logits (B, n_classes) of the auxiliary classifier: a linear map of the spatially mean-pooled z_top."""
    return classifier(z_top.mean((2, 3)))


def cross_entropy_bits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy -log2 softmax(logits)[y], in bits (the unit of bits/dim)."""
    return F.cross_entropy(logits, y, reduction="none") / math.log(2)
