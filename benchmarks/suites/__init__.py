"""pytest-benchmark suites (``pytest benchmarks/suites --benchmark-enable --benchmark-json=F``, then
``python -m benchmarks.suites.report F``): their device and shapes, the real ones on CUDA, tiny ones on a CPU
(a smoke test, the Triton kernels through the interpreter)."""

import os

import torch

from benchmarks.harness import ModelShape, synchronized

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:  # decided before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
MODEL_SHAPES = [ModelShape("cifar", 3, 32, 32, 3, 512, True, 64),
                ModelShape("celeba256", 3, 256, 32, 6, 512, False, 8)] if ON_CUDA else \
    [ModelShape("tiny", 3, 8, 2, 2, 8, True, 2)]
KERNEL_SHAPES = [(64, 12, 16, 16), (8, 12, 128, 128), (8, 48, 32, 32)] if ON_CUDA else [(2, 6, 4, 4)]


def on_device(fn):
    """fn, synchronised with the suites' device (a timed call includes the GPU work it queued)."""
    return synchronized(fn, DEVICE)
