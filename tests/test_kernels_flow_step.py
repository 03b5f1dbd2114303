"""The flow-step kernels (fastglow/kernels/flow_step.py, channel_mix.py, coupling.py) against eager torch

Shapes are small and odd (C not a power of two, non-square images); a covering set rather than the full
product. Two cases reach past one tile: several pixel blocks (P = 192) and several channel chunks (C = 192).
"""

import pytest
import torch

from fastglow.kernels.channel_mix import channel_mix_backward, channel_mix_forward
from fastglow.kernels.coupling import coupling_backward
from fastglow.kernels.flow_step import coupling_mix_forward
from fastglow.reference import coupling_combine, coupling_uncombine
from fastglow.testing import kernel_operands

F32, F64 = torch.float32, torch.float64
TOL = {F32: 1e-5, F64: 1e-10}
SHAPES = [(1, 2, 2, 2), (2, 6, 4, 6), (3, 12, 6, 4), (2, 24, 4, 4), (1, 48, 2, 6), (2, 12, 16, 12), (1, 192, 2, 2)]
COMBOS = [(F32, True), (F64, False), (F64, True), (F32, False)]  # (dtype, affine)
CASES = [(shape, *COMBOS[(2 * i + k) % 4]) for i, shape in enumerate(SHAPES) for k in (0, 1)]
IDS = [f"B{b}C{c}H{h}W{w}-{str(d)[6:]}-{'aff' if a else 'add'}" for (b, c, h, w), d, a in CASES]


def close(actual, expected, dtype):
    """Normwise relative check: max|a - e| <= tol * max(1, max|e|)."""
    assert actual is not None and actual.shape == expected.shape, (None if actual is None else actual.shape)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    ref = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= TOL[dtype] * ref, f"max abs err {err:.3e} vs max ref {ref:.3e}"


def mix(w, x, bias):
    return torch.einsum("oc,bchw->bohw", w, x) + bias.view(1, -1, 1, 1)


def couple(y, h_raw, zscale, affine, inverse=False):
    """Eager coupling from the reference's functions; h = h_raw * exp(3 zscale) as ZeroConv2d does."""
    y_a, y_b = y.chunk(2, 1)
    h = h_raw * torch.exp(zscale.view(1, -1, 1, 1) * 3)
    if inverse:
        return torch.cat([y_a, coupling_uncombine(y_b, h, affine)], 1), None
    y_b, logdet = coupling_combine(y_b, h, affine)
    return torch.cat([y_a, y_b], 1), logdet


@pytest.mark.parametrize("shape,dtype,affine", CASES, ids=IDS)
def test_channel_mix_forward(shape, dtype, affine, device):
    t = kernel_operands(shape, dtype, affine, device)
    x = t["x"].to(memory_format=torch.channels_last) if affine else t["x"]  # non-contiguous input half the time
    out = channel_mix_forward(x, t["mix_weight"], t["mix_bias"])
    assert out.is_contiguous() and out.dtype == dtype
    close(out, mix(t["mix_weight"], t["x"], t["mix_bias"]), dtype)


def test_channel_mix_forward_rectangular(device):
    t = kernel_operands((2, 6, 4, 2), F64, True, device)
    w = torch.randn(10, 6, dtype=F64, device=device)
    close(channel_mix_forward(t["x"], w), mix(w, t["x"], torch.zeros(10, dtype=F64, device=device)), F64)


MODES = ["combine", "combine+mix", "combine+mix+store", "uncombine+mix"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,dtype,affine", CASES, ids=IDS)
def test_coupling_mix_forward(shape, dtype, affine, mode, device):
    t = kernel_operands(shape, dtype, affine, device)
    inverse, has_mix, store = mode.startswith("un"), "mix" in mode, mode.endswith("store")
    w, bias = (t["mix_weight"], t["mix_bias"]) if has_mix else (None, None)
    mixed, coupled, logdet = coupling_mix_forward(t["x"], t["h_raw"], t["zscale"], w, bias, affine=affine,
                                                     inverse=inverse, store_coupled=store)
    ref_coupled, ref_logdet = couple(t["x"], t["h_raw"], t["zscale"], affine, inverse)
    if has_mix:
        close(mixed, mix(w, ref_coupled, bias), dtype)
    else:
        assert mixed is None
    if store or not has_mix:
        close(coupled, ref_coupled, dtype)
    else:
        assert coupled is None
    if inverse:
        assert logdet is None
    else:
        close(logdet, ref_logdet, dtype)


@pytest.mark.parametrize("shape,dtype,affine", CASES, ids=IDS)
def test_round_trip(shape, dtype, affine, device):
    """x -> mix (ActNorm+1x1) -> combine, then uncombine fused with the inverse mix, gives x back; and the
    combine of one step fused with the next step's mix equals the two launches apart."""
    t = kernel_operands(shape, dtype, affine, device)
    y = channel_mix_forward(t["x"], t["mix_weight"], t["mix_bias"])
    _, out, _ = coupling_mix_forward(y, t["h_raw"], t["zscale"], affine=affine)
    x_rec, y_rec, _ = coupling_mix_forward(out, t["h_raw"], t["zscale"], t["mix_weight_inv"], t["mix_bias_inv"],
                                              affine=affine, inverse=True, store_coupled=True)
    close(y_rec, y, dtype)
    close(x_rec, t["x"], dtype)
    fused, _, _ = coupling_mix_forward(y, t["h_raw"], t["zscale"], t["mix_weight"], t["mix_bias"], affine=affine)
    close(fused, channel_mix_forward(out, t["mix_weight"], t["mix_bias"]), dtype)


@pytest.mark.parametrize("shape,dtype,affine", CASES, ids=IDS)
def test_coupling_backward(shape, dtype, affine, device):
    t = kernel_operands(shape, dtype, affine, device)
    with_gld = shape[0] != 2  # also cover grad_logdet=None
    y, h_raw, zs = (t[k].clone().requires_grad_() for k in ("x", "h_raw", "zscale"))
    out, logdet = couple(y, h_raw, zs, affine)
    loss = (out * t["grad"]).sum() + ((logdet * t["grad_logdet"]).sum() if with_gld else 0)
    ref = torch.autograd.grad(loss, (y, h_raw, zs))
    res = coupling_backward(out.detach(), t["grad"], t["h_raw"], t["zscale"],
                               t["grad_logdet"] if with_gld else None, affine=affine)
    close(res[0], t["x"], dtype)  # recomputed input
    for got, want in zip(res[1:], ref):
        close(got, want, dtype)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("shape,dtype,affine", CASES, ids=IDS)
def test_channel_mix_backward(shape, dtype, affine, recompute, device):
    t = kernel_operands(shape, dtype, affine, device)
    x, w, bias = (t[k].clone().requires_grad_() for k in ("x", "mix_weight", "mix_bias"))
    y = mix(w, x, bias)
    ref = torch.autograd.grad((y * t["grad"]).sum(), (x, w, bias))
    if recompute:
        res = channel_mix_backward(y.detach(), t["grad"], t["mix_weight"], t["mix_weight_inv"], t["mix_bias_inv"])
    else:
        res = channel_mix_backward(None, t["grad"], t["mix_weight"], x=t["x"])
    close(res[0], t["x"], dtype)
    for got, want in zip(res[1:], ref):
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_coupling_extreme_scales(dtype, device):
    """|log_s + 2| up to ~60: s and log s stay finite and match torch (sigmoid / logsigmoid)."""
    b, c, hh, ww = 2, 6, 2, 4
    y = torch.randn(b, c, hh, ww, dtype=dtype, device=device)
    h_raw = 30 * torch.randn(b, c, hh, ww, dtype=dtype, device=device)
    zs = torch.zeros(c, dtype=dtype, device=device)
    _, coupled, logdet = coupling_mix_forward(y, h_raw, zs, affine=True)
    ref_coupled, ref_logdet = couple(y, h_raw, zs, True)
    assert torch.isfinite(logdet).all()
    close(coupled, ref_coupled, dtype)
    close(logdet, ref_logdet, dtype)


def test_bad_inputs(device):
    t = kernel_operands((2, 6, 4, 2), F32, True, device)
    x, h, zs, w, bias = t["x"], t["h_raw"], t["zscale"], t["mix_weight"], t["mix_bias"]
    cases = [
        (TypeError, lambda: channel_mix_forward(x.numpy() if x.device.type == "cpu" else 1.0, w, bias)),
        (TypeError, lambda: channel_mix_forward(x.half(), w.half(), bias.half())),
        (TypeError, lambda: channel_mix_forward(x, w.double(), bias)),
        (ValueError, lambda: channel_mix_forward(x[0], w, bias)),
        (ValueError, lambda: channel_mix_forward(x, w[:, :4], bias)),
        (ValueError, lambda: channel_mix_forward(x, w, bias[:5])),
        (ValueError, lambda: coupling_mix_forward(x[:, :5], h[:, :5], zs[:5], affine=True)),
        (ValueError, lambda: coupling_mix_forward(x, h[:, :3], zs, affine=True)),
        (ValueError, lambda: coupling_mix_forward(x, h, zs[:3], affine=True)),
        (ValueError, lambda: coupling_mix_forward(x, h, zs, affine=False)),
        (ValueError, lambda: coupling_mix_forward(x, h, zs, None, bias, affine=True)),
        (TypeError, lambda: coupling_mix_forward(x, h.double(), zs, affine=True)),
        (ValueError, lambda: coupling_backward(x, x[:1], h, zs, affine=True)),
        (ValueError, lambda: coupling_backward(x, x, h, zs, zs, affine=True)),
        (ValueError, lambda: channel_mix_backward(x, x, w)),
        (ValueError, lambda: channel_mix_backward(x, x, w, w[:4])),
        (ValueError, lambda: channel_mix_backward(None, x, w, x=x[:, :4])),
        (ValueError, lambda: channel_mix_forward(x, w, bias, input_precision="tf32")),  # breaks invertibility
        (ValueError, lambda: channel_mix_backward(None, x, w, x=x, input_precision="bf16x3")),
    ]
    for err, call in cases:
        with pytest.raises(err):
            call()
