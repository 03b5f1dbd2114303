"""One full training step (forward + backward + Adam) of the whole model, and sampling throughput:
fastglow (triton, reversible) vs the eager reference vs ``torch.compile`` of the reference.
Peak memory of the step goes to ``extra_info`` (``torch.cuda.max_memory_allocated`` on CUDA)."""

import pytest
import torch

import fastglow
from benchmarks.conftest import DEVICE, MODEL_SHAPES, ON_CUDA, synchronized
from fastglow import reference
from fastglow.testing import initialized_model

IMPLS = ["fastglow", "eager", "compiled"]


def _build(impl, shape):
    _, c, size, k, l, hidden, affine, batch = shape
    torch.manual_seed(0)
    x = torch.rand(batch, c, size, size, device=DEVICE) - 0.5
    if impl == "fastglow":
        model = fastglow.Glow(c, k, l, affine=affine, hidden_channels=hidden, backend="triton", reversible=True)
    else:
        model = reference.Glow(c, k, l, affine=affine, hidden_channels=hidden)
    model = initialized_model(model.to(DEVICE), x, sigma=0.01)
    run = torch.compile(model) if impl == "compiled" else model
    return model, run, x


def _train_step(model, run, x, optimizer):
    log_p, logdet, _ = run(x)
    loss = fastglow.bits_per_dim(log_p, logdet, x.shape, 256)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: s[0])
def test_training_step(benchmark, shape, impl):
    model, run, x = _build(impl, shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    step = synchronized(lambda: _train_step(model, run, x, optimizer))
    step()  # warm-up (and compilation)
    if ON_CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"training step {shape[0]}"
    loss = benchmark.pedantic(step, rounds=5 if ON_CUDA else 1, warmup_rounds=1 if ON_CUDA else 0)
    assert torch.isfinite(loss)
    if ON_CUDA:
        benchmark.extra_info["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    benchmark.extra_info["images"] = x.shape[0]


@pytest.mark.parametrize("impl", ["fastglow", "eager"])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: s[0])
def test_sampling(benchmark, shape, impl):
    name, c, size, k, l, hidden, affine, batch = shape
    model, _, _ = _build(impl, shape)
    z_shapes = fastglow.z_shapes(c, size, l)

    @torch.no_grad()
    def sample():
        return model.reverse([0.7 * torch.randn(batch, *s, device=DEVICE) for s in z_shapes])

    benchmark.group = f"sampling {name}"
    imgs = benchmark.pedantic(synchronized(sample), rounds=5 if ON_CUDA else 1)
    assert imgs.shape == (batch, c, size, size) and torch.isfinite(imgs).all()
    if benchmark.stats:
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
