"""Data sets. The default, scikit-learn's bundled 8x8 digits (17 grey levels), needs no network."""

from __future__ import annotations

import torch

DIGITS_LEVELS = 17  # pixel values 0..16


def load_digits(generator: torch.Generator | None = None, test_fraction: float = 0.2):
    """(train, test) integer tensors of shape (N, 1, 8, 8) with values in 0..16, shuffled and split."""
    from sklearn.datasets import load_digits as sklearn_digits

    images = torch.from_numpy(sklearn_digits().images).to(torch.int64).unsqueeze(1)
    order = torch.randperm(images.shape[0], generator=generator)
    n_test = int(round(images.shape[0] * test_fraction))
    return images[order[n_test:]], images[order[:n_test]]


def dequantize(levels: torch.Tensor, n_bins: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer levels in [0, n_bins) -> floats in [-0.5, 0.5) plus uniform noise of one bin's width."""
    noise = torch.rand(levels.shape, generator=generator, dtype=dtype)
    return (levels.to(dtype) + noise) / n_bins - 0.5
