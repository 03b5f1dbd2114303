"""Benchmark set-up. On CUDA the real shapes run; on CPU (Triton interpreter) tiny ones, as a smoke test.

    pytest benchmarks/ --benchmark-json=bench.json      # then: python -m benchmarks.suites.report bench.json
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

# (name, in_channel, img_size, n_flow, n_block, hidden, affine, batch)
MODEL_SHAPES = [
    ("cifar", 3, 32, 32, 3, 512, True, 64),
    ("celeba256", 3, 256, 32, 6, 512, False, 8),
] if ON_CUDA else [
    ("tiny", 3, 8, 2, 2, 8, True, 2),
]
# activation shapes (B, C, H, W) for the per-kernel benchmarks
KERNEL_SHAPES = [(64, 12, 16, 16), (8, 12, 128, 128), (8, 48, 32, 32)] if ON_CUDA else [(2, 6, 4, 4)]


def synchronized(fn):
    """Wrap fn so a timed call includes the GPU work it queued."""
    if not ON_CUDA:
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out
    return run


@pytest.fixture
def device():
    return DEVICE
