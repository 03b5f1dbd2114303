"""Each fused kernel against the eager op sequence it replaces: time, and achieved GB/s next to the
measured device-to-device copy bandwidth (``extra_info``)."""

import pytest
import torch
from torch.nn import functional as F

from benchmarks.conftest import DEVICE, KERNEL_SHAPES, synchronized
from fastglow import reference
from fastglow.backends import select_backend


def _operands(shape, affine=True):
    b, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))
    return dict(y=randn(b, c, h, w), h_raw=randn(b, c if affine else c // 2, h, w),
                zscale=0.1 * randn(c if affine else c // 2), mix_weight=q.float().to(DEVICE),
                mix_bias=randn(c))


def _eager_coupling_mix(y, h_raw, zscale, mix_weight, mix_bias, affine=True):
    y_a, y_b = y.chunk(2, 1)
    y_b, logdet = reference.coupling_combine(y_b, h_raw * torch.exp(3 * zscale.view(1, -1, 1, 1)), affine)
    return F.conv2d(torch.cat([y_a, y_b], 1), mix_weight[:, :, None, None], mix_bias), logdet


def _fused_coupling_mix(y, h_raw, zscale, mix_weight, mix_bias, affine=True):
    from fastglow.kernels.flow_step import coupling_mix_forward  # after conftest decided TRITON_INTERPRET
    mixed, _, logdet = coupling_mix_forward(y, h_raw, zscale, mix_weight, mix_bias, affine=affine)
    return mixed, logdet


def _gbps(benchmark, nbytes):
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9 if benchmark.stats else None


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_copy_bandwidth(benchmark, shape):
    x = torch.randn(shape, device=DEVICE)
    out = torch.empty_like(x)
    benchmark.group = f"kernels {shape}"
    benchmark(synchronized(out.copy_), x)
    _gbps(benchmark, 2 * x.numel() * x.element_size())


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_coupling_mix_forward(benchmark, shape, impl):
    """Coupling combine of step k + ActNorm/1x1 of step k+1: reads y and h_raw, writes the mixed tensor."""
    args = _operands(shape)
    fn = _fused_coupling_mix if impl == "fused" else _eager_coupling_mix
    benchmark.group = f"kernels {shape}"
    mixed, logdet = benchmark(synchronized(fn), **args)
    ref_mixed, ref_logdet = _eager_coupling_mix(**args)
    torch.testing.assert_close(mixed, ref_mixed, rtol=1e-4, atol=1e-4)
    _gbps(benchmark, (2 * args["y"].numel() + args["h_raw"].numel()) * 4)


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_squeeze(benchmark, shape, impl):
    b, c, h, w = shape
    x = torch.randn(b, c, 2 * h, 2 * w, device=DEVICE)
    fn = select_backend("triton", x).squeeze if impl == "fused" else reference.squeeze2d
    benchmark.group = f"kernels {shape}"
    out = benchmark(synchronized(fn), x)
    assert torch.equal(out, reference.squeeze2d(x))
    _gbps(benchmark, 2 * x.numel() * 4)


@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_lu_weight_level(benchmark, impl):
    """All K=32 steps' W, W^-1, log|det W| of a level at C=48."""
    torch.manual_seed(0)
    flows = torch.nn.ModuleList(reference.Flow(48, hidden_channels=4) for _ in range(32 if DEVICE.type == "cuda" else 2))
    flows.to(DEVICE)

    def eager():
        ws = [f.invconv.calc_weight() for f in flows]
        return [torch.linalg.inv(w) for w in ws], [f.invconv.log_abs_det() for f in flows]

    benchmark.group = "lu_weight"
    from fastglow.ops import fold_level  # after conftest decided TRITON_INTERPRET
    benchmark(synchronized(lambda: fold_level(flows) if impl == "fused" else eager()))
