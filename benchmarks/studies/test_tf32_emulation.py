"""benchmarks/studies/tf32_emulation.py: the torch emulation of tl.dot's tf32 / tf32x3 behind the RESULTS numbers."""

import pytest
import torch

from benchmarks.studies.tf32_emulation import estimate, matmul, mix_precision, round_tf32


def test_round_tf32_keeps_ten_mantissa_bits_to_nearest():
    torch.manual_seed(0)
    x = torch.randn(10000) * torch.logspace(-20, 20, 10000)
    r = round_tf32(x)
    assert torch.all(r.view(torch.int32) & 0x1FFF == 0)
    ulp = torch.ldexp(torch.ones_like(x), torch.frexp(x)[1] - 11)  # one TF32 ulp at x's binade
    err = (r.double() - x.double()).abs()
    assert torch.all(err <= ulp.double() / 2)  # nearest
    assert torch.equal(round_tf32(-x), -r)  # ties away from zero: symmetric
    assert torch.equal(round_tf32(r), r)


def test_tf32x3_is_close_to_float32_and_tf32_is_not():
    torch.manual_seed(1)
    a, b = torch.randn(96, 96), torch.randn(96, 500)
    exact = a.double() @ b.double()
    err = {p: ((matmul(a, b, p).double() - exact).norm() / exact.norm()).item() for p in ("ieee", "tf32", "tf32x3")}
    assert err["tf32x3"] < 10 * err["ieee"]
    assert err["tf32"] > 100 * err["tf32x3"]
    with pytest.raises(ValueError):
        matmul(a, b, "bf16")


def test_emulation_reaches_the_models_1x1_convs():
    """On a small model the one-pass tf32 mix visibly breaks the round trip; tf32x3 stays near ieee."""
    rows = estimate(n_flow=4, n_block=2, hidden=16, batch=2, img=8)
    ieee, tf32x3, tf32 = (rows[f"float32 {p}"] for p in ("ieee", "tf32x3", "tf32"))
    assert ieee["round_trip"] < 1e-5 and tf32x3["round_trip"] < 1e-5
    assert tf32["round_trip"] > 30 * ieee["round_trip"]
    assert tf32["grad"] > 10 * tf32x3["grad"]
    assert rows["float64 (ieee)"]["round_trip"] < 1e-12
    with pytest.raises(ValueError), mix_precision("fp16"):
        pass
