"""The backward of a Glow level from its output, written once over a backend's per-step primitives
(:mod:`fastglow.backends`), and the exact replay from its input that stands in when a reconstruction fails.

Step k is x -> mix -> y -> coupling -> out (mix: ActNorm + 1x1 conv folded, y = M x + m; coupling: out_a = y_a,
out_b = combine(y_b, h), h = NN(y_a)). From (out, g = ∂L/∂out), last step first:

    h                     = NN(out_a)                  the step's one network evaluation, with grad
    y, ∂L/∂y, ∂L/∂h       = coupling_backward(out, g, h)      y_b = uncombine(out_b, h) and the combine's vjp
    ∂L/∂y_a, ∂L/∂θ_NN    += vjp of NN with ∂L/∂h       one torch.autograd.grad; the network's graph is freed
    x, ∂L/∂x, ∂L/∂(M, m)  = mix_backward(y, ∂L/∂y)     x = M⁻¹ (y - m) and the mix's vjp

so a step's backward costs one network forward more than plain autograd (4/3 of a plain training step), and
activation memory is one step's network worth, flat in K. The folded maps (M, m) come from ``backend.fold``
with grad, ``backend.fold_group`` steps at a time (eager: 1, so one step's small graph is alive: memory flat in
K; Triton: the whole level, one batched launch each way); one autograd pass per group takes ∂L/∂(M, m) and the
parameter logdet's gradient to the ActNorm and 1x1-conv parameters. logdet = Σ_k ld_k, so every step receives
the same ∂L/∂logdet.

Batch chunks (``chunk=N``): every operation above is per sample except the parameter-gradient sums, so each
step runs on N samples at a time, summing parameter gradients: the network's activations are held for N
samples, beyond them only level-sized tensors. The first step's rebuilt input x̂_0 is compared with the stored
x_0 (:func:`relative_error`).

Parameters are explicit tensors (``slots``: per step, (owner module, name within the step, tensor)); the modules
run with leaves of them through ``torch.func.functional_call`` and every vector-Jacobian product is one
``torch.autograd.grad``, so no module is ever edited. (Inside an op's implementation autograd does not record:
:func:`fastglow.reversible.reversible_level_grad` lets it for this algorithm.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


def parameter_slots(step: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(owner, name within ``step``, tensor) of every parameter of ``step``, in ``step.parameters()`` order."""
    return [(owner, f"{prefix}.{name}" if prefix else name, t)
            for prefix, owner in step.named_modules() for name, t in owner.named_parameters(recurse=False)]


class _Apply(nn.Module):
    """fn(steps, *args) as a module's forward, so torch.func.functional_call can bind the steps' parameters."""

    def __init__(self, steps):
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, fn, *args):
        return fn(list(self.steps), *args)


def call_with(steps, slots, tensors, fn: Callable, *args):
    """fn(steps, *args) with the parameters named in ``slots`` (per step) bound to ``tensors`` (flat, in slot
    order) for the call: ``torch.func.functional_call``, so no module is edited."""
    names = [f"steps.{k}.{name}" for k, step_slots in enumerate(slots) for _, name, _ in step_slots]
    return torch.func.functional_call(_Apply(steps), dict(zip(names, tensors)), (fn, *args))


@dataclass
class LevelGradients:
    """A level's backward: ∂L/∂x, the parameter gradients of each step (``slots`` order, None where a parameter
    receives none) and the rebuilt first-step input's relative error (0-dim; None without x_0)."""
    grad_x: torch.Tensor
    param_grads: list[list[torch.Tensor | None]]
    error: torch.Tensor | None = None


def level_backward(steps, y, grad_y, grad_logdet, backend, x0=None, chunk=None, slots=None) -> LevelGradients:
    """Reversible backward of a level from its output ``y`` (the module docstring's algorithm), each step in
    batch chunks of ``chunk`` samples; ``x0`` (the stored level input) gives the reconstruction error.
    ``slots``: each step's parameters to differentiate (:func:`parameter_slots`, the default).

    The folded maps are built ``backend.fold_group`` steps at a time (None: the whole level at once) under one
    ``torch.autograd.grad``, which takes that group's ∂L/∂(M, m) to its parameters once its steps are done."""
    slots = [parameter_slots(step) for step in steps] if slots is None else slots
    grads = _GradientSums(steps, slots)
    parts = batch_slices(y.shape[0], chunk)
    logdet_grad = None if grad_logdet is None else y.shape[2] * y.shape[3] * grad_logdet.sum()
    group = getattr(backend, "fold_group", None) or len(steps)
    out, grad = y, grad_y
    for end in range(len(steps), 0, -group):
        first = max(0, end - group)
        folded, leaves = _fold_with_leaves(steps[first:end], grads.fold_slots[first:end], backend)
        mixes = []
        for k in reversed(range(first, end)):
            owned = k < len(steps) - 1  # the level's y (the user's latents) and grad_y are not ours to write
            out, grad, mix = _step_backward(steps[k], k, folded[k - first], out, grad, grad_logdet, backend, grads,
                                            parts, owned)
            mixes.append(mix)
        pairs = []
        for f, (grad_weight, grad_bias) in zip(folded, mixes[::-1]):
            pairs += [(f.mix_weight, grad_weight), (f.mix_bias, grad_bias), (f.logdet_per_pixel, logdet_grad)]
        grads.add(grads.fold_slots[first:end], _grad([(t, g) for t, g in pairs if g is not None], leaves))
    return LevelGradients(grad, grads.per_step(), None if x0 is None else relative_error(out, x0))


def _fold_with_leaves(steps, fold_slots, backend):
    """``backend.fold(steps)`` with grad at leaves of the slots' tensors -> (folded maps, the leaves)."""
    leaves = [t.detach().requires_grad_() for t in _tensors(fold_slots)]
    with torch.enable_grad():
        return call_with(steps, fold_slots, leaves, backend.fold), leaves


def _tensors(slots) -> list[torch.Tensor]:
    return [t for step_slots in slots for _, _, t in step_slots]


def _step_backward(step, k, fold, out, grad, grad_logdet, backend, grads, parts, owned):
    """Step k's backward over the batch chunks ``parts``: -> (x, ∂L/∂x, (∂L/∂M, ∂L/∂m)). ``owned``: out and
    grad are this backward's own buffers, which the coupling primitive may overwrite."""
    if len(parts) == 1:
        return _chunk_backward(step, k, fold, out, grad, grad_logdet, backend, grads, owned)
    x, grad_x, mix = out.new_empty(out.shape), grad.new_empty(grad.shape), None
    for part in parts:
        gld = None if grad_logdet is None else grad_logdet[part]
        x[part], grad_x[part], part_mix = _chunk_backward(step, k, fold, out[part], grad[part], gld, backend, grads,
                                                          owned)
        mix = part_mix if mix is None else (mix[0] + part_mix[0], mix[1] + part_mix[1])
    return x, grad_x, mix


def _chunk_backward(step, k, fold, out, grad, grad_logdet, backend, grads, owned):
    """One step's backward on one batch chunk: the network once, the coupling and mix primitives. Where the
    coupling primitive rebuilds out's second half in place (``owned`` and a backend that reuses buffers), the
    network reads a copy of out's first half: its graph holds what it read, and a view would share out's
    version counter. Else it reads a view (no copy of half a step input)."""
    half = out.shape[1] // 2
    net_slots = [grads.net_slots[k]]
    in_place = owned and backend.reuses_buffers
    out_a = (out[:, :half].clone() if in_place else out[:, :half].detach()).requires_grad_()
    leaves = [t.detach().requires_grad_() for t in _tensors(net_slots)]
    with torch.enable_grad():
        net_out = call_with([step], net_slots, leaves, lambda s, v: tuple(backend.coupling_net(s[0].coupling, v)),
                            out_a)
    y, grad_y, grad_net = backend.coupling_backward(out, grad, [t.detach() for t in net_out], grad_logdet,
                                                    step.coupling.affine, reuse=owned)
    grad_a, *net_grads = _grad(list(zip(net_out, grad_net)), [out_a, *leaves])
    if grad_a is not None:
        grad_y[:, :half] += grad_a
    grads.add(net_slots, net_grads)
    x, grad_x, grad_mix_weight, grad_mix_bias = backend.mix_backward(y, grad_y, fold)
    return x, grad_x, (grad_mix_weight, grad_mix_bias)


def _grad(pairs, inputs) -> list[torch.Tensor | None]:
    """One ``torch.autograd.grad`` of the (output, cotangent) pairs that carry grad, into ``inputs``."""
    pairs = [(t, g) for t, g in pairs if t.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return list(torch.autograd.grad([t for t, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True))


class _GradientSums:
    """A level's parameter gradients, summed over batch chunks, keyed by tensor: the coupling networks' from
    their vjp, the ActNorm and 1x1-conv parameters' through the folded maps."""

    def __init__(self, steps, slots):
        self.slots = slots
        is_fold = [[any(m is sub for sub in (*step.actnorm.modules(), *step.invconv.modules())) for m, _, _ in s]
                   for step, s in zip(steps, slots)]
        self.fold_slots = [[sl for sl, f in zip(s, fs) if f] for s, fs in zip(slots, is_fold)]
        self.net_slots = [[sl for sl, f in zip(s, fs) if not f] for s, fs in zip(slots, is_fold)]
        self.by_param: dict[int, torch.Tensor] = {}

    def add(self, slots, grads) -> None:
        for (_, _, p), g in zip([sl for step_slots in slots for sl in step_slots], grads):
            if g is None:
                continue
            if id(p) in self.by_param:
                self.by_param[id(p)] += g
            else:
                self.by_param[id(p)] = g

    def per_step(self) -> list[list[torch.Tensor | None]]:
        return [[self.by_param.get(id(t)) for _, _, t in step_slots] for step_slots in self.slots]


def replay_level_backward(steps, x0, grad_y, grad_logdet, backend, chunk=None, slots=None) -> LevelGradients:
    """Exact level backward from the stored input x_0, per batch chunk: a no-grad forward keeping each step's
    input, then each step recomputed and differentiated (per-step checkpointing's arithmetic)."""
    slots = [parameter_slots(step) for step in steps] if slots is None else slots
    grads = _GradientSums(steps, slots)
    grad_x = grad_y.new_empty(grad_y.shape)
    for part in batch_slices(x0.shape[0], chunk):
        inputs = [x0[part]]
        with torch.no_grad():
            for step, step_slots in zip(steps[:-1], slots):
                inputs.append(_step_forward(step, step_slots, _tensors([step_slots]), inputs[-1], backend)[0])
        grad = grad_y[part]
        for k in reversed(range(len(steps))):
            grad, step_grads = recompute_step_backward(
                steps[k], slots[k], inputs.pop(), grad, None if grad_logdet is None else grad_logdet[part],
                backend=backend)
            grads.add([slots[k]], step_grads)
        grad_x[part] = grad
    return LevelGradients(grad_x, grads.per_step())


def _step_forward(step, step_slots, tensors, x, backend):
    return call_with([step], [step_slots], tensors, lambda s, v: tuple(backend.forward(s, v)), x)


def recompute_step_backward(step, slots, x, grad_y, grad_logdet, *, backend):
    """Vector-Jacobian product of one step at its input x: -> (∂L/∂x, [∂L/∂θ per slot]), recomputing
    (y, ld) = f(x; θ) with grad at leaves of x and of the slots' tensors; the step's graph is freed on return."""
    x_leaf = x.detach().requires_grad_()
    leaves = [t.detach().requires_grad_() for t in _tensors([slots])]
    with torch.enable_grad():
        y, logdet = _step_forward(step, slots, leaves, x_leaf, backend)
    grad_x, *param_grads = _grad([(y, grad_y), (logdet, grad_logdet)], [x_leaf, *leaves])
    return grad_x, param_grads


def relative_error(rebuilt: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """max over samples of ||rebuilt - stored|| / ||stored|| (0-dim, float32; NaN -> inf), no host sync."""
    diff = (rebuilt - stored).flatten(1).norm(dim=1)
    ref = stored.flatten(1).norm(dim=1).clamp_min(torch.finfo(stored.dtype).tiny)
    return torch.nan_to_num((diff / ref).max().float(), nan=math.inf)


def batch_slices(batch: int, chunk: int | None) -> list[slice]:
    """Consecutive slices of ``chunk`` samples covering the batch ([slice(None)] when unchunked)."""
    if not chunk or chunk >= batch:
        return [slice(None)]
    return [slice(start, min(start + chunk, batch)) for start in range(0, batch, chunk)]
