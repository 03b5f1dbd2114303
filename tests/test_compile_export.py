"""fastglow.Glow under torch.compile, torch.export and torch.func: the levels are fastglow:: ops (the
reversible level one op, its autograd formula the reversible backward), so with ``validate=False`` a training
step compiles to one graph (fullgraph=True) and gives the eager numbers; the default ``validate=True`` costs one
graph break (the input's NaN check reads a value)."""

from functools import partial

import pytest
import torch

import fastglow
from fastglow.testing import models_on_one_state, rel_error


def _model(reversible, backend="eager", dtype=torch.float32, validate=False):
    x, (model,) = models_on_one_state(
        [partial(fastglow.Glow, 3, 2, 2, hidden_channels=8, reversible=reversible, backend=backend,
                 validate=validate)], (2, 3, 8, 8), sigma=0.2, dtype=dtype)
    return model, x


def _loss(outputs):
    log_p, logdet, z_outs = outputs
    return -(log_p + logdet).mean() + 0.1 * sum((z ** 3).mean() for z in z_outs)


def _loss_and_grads(fn, model, x):
    model.zero_grad()
    loss = _loss(fn(x))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reversible", [True, False])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_compiled_training_step_is_one_graph_with_the_eager_numbers(reversible, backend):
    """fullgraph=True (a graph break raises); float32, every parameter gradient to 1e-5 relative. The Triton
    backend compiles too (its kernels are opaque ops; on CPU they run under the interpreter)."""
    model, x = _model(reversible, backend)
    loss, grads = _loss_and_grads(model, model, x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    loss_c, grads_c = _loss_and_grads(compiled, model, x)
    assert rel_error(loss_c, loss) <= 1e-5
    for name, g in grads.items():
        assert g.norm() > 0 and rel_error(grads_c[name], g) <= 1e-5, name


@pytest.mark.parametrize("reversible", [True, False])
def test_graph_counts(reversible):
    model, x = _model(reversible)
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    model.validate = True  # the input's NaN/Inf check: one break, where the check reads the data
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (2, 1)
    assert "item" in str(explained.break_reasons[0].reason)


def test_export_of_forward_and_of_sampling_gives_the_eager_numbers():
    model, x = _model(True)
    exported = torch.export.export(model, (x,))
    for got, want in zip(exported.module()(x)[:2], model(x)[:2]):
        assert rel_error(got, want) <= 1e-6
    z = [0.7 * torch.randn_like(t) for t in model(x)[2]]

    class Sampler(torch.nn.Module):
        def __init__(self, glow):
            super().__init__()
            self.glow = glow

        def forward(self, *z_list):
            return self.glow.reverse(list(z_list))

    exported = torch.export.export(Sampler(model), tuple(z))
    assert rel_error(exported.module()(*z), model.reverse(z)) <= 1e-6


def test_validate_false_reaches_reverse_and_sample():
    model, x = _model(False)
    z = [torch.zeros_like(t) for t in model(x)[2]]
    z[0][0, 0, 0, 0] = float("nan")
    assert torch.isnan(model.reverse(z)).any()  # no check reads the latents
    model.validate = True
    with pytest.raises(ValueError, match="NaN"):
        model.reverse(z)


@pytest.mark.parametrize("reversible", [True, False])
def test_torch_func_grad_and_vmap(reversible):
    model, x = _model(reversible, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, v):
        return _loss(torch.func.functional_call(model, p, (v,)))

    grads = torch.func.grad(loss)(params, x)
    _, expected = _loss_and_grads(model, model, x)
    for name, g in expected.items():
        assert rel_error(grads[name], g) <= 1e-10, name
    batches = torch.stack([x, x.flip(0)])
    logdets = torch.func.vmap(lambda v: torch.func.functional_call(model, params, (v,))[1])(batches)
    assert rel_error(logdets[1], model(x.flip(0))[1]) <= 1e-12
    per_batch = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, batches)
    flipped = torch.func.grad(loss)(params, x.flip(0))
    for name in ("blocks.0.flows.0.coupling.net.0.weight", "blocks.1.prior.scale"):
        assert rel_error(per_batch[name][1], flipped[name]) <= 1e-10, name
