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
import warnings

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


class ClassConditional:
    """What :class:`fastglow.reference.Glow` (an ``nn.Module``) adds with ``n_classes=N``: the ``class_prior`` and
    ``classifier`` modules, the per-level prior shifts of labels y, the class loss, encode and classify."""

    def add_class_modules(self, n_classes: int | None, class_weight: float, top_channels: int) -> None:
        """After nn.Module.__init__: nothing for ``n_classes=None`` (rosinality's tree), else the two maps."""
        self.n_classes, self.class_weight = n_classes, class_weight
        if n_classes is not None:
            self.class_prior = ZeroLinear(n_classes, 2 * top_channels)
            self.classifier = ZeroLinear(top_channels, n_classes)

    def prior_shifts(self, y, required: bool) -> list:
        """Per level, what y adds to the prior's output: None below the top; the class term at the top."""
        if self.n_classes is None or (y is None and not required):
            return [None] * self.n_block
        if y is None:
            raise ValueError(f"y (int64 class labels, shape [B]) is required: the model was built with "
                             f"n_classes={self.n_classes}")
        return [None] * (self.n_block - 1) + [class_prior_shift(self.class_prior, y)]

    def class_logits(self, z_outs) -> torch.Tensor:
        """Logits (B, n_classes) of the auxiliary classifier on forward's top latent ``z_outs[-1]``."""
        self._require_classifier()
        return top_latent_logits(self.classifier, z_outs[-1])

    def class_loss(self, z_outs, y) -> torch.Tensor:
        """class_weight * mean cross-entropy (bits) of the classifier: the training loss is
        ``bits_per_dim(log_p, logdet, ...) + model.class_loss(z_outs, y)``."""
        return self.class_weight * cross_entropy_bits(self.class_logits(z_outs), y).mean()

    def encode(self, x) -> list:
        """forward's latents z_outs of images x, no labels needed: the flow never sees y (only the top prior
        does), so a class-conditional model encodes with label 0 and discards the density."""
        if not all(flow.actnorm.is_initialized for block in self.blocks for flow in block.flows):
            warnings.warn("the model's ActNorm layers are not initialised: this batch initialises them (their "
                          "data-dependent init); train the model or load its weights first", RuntimeWarning,
                          stacklevel=2)
        y = None if self.n_classes is None else torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        return self(x, y)[2]

    def classify(self, x) -> torch.Tensor:
        """Class logits (B, n_classes) of images x: the auxiliary classifier on their top latent."""
        self._require_classifier()
        return self.class_logits(self.encode(x))

    def _require_classifier(self) -> None:
        if self.n_classes is None:
            raise ValueError("the model is unconditional (n_classes=None): it has no classifier")
