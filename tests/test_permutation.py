"""Permutation variants (NICE's reverse, RealNVP's shuffle, Glow's 1x1 conv) on both backends: the brute-force
Jacobian, exact inversion, reversible = plain autograd, fastglow = reference, checkpoints (launch counts:
benchmarks/studies/test_launch_counts.py; the CLI: test_permutation_app.py)."""

import io
from functools import partial

import pytest
import torch

import fastglow
from fastglow import reference
from fastglow.permutation import PERMUTATIONS, SHUFFLE_SEED, ChannelPermutation, permutation_weights
from fastglow.testing import coupling_activity, models_on_one_state, rel_error

FIXED = ("shuffle", "reverse")
BACKENDS = ("eager", "triton")


def _ref_and_fast(permutation, backend, affine=True, shape=(2, 3, 8, 8), k=2, l=2, reversible=(False,),
                  dtype=torch.float64, sigma=0.3, **kw):
    """reference.Glow and fastglow.Glow (one per ``reversible`` value) on one perturbed state."""
    kw = dict(affine=affine, hidden_channels=8, permutation=permutation, **kw)
    makers = [partial(reference.Glow, shape[1], k, l, **kw)]
    makers += [partial(fastglow.Glow, shape[1], k, l, backend=backend, reversible=r, **kw) for r in reversible]
    x, models = models_on_one_state(makers, shape, sigma=sigma, dtype=dtype)
    return x, models


def _outputs_and_grads(model, x, y=None):
    model.zero_grad()
    xi = x.clone().requires_grad_()
    log_p, logdet, z_outs = model(xi) if y is None else model(xi, y)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(z.shape, generator=gen, dtype=z.dtype) for z in z_outs]
    (-(log_p + logdet).mean() / 100 + sum((w * z).sum() for w, z in zip(weights, z_outs))).backward()
    with torch.no_grad():
        rec = model.reverse(z_outs, reconstruct=True) if y is None else model.reverse(z_outs, True, y)
    out = dict(log_p=log_p, logdet=logdet, z=torch.cat([z.flatten() for z in z_outs]), rec=rec, grad_x=xi.grad)
    return out, {name: p.grad for name, p in model.named_parameters()}


# ---- the permutation module -----------------------------------------------------------------------------------
@pytest.mark.parametrize("permutation", FIXED)
def test_permutation_is_the_1x1_conv_with_an_exactly_invertible_weight(permutation):
    gen = torch.Generator().manual_seed(3)
    mod = reference.Flow(12, hidden_channels=4, permutation=permutation, generator=gen).invconv.double()
    x = torch.randn(2, 12, 3, 5, dtype=torch.float64)
    y, logdet = mod(x)
    w = mod.calc_weight()
    assert w.dtype == torch.float64 and mod.log_abs_det() == 0 and logdet == 0
    torch.testing.assert_close(y, torch.einsum("oi,bihw->bohw", w, x), rtol=0, atol=0)
    assert torch.equal(mod.reverse(y), x)
    assert torch.equal(torch.linalg.inv(w), w.t())  # P^-1 = P^T, what the fused path uses without a solver
    stacked, inverse, log_det = permutation_weights([mod, mod])
    assert torch.equal(stacked[1], w) and torch.equal(inverse[0], w.t()) and not log_det.any()
    if permutation == "reverse":
        assert mod.perm.tolist() == list(range(11, -1, -1))


def test_shuffle_is_fixed_by_its_own_seed_and_leaves_the_global_rng_alone():
    def perms(model):
        return [f.invconv.perm.clone() for b in model.blocks for f in b.flows]

    torch.manual_seed(0)
    a = reference.Glow(1, 4, 2, hidden_channels=4, permutation="shuffle")
    torch.manual_seed(1)
    b = reference.Glow(1, 4, 2, hidden_channels=4, permutation="shuffle")
    assert all(torch.equal(p, q) for p, q in zip(perms(a), perms(b)))  # the same shuffle whatever the seed
    gen = torch.Generator().manual_seed(SHUFFLE_SEED)
    assert torch.equal(perms(a)[0], torch.randperm(4, generator=gen))
    assert len({tuple(p.tolist()) for p in perms(a)}) > 4  # steps draw different permutations
    torch.manual_seed(0)
    c = reference.Glow(1, 4, 2, hidden_channels=4, permutation="reverse")
    # the draws do not touch the global RNG: shuffle and reverse models of one seed share every parameter
    for (name, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("cls", [reference.Glow, fastglow.Glow])
def test_bad_permutation_arguments_are_refused(cls):
    for bad in ("1x1", None, 2):
        with pytest.raises(ValueError, match="permutation must be one of"):
            cls(1, 2, 2, hidden_channels=4, permutation=bad)
    with pytest.raises(ValueError, match="conv_lu=False applies to permutation='conv' only"):
        cls(1, 2, 2, hidden_channels=4, permutation="shuffle", conv_lu=False)


# ---- the model, both backends ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("permutation,affine", [("conv", True), ("shuffle", True), ("shuffle", False),
                                                ("reverse", True), ("reverse", False)])
def test_log_density_equals_the_brute_force_jacobian(permutation, affine, backend):
    x, (ref, fast) = _ref_and_fast(permutation, backend, affine, shape=(2, 1, 4, 4))
    assert min(coupling_activity(ref, x)) > 0.05

    def latents(v):
        return torch.cat([z.flatten() for z in fast(v)[2]])

    with torch.no_grad():
        log_p, logdet, _ = fast(x)
        ref_log_p = ref(x)[0]
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(latents, x[i:i + 1]).reshape(16, 16)
        sign, log_abs_det = torch.linalg.slogdet(jac)
        assert sign != 0
        assert logdet[i].item() == pytest.approx(log_abs_det.item(), rel=1e-10, abs=1e-10)
        # log p(x) = log N(z) + log|det dz/dx|, with log N(z) from the reference
        assert (log_p + logdet)[i].item() == pytest.approx((ref_log_p[i] + log_abs_det).item(), rel=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("permutation", PERMUTATIONS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_exact_inversion(permutation, backend, dtype, tol):
    x, (_, fast) = _ref_and_fast(permutation, backend, shape=(2, 3, 8, 8), k=4, l=2, dtype=dtype, sigma=0.1)
    with torch.no_grad():
        z_outs = fast(x)[2]
        x_rec = fast.reverse(z_outs, reconstruct=True)
        sample = fast.reverse([0.7 * torch.randn_like(z) for z in z_outs])
    assert rel_error(x_rec, x) <= tol
    with torch.no_grad():
        z_again = fast(sample)[2]
    assert rel_error(fast.reverse(z_again, reconstruct=True), sample) <= 10 * tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("permutation,affine", [("conv", False), ("shuffle", True), ("shuffle", False),
                                                ("reverse", True), ("reverse", False)])
def test_fast_plain_and_reversible_equal_the_reference(permutation, affine, backend):
    """fastglow.Glow (plain autograd and reversible backprop) against reference.Glow at perturbed weights:
    outputs, reconstruction, and every gradient, float64."""
    x, (ref, plain, rev) = _ref_and_fast(permutation, backend, affine, shape=(2, 3, 8, 8), k=4, l=2,
                                         reversible=(False, True), sigma=0.1)
    out_ref, grads_ref = _outputs_and_grads(ref, x)
    for model in (plain, rev):
        out, grads = _outputs_and_grads(model, x)
        for key in out_ref:
            assert rel_error(out[key], out_ref[key]) <= 1e-10, (model.reversible, key)
        assert grads.keys() == grads_ref.keys()
        for name, g in grads_ref.items():
            assert g.norm() > 0, name
            assert rel_error(grads[name], g) <= 1e-9, (model.reversible, name)
    assert rel_error(out_ref["rec"], x) <= 1e-12


@pytest.mark.parametrize("permutation", FIXED)
def test_float32_triton_reversible_matches_the_reference(permutation):
    x, (ref, rev) = _ref_and_fast(permutation, "triton", shape=(2, 3, 8, 8), k=4, l=2, reversible=(True,),
                                  dtype=torch.float32, sigma=0.1)
    out_ref, grads_ref = _outputs_and_grads(ref, x)
    out, grads = _outputs_and_grads(rev, x)
    for key in out_ref:
        assert rel_error(out[key], out_ref[key]) <= 1e-5, key
    for name, g in grads_ref.items():
        assert rel_error(grads[name], g) <= 1e-4, name  # gradients: sums of many float32 terms


@pytest.mark.parametrize("permutation", FIXED)
def test_class_conditional_model_with_a_fixed_permutation(permutation):
    y = torch.tensor([2, 0])
    kw = dict(n_classes=3, hidden_channels=8, permutation=permutation)
    x, (ref, rev) = models_on_one_state([partial(reference.Glow, 1, 2, 2, **kw),
                                         partial(fastglow.Glow, 1, 2, 2, backend="triton", **kw)],
                                        (2, 1, 8, 8), sigma=0.3, y=y)
    out_ref, grads_ref = _outputs_and_grads(ref, x, y)
    out, grads = _outputs_and_grads(rev, x, y)
    for key in out_ref:
        assert rel_error(out[key], out_ref[key]) <= 1e-10, key
    for name, g in grads_ref.items():
        if name.startswith("classifier."):  # used by class_loss only, not in this loss
            assert g is None and grads[name] is None
            continue
        assert rel_error(grads[name], g) <= 1e-9, name


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_state_dict_round_trip(permutation):
    kw = dict(hidden_channels=4, permutation=permutation, backend="eager")
    x, (model,) = models_on_one_state([partial(fastglow.Glow, 1, 2, 2, **kw)], (2, 1, 8, 8), sigma=0.3)
    keys = {k.split("invconv.")[1] for k in model.state_dict() if ".invconv." in k}
    assert keys == ({"perm"} if permutation != "conv" else
                    {"w_p", "u_mask", "l_mask", "s_sign", "l_eye", "w_l", "w_s", "w_u"})
    if permutation == "shuffle":  # a checkpoint carries its permutations, not the seed's draw
        model.blocks[0].flows[1].invconv.perm.copy_(torch.tensor([3, 1, 0, 2]))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    torch.manual_seed(123)
    other = fastglow.Glow(1, 2, 2, **kw).double()
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    with torch.no_grad():
        for a, b in zip(model(x), other(x)):
            assert all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, list) else torch.equal(a, b)
    if permutation != "conv":
        with pytest.raises(RuntimeError, match="invconv"):
            fastglow.Glow(1, 2, 2, hidden_channels=4).load_state_dict(model.state_dict())
        broken = {**model.state_dict(), "blocks.1.flows.0.invconv.perm": torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])}
        with pytest.raises(RuntimeError, match=r"blocks.1.flows.0.invconv.perm is not a permutation of 0..7"):
            other.load_state_dict(broken)
        with pytest.raises(ValueError, match="perm must be a permutation"):
            ChannelPermutation(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_of_a_fixed_permutation_has_no_host_sync(backend):
    """The permutation's gather and the fold's stacking read no value back (reversible backward included)."""
    from fastglow.testing import HostSyncDetector, initialized_model

    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) - 0.5
    model = initialized_model(fastglow.Glow(3, 2, 2, hidden_channels=8, backend=backend, permutation="shuffle",
                                            validate=False, reversible_tol=None), x)
    with HostSyncDetector() as detector:
        log_p, logdet, _ = model(x)
        (log_p + logdet).sum().backward()
    assert detector.syncs == []
