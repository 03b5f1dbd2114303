"""The Triton backend end to end: the kernels' ops gradchecked in float64, and the whole model
against the eager backend and the reference at perturbed weights (CPU: through the interpreter)."""

from functools import partial

import pytest
import torch

import fastglow
from fastglow import reference
from fastglow.backends import EagerSteps, TritonSteps, select_backend
from fastglow.kernels.channel_mix import channel_mix
from fastglow.kernels.coupling import coupling, coupling_mix
from fastglow.kernels.lu_weight import lu_weight, perm_from_matrix
from fastglow.kernels.squeeze import squeeze
from fastglow.level_backward import level_backward
from fastglow.testing import kernel_operands, models_on_one_state, perturb_, rel_error


pytestmark = pytest.mark.usefixtures("on_device")  # CUDA when there is one, else CPU (Triton: the interpreter)

def test_squeeze_function_gradcheck():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: squeeze(v, False), (x,))
    y = torch.randn(1, 8, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: squeeze(v, True), (y,))


@pytest.mark.parametrize("c,steps", [(2, 2), (5, 1)])
def test_lu_weight_function_gradcheck(c, steps):
    torch.manual_seed(c)
    convs = [perturb_(reference.InvConv2dLU(c).double(), sigma=0.5, seed=i) for i in range(steps)]
    perm = perm_from_matrix(torch.stack([m.w_p for m in convs]))
    s_sign = torch.stack([m.s_sign for m in convs])
    params = [torch.stack([getattr(m, n) for m in convs]).detach().requires_grad_() for n in ("w_l", "w_u", "w_s")]
    assert torch.autograd.gradcheck(lambda l, u, s: lu_weight(perm, l, u, s, s_sign), params)
    w, w_inv, logdet = lu_weight(perm, *params, s_sign)
    for k, m in enumerate(convs):
        torch.testing.assert_close(w[k], m.calc_weight(), rtol=1e-12, atol=1e-12)


def _operands(affine, *names, seed=0):
    """The named kernel operands (:func:`fastglow.testing.kernel_operands`: activation x, h_raw, zscale, a
    well-conditioned mix) at a small odd shape (2, 6, 1, 3), float64, requiring grad."""
    operands = kernel_operands((2, 6, 1, 3), torch.float64, affine, torch.get_default_device(), seed)
    return [operands[name].requires_grad_() for name in names]


def test_channel_mix_function_gradcheck():
    assert torch.autograd.gradcheck(channel_mix, _operands(True, "x", "mix_weight", "mix_bias"))


@pytest.mark.parametrize("affine", [True, False])
def test_coupling_function_gradcheck(affine):
    y, h_raw, zscale = _operands(affine, "x", "h_raw", "zscale")
    assert torch.autograd.gradcheck(lambda *a: coupling(*a, affine), (y, h_raw, zscale))


def _models(affine, conv_lu, dtype, reversible=False):
    kw = dict(affine=affine, conv_lu=conv_lu, hidden_channels=16)
    backends = ("eager", "triton")
    x, (ref, *fast) = models_on_one_state(
        [partial(reference.Glow, 3, 2, 2, **kw)] +
        [partial(fastglow.Glow, 3, 2, 2, backend=b, reversible=reversible, **kw) for b in backends],
        (2, 3, 8, 8), sigma=0.3, dtype=dtype)
    return ref, dict(zip(backends, fast)), x


def _run(model, x):
    model.zero_grad()
    xi = x.clone().requires_grad_()
    log_p, logdet, z_outs = model(xi)
    ((log_p + logdet).sum() + sum((z ** 2).sum() for z in z_outs)).backward()
    with torch.no_grad():
        rec = model.reverse(z_outs, reconstruct=True)
        sample = model.reverse([0.7 * torch.ones_like(z) for z in z_outs])
    grads = {n: p.grad for n, p in model.named_parameters()}
    return dict(log_p=log_p, logdet=logdet, z=torch.cat([z.flatten() for z in z_outs]), rec=rec,
                sample=sample, grad_x=xi.grad), grads


@pytest.mark.parametrize("affine,conv_lu,reversible", [(True, True, False), (False, True, True),
                                                       (True, False, True), (False, False, False)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_triton_model_matches_eager_and_reference(affine, conv_lu, reversible, dtype, tol):
    """Plain autograd and reversible backprop (fused forward across steps, fused backward from output)."""
    ref, fast, x = _models(affine, conv_lu, dtype, reversible)
    out_ref, grad_ref = _run(ref, x)
    for backend in ("eager", "triton"):
        out, grads = _run(fast[backend], x)
        for key in out_ref:
            assert rel_error(out[key], out_ref[key]) <= tol, (backend, key)
        for name, g in grad_ref.items():
            assert rel_error(grads[name], g) <= 10 * tol, (backend, name)  # gradients: sums of many terms
    assert rel_error(out_ref["rec"], x) <= tol


def test_auto_backend_is_eager_on_cpu_and_triton_on_cuda():
    assert isinstance(select_backend("auto", torch.zeros(1)), EagerSteps)
    assert isinstance(select_backend("triton", torch.zeros(1)), TritonSteps)  # TRITON_INTERPRET=1 under the tests
    with pytest.raises(TypeError, match="float32 or float64"):
        select_backend("triton", torch.zeros(1, dtype=torch.float16))


def test_reverse_stays_differentiable_on_the_triton_backend():
    _, fast, x = _models(True, True, torch.float64)
    _, _, z_outs = fast["triton"](x)
    z = [t.detach().requires_grad_() for t in z_outs]
    fast["triton"].reverse(z, reconstruct=True).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in z)


@pytest.mark.parametrize("affine", [True, False])
def test_coupling_mix_function_gradcheck(affine):
    operands = _operands(affine, "x", "h_raw", "zscale", "mix_weight", "mix_bias", seed=1)
    assert torch.autograd.gradcheck(lambda *t: coupling_mix(*t, affine, True), operands)


@pytest.mark.parametrize("affine,conv_lu", [(True, True), (False, False)])
def test_fused_level_forward_matches_per_step(affine, conv_lu):
    ref, fast, x = _models(affine, conv_lu, torch.float64)
    flows = ref.blocks[0].flows
    xs = reference.squeeze2d(x)
    outs = []
    for fn in (lambda v: TritonSteps().forward(flows, v), lambda v: EagerSteps().forward(flows, v)):
        ref.zero_grad()
        v = xs.clone().requires_grad_()
        y, logdet = fn(v)
        ((y ** 3).sum() + logdet.sum()).backward()
        outs.append((y, logdet, v.grad, [p.grad.clone() for p in flows.parameters()]))
    (y_t, ld_t, gx_t, gp_t), (y_e, ld_e, gx_e, gp_e) = outs
    assert rel_error(y_t, y_e) <= 1e-12 and rel_error(ld_t, ld_e) <= 1e-12 and rel_error(gx_t, gx_e) <= 1e-10
    for a, b in zip(gp_t, gp_e):
        assert rel_error(a, b) <= 1e-10


@pytest.mark.parametrize("affine,conv_lu", [(True, True), (False, False)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_level_backward_from_output_matches_autograd(affine, conv_lu, dtype, tol):
    ref, _, _ = _models(affine, conv_lu, dtype)
    flows = ref.blocks[0].flows
    x = torch.randn(2, 12, 4, 4, dtype=dtype, requires_grad=True)
    y, logdet = EagerSteps().forward(flows, x)
    grad_y, grad_logdet = torch.randn_like(y), torch.randn(2, dtype=dtype)
    expected = torch.autograd.grad([y, logdet], [x, *flows.parameters()], [grad_y, grad_logdet])
    for x0 in (None, x.detach()):  # the first step's input rebuilt, or the stored level input
        result = level_backward(list(flows), y.detach(), grad_y, grad_logdet, TritonSteps(), x0=x0)
        grad_x, per_flow = result.grad_x, result.param_grads
        assert rel_error(grad_x, expected[0]) <= tol
        for got, want in zip([g for grads in per_flow for g in grads], expected[1:]):
            assert rel_error(got, want) <= 10 * tol
