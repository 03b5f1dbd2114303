"""Each fused kernel against the eager op sequence it replaces: time, and achieved GB/s next to the
measured device-to-device copy bandwidth (``extra_info``)."""

import pytest
import torch

from benchmarks.harness import eager_coupling_mix, kernel_operands, lu_level
from benchmarks.suites import DEVICE, KERNEL_SHAPES, on_device
from fastglow import reference
from fastglow.backends import select_backend


def _operands(shape):
    names = ("x", "h_raw", "zscale", "mix_weight", "mix_bias")
    return {k: v for k, v in kernel_operands(shape, device=DEVICE).items() if k in names}


def _fused_coupling_mix(x, h_raw, zscale, mix_weight, mix_bias, affine=True):
    from fastglow.kernels.flow_step import coupling_mix_forward  # after TRITON_INTERPRET is decided
    mixed, _, logdet = coupling_mix_forward(x, h_raw, zscale, mix_weight, mix_bias, affine=affine)
    return mixed, logdet


def _gbps(benchmark, nbytes):
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9 if benchmark.stats else None


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_copy_bandwidth(benchmark, shape):
    x = torch.randn(shape, device=DEVICE)
    out = torch.empty_like(x)
    benchmark.group = f"kernels {shape}"
    benchmark(on_device(out.copy_), x)
    _gbps(benchmark, 2 * x.numel() * x.element_size())


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_coupling_mix_forward(benchmark, shape, impl):
    """Coupling combine of step k + ActNorm/1x1 of step k+1: reads y and h_raw, writes the mixed tensor."""
    args = _operands(shape)
    fn = _fused_coupling_mix if impl == "fused" else eager_coupling_mix
    benchmark.group = f"kernels {shape}"
    mixed, logdet = benchmark(on_device(fn), **args)
    ref_mixed, ref_logdet = eager_coupling_mix(**args)
    torch.testing.assert_close(mixed, ref_mixed, rtol=1e-4, atol=1e-4)
    _gbps(benchmark, (2 * args["x"].numel() + args["h_raw"].numel()) * 4)


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_squeeze(benchmark, shape, impl):
    b, c, h, w = shape
    x = torch.randn(b, c, 2 * h, 2 * w, device=DEVICE)
    fn = select_backend("triton", x).squeeze if impl == "fused" else reference.squeeze2d
    benchmark.group = f"kernels {shape}"
    out = benchmark(on_device(fn), x)
    assert torch.equal(out, reference.squeeze2d(x))
    _gbps(benchmark, 2 * x.numel() * 4)


@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_lu_weight_level(benchmark, impl):
    """All K=32 steps' W, W^-1, log|det W| of a level at C=48."""
    fused, eager = lu_level(32 if DEVICE.type == "cuda" else 2, 48, DEVICE)
    benchmark.group = "lu_weight"
    benchmark(on_device(fused if impl == "fused" else eager))
