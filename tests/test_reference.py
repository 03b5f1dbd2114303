"""The eager oracle against independent maths: exact inversion, brute-force Jacobian log-determinant,
direct Gaussian densities, the LU parameterisation and ActNorm's data-dependent init."""

import itertools

import pytest
import torch

import fastglow
from fastglow import reference
from fastglow.testing import coupling_activity, initialized_model, perturb_, rel_error

VARIANTS = list(itertools.product([True, False], [True, False]))  # (affine, conv_lu)


def _model(cls, c, k, l, affine, conv_lu, dtype, hidden=16, seed=0):
    torch.manual_seed(seed)
    return cls(c, k, l, affine=affine, conv_lu=conv_lu, hidden_channels=hidden).to(dtype)


@pytest.mark.parametrize("affine,conv_lu", VARIANTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("cls", [reference.Glow, fastglow.Glow])
def test_reverse_of_forward_recovers_input(cls, affine, conv_lu, dtype, tol):
    x = torch.rand(2, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(7)) - 0.5
    if dtype == torch.float32 and conv_lu:
        # 24 steps at sigma=0.1 through float32 LU weights (W^-1 by a float32 inverse, as rosinality does):
        # measured 0.98-1.19e-5 over 6 inputs on torch 2.13 (plain weights: 3-5e-6), so 1e-5 sat on the edge
        tol = 2e-5
    model = initialized_model(_model(cls, 3, 8, 3, affine, conv_lu, dtype), x, sigma=0.1)
    assert min(coupling_activity(model, x)) > 0.02  # every coupling moves its half by several percent
    with torch.no_grad():
        log_p, logdet, z_outs = model(x)
        x_rec = model.reverse(z_outs, reconstruct=True)
    assert torch.isfinite(log_p).all() and torch.isfinite(logdet).all()
    assert rel_error(x_rec, x) <= tol


def _flat_latent(model, x):
    return torch.cat([z.flatten() for z in model(x)[2]])


@pytest.mark.parametrize("affine,conv_lu", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 8, 8)])
def test_logdet_equals_log_abs_det_of_full_jacobian(shape, affine, conv_lu):
    x = torch.rand(3, *shape, dtype=torch.float64) - 0.5
    model = initialized_model(_model(reference.Glow, shape[0], 2, 2, affine, conv_lu, torch.float64,
                                     hidden=8), x, sigma=0.3)
    assert min(coupling_activity(model, x)) > 0.1
    with torch.no_grad():
        _, logdet, _ = model(x)
    assert logdet.shape == (3,)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: _flat_latent(model, v), x[i:i + 1])
        jac = jac.reshape(x[i].numel(), x[i].numel())
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        assert logdet[i].item() == pytest.approx(logabsdet.item(), rel=1e-10, abs=1e-10)


def test_log_p_equals_gaussian_density_of_latents():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    model = initialized_model(_model(reference.Glow, 3, 2, 3, True, True, torch.float64), x, sigma=0.3)
    prior_inputs = []
    hooks = [b.prior.register_forward_hook(lambda m, inp, out: prior_inputs.append((inp[0], out)))
             for b in model.blocks]
    with torch.no_grad():
        log_p, _, z_outs = model(x)
    for h in hooks:
        h.remove()
    expected = torch.zeros(2, dtype=torch.float64)
    for i, (z, (cond, out)) in enumerate(zip(z_outs, prior_inputs)):
        if i == len(z_outs) - 1:
            assert torch.count_nonzero(cond) == 0  # last level: the prior is conditioned on zeros
        mean, log_sd = out.chunk(2, 1)
        assert mean.abs().max() > 0  # perturbed prior: a non-trivial density
        density = torch.distributions.Normal(mean, log_sd.exp())
        expected += density.log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(log_p, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c", [4, 12, 48])
def test_lu_weight_is_p_l_u_and_w_s_gives_log_abs_det(c):
    torch.manual_seed(c)
    conv = reference.InvConv2dLU(c).double()
    w0 = conv.calc_weight()
    torch.testing.assert_close(w0 @ w0.T, torch.eye(c, dtype=torch.float64), atol=1e-6, rtol=0)  # rotation init
    perturb_(conv, sigma=0.5)
    p = conv.w_p
    lower = torch.tril(conv.w_l, -1) + torch.eye(c, dtype=torch.float64)
    upper = torch.triu(conv.w_u, 1) + torch.diag(conv.s_sign * conv.w_s.exp())
    assert torch.equal(p @ p.T, torch.eye(c, dtype=torch.float64))  # a permutation
    w = conv.calc_weight()
    torch.testing.assert_close(w, p @ lower @ upper, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.w_s.sum(), torch.linalg.slogdet(w)[1], rtol=1e-10, atol=1e-10)


def test_actnorm_init_standardises_the_first_batch():
    torch.manual_seed(0)
    x = torch.randn(16, 6, 5, 7, dtype=torch.float64) * torch.linspace(0.1, 3, 6).view(1, 6, 1, 1) + 2.0
    actnorm = reference.ActNorm(6).double()
    y, logdet = actnorm(x)
    assert actnorm.initialized.item() == 1
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)
    assert logdet.item() == pytest.approx(5 * 7 * torch.log(actnorm.scale.abs()).sum().item())
    loc = actnorm.loc.detach().clone()
    actnorm(x * 10)  # a second batch does not re-initialise
    assert torch.equal(actnorm.loc, loc)


def test_actnorm_init_never_fires_inside_reverse():
    torch.manual_seed(0)
    model = fastglow.Glow(3, 2, 2, hidden_channels=8)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    z = [torch.randn(2, *s) for s in fastglow.z_shapes(3, 8, 2)]
    with torch.no_grad():
        model.reverse(z)
        model.reverse(z, reconstruct=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert not model.actnorm_initialized()


def test_loaded_initialized_flag_is_respected():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8) - 0.5
    trained = initialized_model(fastglow.Glow(3, 2, 2, hidden_channels=8), x, sigma=0.5)
    fresh = fastglow.Glow(3, 2, 2, hidden_channels=8)
    fresh(x)  # initialised on x: a stale Python flag would survive the load below
    fresh.load_state_dict(trained.state_dict())
    with torch.no_grad():
        out_fresh, out_trained = fresh(x * 3), trained(x * 3)
    torch.testing.assert_close(out_fresh[0], out_trained[0])
    empty = fastglow.Glow(3, 2, 2, hidden_channels=8).state_dict()  # initialized == 0 everywhere
    fresh.load_state_dict(empty)
    assert not fresh.actnorm_initialized()
    fresh(x)
    assert fresh.actnorm_initialized()
