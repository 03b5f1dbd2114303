"""Reversible backprop you can trust (fastglow.reversible, fastglow.level_backward): the reconstruction error is
recorded per level without a host sync, an ill-conditioned level falls back to an exact replay (both backends),
batch chunks give the unchunked gradients, the backends' per-step primitives agree, the options are validated,
and the training CLI logs the error."""

import json
from functools import partial

import pytest
import torch

import fastglow
from fastglow import reference
from fastglow.backends import EagerSteps, select_backend
from fastglow.level_backward import level_backward, parameter_slots
from fastglow.testing import level_tensor_mb, measure_step_memory, models_on_one_state, rel_error


pytestmark = pytest.mark.usefixtures("on_device")  # CUDA when there is one, else CPU (Triton: the interpreter)

def _models(backend, dtype=torch.float32, n_flow=4, n_block=2, batch=2, size=8, **options):
    """(plain autograd, reversible with ``options``) on one perturbed state, and x."""
    kwargs = dict(hidden_channels=8, backend=backend)
    x, models = models_on_one_state([partial(fastglow.Glow, 3, n_flow, n_block, reversible=False, **kwargs),
                                     partial(fastglow.Glow, 3, n_flow, n_block, **kwargs, **options)],
                                    (batch, 3, size, size), sigma=0.2, dtype=dtype)
    return (*models, x)


def _gradients(model, x):
    """(∂L/∂x, [∂L/∂θ]) of a loss involving log_p, logdet and every latent, with fixed weights."""
    xi = x.clone().requires_grad_()
    log_p, logdet, z_outs = model(xi)
    gen = torch.Generator().manual_seed(1)
    loss = -(log_p + logdet).mean() / 100 + sum(
        (torch.randn(z.shape, generator=gen, dtype=z.dtype, device="cpu").to(z.device) * z).sum() for z in z_outs)
    loss.backward()
    return [xi.grad] + [p.grad for p in model.parameters()]


def _shrink_coupling_scales_(model, level=0, step=2, log_s=-16.0):
    """Push one coupling's scales s = sigmoid(log_s + 2) to ~1e-6 through a large negative bias of its network's
    log-scale outputs: the step stays invertible in exact arithmetic, its float32 inverse loses the input."""
    zero_conv = model.blocks[level].flows[step].coupling.net[4]
    half = zero_conv.conv.bias.shape[0] // 2
    with torch.no_grad():
        zero_conv.conv.bias[:half] += log_s / torch.exp(3 * zero_conv.scale.reshape(-1)[:half])


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("chunk", [None, 1])
def test_ill_conditioned_level_falls_back_to_exact_gradients(backend, chunk):
    plain, checked, x = _models(backend, backward_chunk=chunk)
    unchecked = fastglow.Glow(3, 4, 2, hidden_channels=8, backend=backend, reversible_tol=None)
    unchecked.load_state_dict(plain.state_dict())
    for model in (plain, checked, unchecked):
        _shrink_coupling_scales_(model)
    expected = _gradients(plain, x)
    assert all(torch.isfinite(g).all() for g in expected)  # plain autograd is fine on this model

    silent = _gradients(unchecked, x)
    assert unchecked.reconstruction_fallbacks == 0
    assert not unchecked.reconstruction_error()[0] <= 1e-2  # level 0 rebuilds its input badly ...
    assert max(rel_error(a, b) for a, b in zip(silent, expected)) > 1e-2  # ... and its gradients are wrong

    with pytest.warns(RuntimeWarning, match="level 0.*recomputed exactly"):
        got = _gradients(checked, x)
    assert checked.reconstruction_fallbacks == 1  # level 0 only: level 1 is healthy
    errors = checked.reconstruction_error()
    assert errors[0] > 1e-2 and errors[1] < 1e-5
    for a, b in zip(got, expected):
        assert rel_error(a, b) <= 1e-4


def test_reconstruction_error_is_recorded_per_level_without_a_host_sync(monkeypatch):
    plain, rev, x = _models("eager", torch.float64, n_block=3, size=16, batch=4)
    quiet = fastglow.Glow(3, 4, 3, hidden_channels=8, backend="eager", reversible_tol=None).double()
    quiet.load_state_dict(plain.state_dict())
    assert rev.reconstruction_error().isnan().all() and plain.reconstruction_error().shape == (3,)
    with torch.no_grad():
        rev(x), quiet(x)  # ActNorm reads its loaded `initialized` buffer once (then caches it)
    items = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: items.append(t.shape) or real_item(t))
    _gradients(rev, x)
    assert len(items) == 3  # the tolerance check: one host read per level, nothing else
    items.clear()
    _gradients(quiet, x)
    assert items == []  # no check: no host sync at all ...
    for model in (rev, quiet):  # ... and the errors are recorded all the same
        errors = model.reconstruction_error()
        assert errors.shape == (3,) and (errors < 1e-12).all() and model.reconstruction_fallbacks == 0
    _gradients(plain, x)
    assert plain.reconstruction_error().isnan().all()  # plain autograd rebuilds nothing


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_backward_chunks_give_the_unchunked_gradients(backend):
    plain, whole, x = _models(backend, torch.float64, batch=5)
    chunked = fastglow.Glow(3, 4, 2, hidden_channels=8, backend=backend, backward_chunk=2).double()
    chunked.load_state_dict(plain.state_dict())
    outputs = [model(x) for model in (whole, chunked)]
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-12, atol=0)
    expected, got = _gradients(whole, x), _gradients(chunked, x)
    for a, b in zip(got, expected):
        assert rel_error(a, b) <= 1e-12
    for a, b in zip(got, _gradients(plain, x)):
        assert rel_error(a, b) <= 1e-9
    assert (chunked.reconstruction_error() < 1e-12).all()


def test_peak_memory_with_backward_chunks_grows_with_the_batch_by_level_tensors_only():
    """Peak RSS of a training step (fresh subprocesses): with chunks of 2, batch 32 needs no more than batch 8
    unchunked plus a few level-sized tensors (one tensor per level: 0.66 MB here); unchunked it grows ~4x."""
    config = dict(hidden_channels=64, n_block=3, img_size=32)
    mb = {(batch, chunk): measure_step_memory(4, "reversible", backward_chunk=chunk, batch=batch, **config)["step_mb"]
          for batch in (8, 32) for chunk in (None, 2)}
    level = level_tensor_mb(32, in_channel=3, **config)
    assert mb[32, 2] <= mb[8, None] + 3 * level, mb
    assert mb[32, 2] - mb[8, 2] <= 6 * level < (mb[32, None] - mb[8, None]) / 2, mb


def test_backends_per_step_primitives_agree():
    """The Triton primitives (fused kernels) against the eager ones (reference maths), float64."""
    _, rev, x = _models("eager", torch.float64, n_flow=2, n_block=1)
    flows = rev.blocks[0].flows
    eager, triton = EagerSteps(), select_backend("triton", x)
    xs = reference.squeeze2d(x)
    y, _ = eager.forward(flows, xs)
    grad_y, grad_logdet = torch.randn_like(y), torch.randn(y.shape[0], dtype=y.dtype)
    for fold_e, fold_t in zip(eager.fold(flows), triton.fold(flows)):
        for name in ("mix_weight", "mix_bias", "mix_weight_inv", "mix_bias_inv", "logdet_per_pixel"):
            assert rel_error(getattr(fold_t, name), getattr(fold_e, name)) <= 1e-12, name
    coupling = flows[1].coupling
    net_e, net_t = (backend.coupling_net(coupling, y[:, :6]) for backend in (eager, triton))
    assert all(rel_error(t, e) <= 1e-12 for t, e in zip(net_t, net_e))  # (h_raw, zscale), h = h_raw e^(3 zs)
    rebuilt_e, grad_e, grad_net_e = eager.coupling_backward(y, grad_y, net_e, grad_logdet, True)
    rebuilt_t, grad_t, grad_net_t = triton.coupling_backward(y, grad_y, net_t, grad_logdet, True)
    assert rel_error(rebuilt_t, rebuilt_e) <= 1e-12 and rel_error(grad_t, grad_e) <= 1e-12
    assert len(grad_net_t) == len(grad_net_e) == 2  # d h_raw, d zscale
    assert all(rel_error(t, e) <= 1e-12 for t, e in zip(grad_net_t, grad_net_e))
    (fold,) = eager.fold(flows[1:])
    for a, b in zip(triton.mix_backward(rebuilt_e, grad_e, fold), eager.mix_backward(rebuilt_e, grad_e, fold)):
        assert rel_error(a, b) <= 1e-12
    for backend in (eager, triton):  # and one algorithm over either gives plain autograd's gradients
        xi = xs.clone().requires_grad_()
        out, logdet = eager.forward(flows, xi)
        expected = torch.autograd.grad([out, logdet], [xi, *flows.parameters()], [grad_y, grad_logdet])
        result = level_backward(list(flows), out.detach(), grad_y, grad_logdet, backend, x0=xs)
        got = [result.grad_x] + [g for step in result.param_grads for g in step]
        assert len(got) == len(expected) and result.error < 1e-13
        for a, b in zip(got, expected):
            assert rel_error(a, b) <= 1e-10


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(reversible_tol=-1e-3), ValueError, "reversible_tol"),
    (dict(reversible_tol=float("nan")), ValueError, "reversible_tol"),
    (dict(reversible_tol="exact"), TypeError, "reversible_tol"),
    (dict(reversible_tol=True), TypeError, "reversible_tol"),
    (dict(backward_chunk=0), ValueError, "backward_chunk"),
    (dict(backward_chunk=2.0), TypeError, "backward_chunk"),
    (dict(backward_chunk=True), TypeError, "backward_chunk"),
])
def test_reversible_options_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastglow.Glow(3, 2, 2, hidden_channels=8, **kwargs)


def test_state_dict_keys_do_not_change_with_the_options():
    keys = fastglow.Glow(3, 2, 2, hidden_channels=8).state_dict().keys()
    assert fastglow.Glow(3, 2, 2, hidden_channels=8, reversible_tol=None, backward_chunk=3).state_dict().keys() == keys
    assert not any("reconstruction" in key for key in keys)


def test_slots_layout_matches_parameters_order():
    flow = fastglow.Glow(3, 1, 1, hidden_channels=8).blocks[0].flows[0]
    assert [t for _, _, t in parameter_slots(flow)] == list(flow.parameters())


def test_training_cli_logs_reconstruction_error(tmp_path):
    from fastglow.app.loop import train
    summary = train(dict(out=str(tmp_path / "run"), n_flow=2, n_block=2, hidden=8, batch=16, warmup=2,
                         cooldown=0, eval_every=0, progress=False, steps=2, log_every=1, ckpt_every=0))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trains = [line for line in lines if line["event"] == "train"]
    assert summary["step"] == 2 and len(trains) == 2
    for line in trains:
        errors = line["reconstruction_error"]
        assert len(errors) == 2 and all(0 <= e < 1e-3 for e in errors)
        assert line["reconstruction_fallbacks"] == 0
