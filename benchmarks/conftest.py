"""pytest set-up for benchmarks/ (the suites run once each as smoke tests; the tools' tests): without CUDA the
Triton kernels run through the interpreter, set before triton is imported.

    pytest benchmarks/suites --benchmark-enable --benchmark-json=bench.json   # then python -m benchmarks.suites.report
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
