"""Test set-up: without CUDA, Triton kernels run through the interpreter (set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (make test): one torch thread each, children too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

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


def pytest_addoption(parser):
    parser.addoption("--float64-last", action="store_true",
                     help="run every test parametrised with torch.float64 after all the others (the GPU run: the "
                          "float32 results first, whatever the budget leaves for float64)")


def _uses_float64(item) -> bool:
    """Parametrised with torch.float64, or a float64 gradcheck or float64 test by name."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "float64" in item.name or "gradcheck" in item.name or any(v is torch.float64 or (isinstance(v, (tuple, list)) and torch.float64 in v) for v in params.values())


# The slowest tests on 2 CPU cores (pytest --durations; 15-60 s each, the rest under 15 s), started first under
# pytest-xdist so that no worker is left with one of them while the other has finished.
SLOW_FIRST = ("test_backward_chunks_give_the_unchunked_gradients", "test_every_phase_ran_and_the_run_says_so",
              "test_sm90_gate_passes", "test_step_memory_against_depth",
              "test_ill_conditioned_level_falls_back_to_exact_gradients",
              "test_torchrun_with_workers_killed_then_resumed_is_bit_identical",
              "test_peak_memory_with_backward_chunks_grows_with_the_batch_by_level_tensors_only",
              "test_every_command_line_runs_in_order_at_tiny_sizes", "test_peak_rss_of_a_training_step_is_flat_in_depth")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--float64-last", default=False):
        items.sort(key=_uses_float64)  # stable: each group keeps its order
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.originalname not in SLOW_FIRST)  # stable; the same order on every worker


@pytest.fixture
def on_device(device):
    """The test builds its tensors and modules on ``device`` without naming it: under CUDA, torch's default device
    is CUDA for the test (the backend="triton" tests then run natively; on a CPU they run through the
    interpreter) and TF32 is off, so float32 comparisons stay exact. A test file opts in with
    ``pytestmark = pytest.mark.usefixtures("on_device")``."""
    if device.type != "cuda":
        yield device
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with device:
            yield device
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
