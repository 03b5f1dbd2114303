"""One full training step (forward + backward + Adam) of the whole model, and sampling throughput:
fastglow (triton, reversible) vs the eager reference vs ``torch.compile`` of the reference.
Peak memory of the step goes to ``extra_info`` (``torch.cuda.max_memory_allocated`` on CUDA)."""

import pytest
import torch

import fastglow
from benchmarks.harness import build_model, training_step
from benchmarks.suites import DEVICE, MODEL_SHAPES, ON_CUDA, on_device

IMPLS = {"fastglow": "fastglow-reversible", "eager": "eager", "compiled": "compiled"}


def _build(impl, shape):
    return build_model(IMPLS[impl], shape, DEVICE, compile_backend="inductor")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: s.name)
def test_training_step(benchmark, shape, impl):
    model, run, x = _build(impl, shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    step = on_device(lambda: training_step(model, run, x, optimizer))
    step()  # warm-up (and compilation)
    if ON_CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"training step {shape.name}"
    loss = benchmark.pedantic(step, rounds=5 if ON_CUDA else 1, warmup_rounds=1 if ON_CUDA else 0)
    assert torch.isfinite(loss)
    if ON_CUDA:
        benchmark.extra_info["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    benchmark.extra_info["images"] = x.shape[0]


@pytest.mark.parametrize("impl", ["fastglow", "eager"])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=lambda s: s.name)
def test_sampling(benchmark, shape, impl):
    model, _, _ = _build(impl, shape)
    z_shapes = fastglow.z_shapes(shape.in_channel, shape.img_size, shape.n_block)

    @torch.no_grad()
    def sample():
        return model.reverse([0.7 * torch.randn(shape.batch, *s, device=DEVICE) for s in z_shapes])

    benchmark.group = f"sampling {shape.name}"
    imgs = benchmark.pedantic(on_device(sample), rounds=5 if ON_CUDA else 1)
    assert imgs.shape == (shape.batch, shape.in_channel, shape.img_size, shape.img_size)
    assert torch.isfinite(imgs).all()
    if benchmark.stats:
        benchmark.extra_info["images_per_s"] = shape.batch / benchmark.stats.stats.median
