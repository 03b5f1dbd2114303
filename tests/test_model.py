"""fastglow.Glow against the reference and rosinality's checkpoint layout; the public helpers."""

import math
from functools import partial

import pytest
import torch

import fastglow
from fastglow import reference
from fastglow.testing import models_on_one_state

FLOW_KEYS_LU = ["w_p", "u_mask", "l_mask", "s_sign", "l_eye", "w_l", "w_s", "w_u"]


def _expected_keys(n_flow, n_block, conv_lu):
    """rosinality/glow-pytorch's state_dict layout, written out by hand (last block always LU)."""
    keys = set()
    for i in range(n_block):
        for k in range(n_flow):
            f = f"blocks.{i}.flows.{k}"
            keys |= {f"{f}.actnorm.loc", f"{f}.actnorm.scale", f"{f}.actnorm.initialized"}
            lu = conv_lu or i == n_block - 1
            keys |= {f"{f}.invconv.{n}" for n in FLOW_KEYS_LU} if lu else {f"{f}.invconv.weight"}
            keys |= {f"{f}.coupling.net.0.weight", f"{f}.coupling.net.0.bias",
                     f"{f}.coupling.net.2.weight", f"{f}.coupling.net.2.bias",
                     f"{f}.coupling.net.4.conv.weight", f"{f}.coupling.net.4.conv.bias",
                     f"{f}.coupling.net.4.scale"}
        keys |= {f"blocks.{i}.prior.conv.weight", f"blocks.{i}.prior.conv.bias", f"blocks.{i}.prior.scale"}
    return keys


@pytest.mark.parametrize("conv_lu", [True, False])
@pytest.mark.parametrize("cls", [reference.Glow, fastglow.Glow])
def test_state_dict_keys_match_rosinality_layout(cls, conv_lu):
    model = cls(3, 2, 3, conv_lu=conv_lu, hidden_channels=8)
    assert set(model.state_dict()) == _expected_keys(2, 3, conv_lu)


def test_parameter_shapes_match_rosinality_at_default_width():
    sd = fastglow.Glow(3, 1, 2).state_dict()
    assert sd["blocks.0.flows.0.coupling.net.0.weight"].shape == (512, 6, 3, 3)
    assert sd["blocks.0.flows.0.coupling.net.4.conv.weight"].shape == (12, 512, 3, 3)
    assert sd["blocks.0.flows.0.actnorm.loc"].shape == (1, 12, 1, 1)
    assert sd["blocks.0.flows.0.invconv.w_s"].shape == (12,)
    assert sd["blocks.0.prior.conv.weight"].shape == (12, 6, 3, 3)
    assert sd["blocks.1.prior.conv.weight"].shape == (48, 24, 3, 3)
    assert sd["blocks.1.flows.0.actnorm.initialized"].dtype == torch.uint8


def _pair(affine=True, conv_lu=True, dtype=torch.float64):
    """A perturbed reference model and a fastglow.Glow loaded from its state_dict."""
    kw = dict(affine=affine, conv_lu=conv_lu, hidden_channels=16)
    x, (ref, fast) = models_on_one_state([partial(reference.Glow, 3, 2, 2, **kw),
                                          partial(fastglow.Glow, 3, 2, 2, backend="eager", **kw)],
                                         (3, 3, 8, 8), sigma=0.3, dtype=dtype)
    return ref, fast, x


@pytest.mark.parametrize("affine,conv_lu", [(True, True), (False, False)])
def test_fast_model_matches_reference_outputs_and_gradients(affine, conv_lu):
    ref, fast, x = _pair(affine, conv_lu)
    outs = []
    for model in (ref, fast):
        xi = x.clone().requires_grad_()
        log_p, logdet, z_outs = model(xi)
        loss = (log_p + logdet).sum() + sum((z ** 2).sum() for z in z_outs)
        loss.backward()
        outs.append((log_p, logdet, z_outs, xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (lp_r, ld_r, z_r, gx_r, g_r), (lp_f, ld_f, z_f, gx_f, g_f) = outs
    torch.testing.assert_close(lp_f, lp_r, rtol=1e-12, atol=0)
    torch.testing.assert_close(ld_f, ld_r, rtol=1e-12, atol=0)
    for a, b in zip(z_f, z_r):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-10, atol=1e-12)
    assert g_f.keys() == g_r.keys()
    for name in g_r:
        torch.testing.assert_close(g_f[name], g_r[name], rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():
        eps = [torch.randn_like(z) for z in z_r]
        torch.testing.assert_close(fast.reverse(eps), ref.reverse(eps), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fast.reverse(z_r, reconstruct=True), ref.reverse(z_r, reconstruct=True),
                                   rtol=1e-10, atol=1e-12)


def test_checkpoint_round_trip_and_data_parallel_prefix(tmp_path):
    ref, _, x = _pair(dtype=torch.float32)
    path = tmp_path / "rosinality_style.pt"
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, path)
    loaded = fastglow.Glow(3, 2, 2, hidden_channels=16)
    loaded.load_state_dict(torch.load(path))
    assert loaded.actnorm_initialized()
    with torch.no_grad():
        for a, b in zip(loaded(x)[:2], ref(x)[:2]):
            torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="Missing key"):
        fastglow.Glow(3, 2, 3, hidden_channels=16).load_state_dict(torch.load(path))


def test_z_shapes_match_forward_outputs():
    model = fastglow.Glow(2, 1, 3, hidden_channels=8)
    x = torch.rand(2, 2, 16, 24) - 0.5
    _, _, z_outs = model(x)
    assert [tuple(z.shape[1:]) for z in z_outs] == fastglow.z_shapes(2, (16, 24), 3)
    assert fastglow.z_shapes(3, 64, 4) == [(6, 32, 32), (12, 16, 16), (24, 8, 8), (96, 4, 4)]


def test_bits_per_dim_is_rosinality_calc_loss():
    log_p = torch.tensor([-1000.0, -1200.0])
    logdet = torch.tensor([150.0, 250.0])
    n_pixel = 3 * 8 * 8
    expected = (-(log_p + logdet - math.log(256) * n_pixel) / (math.log(2) * n_pixel))
    bpd = fastglow.bits_per_dim(log_p, logdet, (2, 3, 8, 8), 256)
    assert bpd.item() == pytest.approx(expected.mean().item())
    torch.testing.assert_close(fastglow.bits_per_dim(log_p, logdet, (3, 8, 8), 256, reduction="none"),
                               expected)
    with pytest.raises(ValueError, match="reduction"):
        fastglow.bits_per_dim(log_p, logdet, (3, 8, 8), 256, reduction="sum")


def test_sample_draws_from_the_prior_at_temperature():
    _, fast, x = _pair()
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match="img_size"):
        fastglow.Glow(3, 2, 2, hidden_channels=16).sample(2)
    fast(x[:, :, :, :8])
    imgs = fast.sample(5, temperature=0.7, generator=gen)  # img_size from the last forward (8x8)
    assert imgs.shape == (5, 3, 8, 8) and imgs.dtype == torch.float64 and torch.isfinite(imgs).all()
    # temperature 0: every latent is its prior mean, so every sample is the same image
    zero = fast.sample(3, temperature=0.0, img_size=8)
    torch.testing.assert_close(zero[0], zero[2])
    # the same noise through reverse gives the same images
    gen.manual_seed(1)
    eps = [0.7 * torch.randn(5, *s, generator=gen, dtype=torch.float64) for s in fastglow.z_shapes(3, 8, 2)]
    torch.testing.assert_close(imgs, fast.reverse(eps))
    assert fast.sample(1, img_size=(8, 16)).shape == (1, 3, 8, 16)


def test_logdet_has_batch_shape_in_both_coupling_modes():
    for affine in (True, False):
        model = fastglow.Glow(1, 2, 2, affine=affine, hidden_channels=8)
        log_p, logdet, _ = model(torch.rand(3, 1, 4, 4) - 0.5)
        assert log_p.shape == (3,) and logdet.shape == (3,)
