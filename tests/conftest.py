"""Test set-up: without CUDA, Triton kernels run through the interpreter (set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_numpy():
    """The LU 1x1 convs draw their initial rotation from numpy's generator (as rosinality's do): seeded per
    test, so a test's weights do not depend on the tests before it."""
    np.random.seed(0)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
