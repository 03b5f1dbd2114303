"""Reversible backprop (fastglow.reversible): gradients equal plain autograd's at depth with non-trivial
weights, gradcheck, inference and frozen inputs, optimizer steps, ActNorm init, memory flat in depth K."""

import itertools
from functools import partial

import numpy as np
import pytest
import torch

import fastglow
from fastglow.backends import EagerSteps
from fastglow.reversible import reversible_steps
from fastglow.testing import (coupling_activity, initialized_model, measure_step_memory, models_on_one_state,
                              rel_error)

pytestmark = pytest.mark.usefixtures("on_device")  # CUDA when there is one, else CPU (Triton: the interpreter)

VARIANTS = list(itertools.product([True, False], [True, False]))  # (affine, conv_lu)


def _pair(affine=True, conv_lu=True, dtype=torch.float64, n_flow=16, n_block=3, size=16, sigma=0.07,
          hidden=16, batch=2):
    """(plain, reversible): fastglow.Glow with reversible=False and =True on one perturbed state_dict."""
    kwargs = dict(affine=affine, conv_lu=conv_lu, hidden_channels=hidden, backend="eager")
    x, (plain, rev) = models_on_one_state([partial(fastglow.Glow, 3, n_flow, n_block, reversible=False, **kwargs),
                                           partial(fastglow.Glow, 3, n_flow, n_block, **kwargs)],
                                          (batch, 3, size, size), sigma=sigma, dtype=dtype)
    return plain, rev, x


def _loss(outputs):
    """Involves log_p, logdet (scaled so they do not drown the rest) and every latent, with fixed weights."""
    log_p, logdet, z_outs = outputs
    gen = torch.Generator().manual_seed(1)  # the same weights on every device
    weights = [torch.randn(z.shape, generator=gen, dtype=z.dtype, device="cpu").to(z.device) for z in z_outs]
    return -(log_p + logdet).mean() / 100 + sum((w * z).sum() for w, z in zip(weights, z_outs))


def _gradients(model, x, x_requires_grad=True):
    xi = x.clone().requires_grad_(x_requires_grad)
    outputs = model(xi)
    _loss(outputs).backward()
    return outputs, xi.grad, {name: p.grad for name, p in model.named_parameters()}


def _is_level_node(node) -> bool:
    """The autograd node of the fastglow::reversible_level op."""
    return "fastglow_reversible_level" in type(node).__name__


def _uses_reversible_function(outputs):
    """True when the level outputs' autograd nodes include the reversible level op (the graph reaches it)."""
    seen, stack = set(), [outputs[0].grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if _is_level_node(node):
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


@pytest.mark.parametrize("affine,conv_lu", VARIANTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_gradients_equal_plain_autograd_at_depth(affine, conv_lu, dtype, tol):
    plain, rev, x = _pair(affine, conv_lu, dtype)
    assert min(coupling_activity(plain, x)) > 0.02  # every coupling moves its half by a few percent
    with torch.no_grad():
        x_rec = plain.reverse(plain(x)[2], reconstruct=True)
    assert rel_error(x_rec, x) < (1e-11 if dtype == torch.float64 else 1e-3)  # a K=16 model that inverts
    (lp_p, ld_p, z_p), gx_p, g_p = _gradients(plain, x)
    out_r, gx_r, g_r = _gradients(rev, x)
    assert _uses_reversible_function(out_r) and not _uses_reversible_function((lp_p,))
    torch.testing.assert_close(out_r[0], lp_p, rtol=0, atol=0)  # the same forward arithmetic
    torch.testing.assert_close(out_r[1], ld_p, rtol=0, atol=0)
    assert rel_error(gx_r, gx_p) <= tol
    assert g_r.keys() == g_p.keys()
    for name in g_p:
        assert g_p[name].norm() > 0, name
        assert rel_error(g_r[name], g_p[name]) <= tol, name


@pytest.mark.parametrize("affine", [True, False])
def test_coupling_rebuild_over_own_buffers_equals_the_fresh_one(affine):
    """``reuse=True`` writes y and grad_y over out and grad_out (the same numbers); ``reuse=False`` leaves
    them untouched."""
    gen = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64, device="cpu").to(  # noqa: E731
        torch.get_default_device())
    out, grad_out, h_raw = (draw(2, 6, 5, 3) for _ in range(3))
    h_raw = h_raw if affine else h_raw[:, :3]
    net_out = (h_raw, 0.1 * draw(h_raw.shape[1]))
    grad_logdet = draw(2)
    out0, grad0 = out.clone(), grad_out.clone()
    y, grad_y, grad_net = EagerSteps.coupling_backward(out, grad_out, net_out, grad_logdet, affine)
    assert torch.equal(out, out0) and torch.equal(grad_out, grad0)
    y2, grad_y2, grad_net2 = EagerSteps.coupling_backward(out, grad_out, net_out, grad_logdet, affine, reuse=True)
    assert y2.data_ptr() == out.data_ptr() and grad_y2.data_ptr() == grad_out.data_ptr()
    for fresh, reused in ((y, y2), (grad_y, grad_y2), *zip(grad_net, grad_net2)):
        torch.testing.assert_close(reused, fresh, rtol=0, atol=0)
    assert not torch.equal(y, out0) and torch.equal(y[:, :3], out0[:, :3])


@pytest.mark.parametrize("chunk", [None, 1])
def test_backward_leaves_the_latents_and_input_as_they_were(chunk):
    """The reversible backward rebuilds activations over its own buffers only: the level outputs the caller
    holds (latents, next level's input) and the image are unchanged, chunked or not."""
    _, rev, x = _pair(n_flow=3, n_block=2, size=8, batch=2)
    rev.backward_chunk = chunk
    xi = x.clone().requires_grad_()
    log_p, logdet, z_outs = rev(xi)
    kept = [z.clone() for z in z_outs]
    _loss((log_p, logdet, z_outs)).backward()
    assert all(torch.equal(z, k) for z, k in zip(z_outs, kept)) and torch.equal(xi.detach(), x)
    assert xi.grad is not None and torch.isfinite(xi.grad).all()


@pytest.mark.parametrize("affine,conv_lu", [(True, True), (False, False)])
def test_gradcheck_through_reversible_levels(affine, conv_lu):
    torch.manual_seed(0)
    np.random.seed(2)  # the LU convs' draws (numpy's, as rosinality's): weights with no ReLU within eps of its kink
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64) - 0.5
    model = fastglow.Glow(2, 2, 2, affine=affine, conv_lu=conv_lu, hidden_channels=4).double()
    initialized_model(model, x, sigma=0.3)
    names = [n for n, _ in model.named_parameters()
             if n.startswith("blocks.0.flows.1.") or n.startswith("blocks.1.flows.0.actnorm")
             or n == "blocks.1.flows.1.invconv.w_s"]
    assert any("invconv.weight" in n for n in names) != conv_lu  # plain 1x1 conv weight checked when present
    state = dict(model.named_parameters())
    params = [state[n].detach().clone().requires_grad_() for n in names]

    def latents(x, *params):
        log_p, logdet, z_outs = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        assert _uses_reversible_function((log_p,))
        return torch.cat([log_p, logdet, *(z.flatten() for z in z_outs)])

    assert torch.autograd.gradcheck(latents, (x.clone().requires_grad_(), *params), eps=1e-6, atol=1e-6)


def test_no_grad_inference_runs_plain_loop_and_saves_nothing():
    plain, rev, x = _pair(n_flow=4)
    packed = []
    for context in (torch.no_grad, torch.inference_mode):
        with context(), torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            log_p, logdet, z_outs = rev(x)
        assert log_p.grad_fn is None and all(z.grad_fn is None for z in z_outs)
        torch.testing.assert_close(log_p, plain(x)[0].detach(), rtol=0, atol=0)
    assert packed == []


def test_input_without_grad_and_frozen_parameters():
    plain, rev, x = _pair(n_flow=4)
    for model in (plain, rev):
        for name, p in model.named_parameters():
            p.requires_grad_("actnorm" not in name and not name.endswith("w_l"))
    outs_p, gx_p, g_p = _gradients(plain, x, x_requires_grad=False)
    outs_r, gx_r, g_r = _gradients(rev, x, x_requires_grad=False)
    assert gx_p is None and gx_r is None and _uses_reversible_function(outs_r)
    for name in g_p:
        if "actnorm" in name or name.endswith("w_l"):
            assert g_r[name] is None and g_p[name] is None, name
        else:
            assert rel_error(g_r[name], g_p[name]) <= 1e-9, name


def test_optimizer_steps_with_accumulated_gradients_match_plain():
    plain, rev, x = _pair(n_flow=4)
    batches = [x, x.flip(0) * 0.8]
    for model in (plain, rev):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            for batch in batches:  # two backward passes accumulate into .grad
                _loss(model(batch)).backward()
            opt.step()
    params_r = dict(rev.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(params_r[name], p, rtol=1e-9, atol=1e-12, msg=name)


def test_backward_evaluates_each_coupling_network_once_and_no_step_twice():
    """The one extra network forward per step: backward runs every coupling network once (rebuilding the step
    input and backpropagating from that one evaluation), and neither a step's forward nor its inverse."""
    _, rev, x = _pair(n_flow=5, n_block=1)
    flows, calls = rev.blocks[0].flows, {"forward": 0, "inverse": 0, "network": 0}

    class CountingSteps(EagerSteps):
        """Counts the steps run forward and inverted."""

        def forward(self, steps, v):
            calls["forward"] += len(steps)
            return super().forward(steps, v)

        def inverse(self, steps, v):
            calls["inverse"] += len(steps)
            return super().inverse(steps, v)

    for flow in flows:
        flow.coupling.net[0].register_forward_hook(lambda *_: calls.__setitem__("network", calls["network"] + 1))
    xi = fastglow.reference.squeeze2d(x).requires_grad_()
    y, logdet = reversible_steps(flows, xi, CountingSteps())
    assert calls == {"forward": 5, "inverse": 0, "network": 5}
    (y.square().sum() + logdet.sum()).backward()
    assert calls == {"forward": 5, "inverse": 0, "network": 10}


def test_saved_tensors_flat_in_depth_and_level_output_costs_nothing():
    """Measured through saved_tensors_hooks: what the graph keeps, in bytes of distinct storages."""
    saved_bytes = {}
    for reversible, n_flow in itertools.product([True, False], [2, 8]):
        plain, rev, x = _pair(n_flow=n_flow, dtype=torch.float32, size=32)
        model = rev if reversible else plain
        param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = []  # (storage, nbytes, saved by the reversible level op as its output)

        def pack(t):
            by_level = _is_level_node(t.grad_fn)
            saved.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), by_level))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, _, z_outs = model(x)
        activations = {ptr: n for ptr, n, _ in saved if ptr not in param_storages}
        saved_bytes[reversible, n_flow] = sum(activations.values())
        if reversible:
            alive_anyway = {ptr for ptr, _, by_level in saved if not by_level}
            alive_anyway |= {z.untyped_storage().data_ptr() for z in z_outs}
            level_outputs = {ptr for ptr, _, by_level in saved if by_level}
            assert len(level_outputs) == 3 and level_outputs <= alive_anyway
    assert saved_bytes[True, 8] == saved_bytes[True, 2]
    assert saved_bytes[False, 8] > 3 * saved_bytes[False, 2] > 3 * saved_bytes[True, 8]


def test_peak_rss_of_a_training_step_is_flat_in_depth():
    step_mb = {(rev, k): measure_step_memory(k, rev)["step_mb"]
               for rev, k in itertools.product([True, False], [4, 32])}
    assert step_mb[True, 32] <= 1.1 * step_mb[True, 4] + 3.0, step_mb
    assert step_mb[False, 32] >= step_mb[False, 4] + 0.5 * (32 - 4) / 4 * step_mb[False, 4], step_mb  # ~ K
    assert step_mb[False, 32] > 5 * step_mb[True, 32], step_mb


def test_double_backward_is_refused():
    _, rev, x = _pair(n_flow=2, n_block=2, size=8)
    xi = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(_loss(rev(xi)), xi, create_graph=True)


def test_actnorm_is_never_initialised_inside_a_reversible_level():
    _, rev, x = _pair(n_flow=2, n_block=2, size=8)
    fresh = fastglow.Glow(3, 2, 2, hidden_channels=16).double()
    xs = fastglow.reference.squeeze2d(x)
    with pytest.raises(RuntimeError, match="ActNorm is not initialised"):
        reversible_steps(fresh.blocks[0].flows, xs, EagerSteps())
    assert not fresh.actnorm_initialized()
    outputs = rev(x)
    actnorm = rev.blocks[0].flows[1].actnorm
    loc = actnorm.loc.detach().clone()
    actnorm.initialized.fill_(0)  # e.g. a state_dict loaded between forward and backward
    actnorm._ready = False
    with pytest.raises(RuntimeError, match="reversible backward recomputation"):
        _loss(outputs).backward()
    assert torch.equal(actnorm.loc, loc) and actnorm.initialized.item() == 0


def test_autocast_state_is_replayed_in_the_recomputation():
    _, rev, x = _pair(n_flow=2, n_block=1, size=8)
    rev.float()
    dtypes = []
    rev.blocks[0].flows[0].coupling.net[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_p, logdet, _ = rev(x.float())
    (log_p + logdet).sum().backward()
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # forward, then the recomputation in backward


def test_bad_arguments_are_refused():
    _, rev, x = _pair(n_flow=2, n_block=1, size=8)
    flows, xs = rev.blocks[0].flows, fastglow.reference.squeeze2d(x).requires_grad_()

    class ShapeChangingSteps(EagerSteps):
        def forward(self, steps, v):
            y, logdet = super().forward(steps, v)
            return y[:, :4], logdet

    with pytest.raises(ValueError, match="at least one step"):
        reversible_steps([], xs, EagerSteps())
    with pytest.raises(TypeError, match="nn.Module"):
        reversible_steps([lambda v: v], xs, EagerSteps())
    with pytest.raises(TypeError, match="callables"):
        reversible_steps(flows, xs, None)
    with pytest.raises(ValueError, match="same shape"):
        reversible_steps(flows[:1], xs, ShapeChangingSteps())


def _tiny_pair(backend, reversible=True):
    """(plain, reversible) at K=2: L=3 on the eager backend (a middle level, whose input is a split level's
    output), L=2 on Triton (a third level's 48-channel LU weights cost the interpreter more than the rest of
    these tests together)."""
    kwargs = dict(hidden_channels=8, backend=backend)
    n_block = 3 if backend == "eager" else 2
    x, (plain, rev) = models_on_one_state([partial(fastglow.Glow, 3, 2, n_block, reversible=False, **kwargs),
                                           partial(fastglow.Glow, 3, 2, n_block, reversible=reversible, **kwargs)],
                                          (2, 3, 8, 8), sigma=0.2)
    return plain, rev, x


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_functional_call_with_other_parameters_gives_their_gradients(backend):
    """Backward (inversion included) must use the parameters forward was called with, not the module's."""
    plain, rev, x = _tiny_pair(backend)
    gen = torch.Generator().manual_seed(3)
    params = {n: (p + 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype, device="cpu").to(p.device))
              .detach().requires_grad_()
              for n, p in plain.named_parameters()}
    grads = []
    for model in (plain, rev):
        outputs = torch.func.functional_call(model, params, (x,))
        grads.append(torch.autograd.grad(_loss(outputs), list(params.values())))
    for name, a, b in zip(params, *grads):
        assert rel_error(b, a) <= 1e-9, name


def _emulate_data_parallel_replica(module):
    """What nn.DataParallel's replicate does to a module on each GPU, on CPU: every parameter becomes a
    plain non-leaf attribute of the replica (listed in _former_parameters); replica.parameters() is empty."""
    modules = list(module.modules())
    replicas = {id(m): m._replicate_for_data_parallel() for m in modules}
    for m in modules:
        r = replicas[id(m)]
        r._former_parameters = {}
        for name, child in m._modules.items():
            r._modules[name] = replicas[id(child)]
        for name, p in m._parameters.items():
            setattr(r, name, p.view_as(p))
            r._former_parameters[name] = getattr(r, name)
    return replicas[id(module)]


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_data_parallel_replicas_get_every_gradient(backend):
    plain, rev, x = _tiny_pair(backend)
    replica = _emulate_data_parallel_replica(rev)
    assert list(replica.parameters()) == []
    _loss(replica(x)).backward()
    _loss(plain(x)).backward()
    for (name, p), q in zip(rev.named_parameters(), plain.parameters()):
        assert p.grad is not None, name
        assert rel_error(p.grad, q.grad) <= 1e-9, name


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("frozen", ["coupling.net.4.scale", "coupling.", "actnorm.scale|invconv."])
def test_frozen_parameter_groups(backend, frozen):
    plain, rev, x = _tiny_pair(backend)
    for model in (plain, rev):
        for name, p in model.named_parameters():
            p.requires_grad_(not any(f in name for f in frozen.split("|")))
    _loss(rev(x)).backward()
    _loss(plain(x)).backward()
    for (name, p), q in zip(rev.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert rel_error(p.grad, q.grad) <= 1e-9, name
