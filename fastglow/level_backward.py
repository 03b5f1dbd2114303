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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


def parameter_slots(step: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(owner, name, tensor) of every parameter of ``step`` in ``step.parameters()`` order. On an
    ``nn.DataParallel`` replica the parameters are plain attributes (listed in ``_former_parameters``)
    and ``step.parameters()`` is empty: the replicated tensors are returned then."""
    slots = []
    for module in step.modules():
        source = module._former_parameters if getattr(module, "_is_replica", False) else module._parameters
        slots += [(module, name, t) for name, t in source.items() if t is not None]
    return slots


@dataclass
class LevelGradients:
    """A level's backward: ∂L/∂x, the parameter gradients of each step (``parameter_slots`` order, None where a
    parameter needs none) and the rebuilt first-step input's relative error (0-dim; None without x_0)."""
    grad_x: torch.Tensor
    param_grads: list[list[torch.Tensor | None]]
    error: torch.Tensor | None = None


def level_backward(steps, y, grad_y, grad_logdet, backend, x0=None, chunk=None, slots=None) -> LevelGradients:
    """Reversible backward of a level from its output ``y`` (the module docstring's algorithm), each step in
    batch chunks of ``chunk`` samples; ``x0`` (the stored level input) gives the reconstruction error.
    ``slots``: each step's ``parameter_slots`` (the tensors to differentiate), computed here when not given.

    The folded maps are built ``backend.fold_group`` steps at a time (None: the whole level at once) with grad,
    and differentiated once that group's steps are done."""
    slots = [parameter_slots(step) for step in steps] if slots is None else slots
    grads = _GradientSums(steps, slots)
    parts = batch_slices(y.shape[0], chunk)
    logdet_grad = None if grad_logdet is None else y.shape[2] * y.shape[3] * grad_logdet.sum()
    group = getattr(backend, "fold_group", None) or len(steps)
    out, grad = y, grad_y
    for end in range(len(steps), 0, -group):
        first = max(0, end - group)
        with torch.enable_grad():
            folded = backend.fold(steps[first:end])
        mixes = []
        for k in reversed(range(first, end)):
            owned = k < len(steps) - 1  # the level's y (the user's latents) and grad_y are not ours to write
            out, grad, mix = _step_backward(steps[k], folded[k - first], out, grad, grad_logdet, backend,
                                            grads.net_params[k], grads, parts, owned)
            mixes.append(mix)
        grads.fold_backward(folded, mixes[::-1], grads.fold_params[first:end], logdet_grad)
    return LevelGradients(grad, grads.per_step(), None if x0 is None else relative_error(out, x0))


def _step_backward(step, fold, out, grad, grad_logdet, backend, net_params, grads, parts, owned):
    """One step's backward over the batch chunks ``parts``: -> (x, ∂L/∂x, (∂L/∂M, ∂L/∂m)). ``owned``: out and
    grad are this backward's own buffers, which the coupling primitive may overwrite."""
    if len(parts) == 1:
        return _chunk_backward(step, fold, out, grad, grad_logdet, backend, net_params, grads, owned)
    x, grad_x, mix = out.new_empty(out.shape), grad.new_empty(grad.shape), None
    for part in parts:
        gld = None if grad_logdet is None else grad_logdet[part]
        x[part], grad_x[part], part_mix = _chunk_backward(step, fold, out[part], grad[part], gld, backend,
                                                          net_params, grads, owned)
        mix = part_mix if mix is None else (mix[0] + part_mix[0], mix[1] + part_mix[1])
    return x, grad_x, mix


def _chunk_backward(step, fold, out, grad, grad_logdet, backend, net_params, grads, owned):
    """One step's backward on one batch chunk: the network once, the coupling and mix primitives."""
    half = out.shape[1] // 2
    with torch.enable_grad():
        out_a = _first_half_leaf(out, half)
        net_out = backend.coupling_net(step.coupling, out_a)
    y, grad_y, grad_net = backend.coupling_backward(out, grad, [t.detach() for t in net_out], grad_logdet,
                                                    step.coupling.affine, reuse=owned)
    pairs = [(t, g) for t, g in zip(net_out, grad_net) if t.requires_grad]
    net_grads = torch.autograd.grad([t for t, _ in pairs], [out_a, *net_params], [g for _, g in pairs],
                                    allow_unused=True)
    grad_y[:, :half] += net_grads[0]
    grads.add(net_params, net_grads[1:])
    x, grad_x, grad_mix_weight, grad_mix_bias = backend.mix_backward(y, grad_y, fold)
    return x, grad_x, (grad_mix_weight, grad_mix_bias)


def _first_half_leaf(out: torch.Tensor, half: int) -> torch.Tensor:
    """out[:, :half] as a leaf that requires grad, on out's memory but with a version counter of its own: the
    coupling primitive may rewrite out's second half in place (``reuse``) while the network's graph holds this
    half, which nothing writes. (A view would share out's counter and fail autograd's saved-tensor check.)"""
    with torch.no_grad():
        view = out[:, :half]
        leaf = out.new_empty(0).set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())
    return leaf.requires_grad_()


class _GradientSums:
    """A level's parameter gradients, summed over batch chunks, keyed by tensor: the coupling networks' from
    their vjp, the ActNorm and 1x1-conv parameters' through the folded maps (:meth:`fold_backward`)."""

    def __init__(self, steps, slots):
        self.slots = slots
        is_fold = [[m is step.actnorm or m is step.invconv for m, _, _ in step_slots]
                   for step, step_slots in zip(steps, slots)]
        self.fold_params = [[t for (_, _, t), f in zip(s, fs) if f and t.requires_grad]
                            for s, fs in zip(slots, is_fold)]
        self.net_params = [[t for (_, _, t), f in zip(s, fs) if not f and t.requires_grad]
                           for s, fs in zip(slots, is_fold)]
        self.by_param: dict[int, torch.Tensor] = {}

    def add(self, params, grads) -> None:
        for p, g in zip(params, grads):
            if g is None:
                continue
            if id(p) in self.by_param:
                self.by_param[id(p)] += g
            else:
                self.by_param[id(p)] = g

    def fold_backward(self, folded, mixes, fold_params, logdet_grad) -> None:
        """One autograd pass through a group's folding: (∂L/∂M, ∂L/∂m) per step and ∂L/∂logdet-per-pixel ->
        the group's ActNorm and 1x1-conv parameters."""
        params = [p for step_params in fold_params for p in step_params]
        pairs = []
        for fold, (grad_weight, grad_bias) in zip(folded, mixes):
            pairs += [(fold.mix_weight, grad_weight), (fold.mix_bias, grad_bias)]
            if logdet_grad is not None:
                pairs.append((fold.logdet_per_pixel, logdet_grad))
        pairs = [(t, g) for t, g in pairs if t.requires_grad]
        if params and pairs:
            self.add(params, torch.autograd.grad([t for t, _ in pairs], params, [g for _, g in pairs],
                                                 allow_unused=True))

    def per_step(self) -> list[list[torch.Tensor | None]]:
        return [[self.by_param.get(id(t)) for _, _, t in step_slots] for step_slots in self.slots]


def replay_level_backward(steps, x0, grad_y, grad_logdet, backend, chunk=None, slots=None) -> LevelGradients:
    """Exact level backward from the stored input x_0, per batch chunk: a no-grad forward keeping each step's
    input, then each step recomputed with grad and differentiated (per-step checkpointing's arithmetic)."""
    slots = [parameter_slots(step) for step in steps] if slots is None else slots
    grads = _GradientSums(steps, slots)
    grad_x = grad_y.new_empty(grad_y.shape)
    for part in batch_slices(x0.shape[0], chunk):
        inputs = [x0[part]]
        with torch.no_grad():
            for step in steps[:-1]:
                inputs.append(backend.forward([step], inputs[-1])[0])
        grad = grad_y[part]
        for k in reversed(range(len(steps))):
            params = [t for _, _, t in slots[k]]
            grad, step_grads = recompute_step_backward(
                steps[k], slots[k], inputs.pop(), grad, None if grad_logdet is None else grad_logdet[part],
                need_input_grad=True, backend=backend)
            grads.add(params, step_grads)
        grad_x[part] = grad
    return LevelGradients(grad_x, grads.per_step())


def recompute_step_backward(step, slots, x, grad_y, grad_logdet, *, need_input_grad, backend):
    """Vector-Jacobian product of one step at its input x: -> (∂L/∂x or None, [∂L/∂θ or None per slot]).

    Recomputes (y, ld) = f(x; θ) with grad on detached leaves of the tensors in ``slots`` and runs one
    ``torch.autograd.grad``; the step's graph is freed on return.
    """
    x_leaf = x.detach().requires_grad_(need_input_grad)
    leaves = [(m, n, t.detach().requires_grad_(t.requires_grad)) for m, n, t in slots]
    with torch.enable_grad(), bound_parameters(leaves):
        y, logdet = backend.forward([step], x_leaf)
    outputs = [(t, g) for t, g in ((y, grad_y), (logdet, grad_logdet)) if t.requires_grad and g is not None]
    wrt = [t for t in (x_leaf, *(leaf for _, _, leaf in leaves)) if t.requires_grad]
    grads = iter(torch.autograd.grad([t for t, _ in outputs], wrt, [g for _, g in outputs], allow_unused=True)
                 if outputs and wrt else [None] * len(wrt))
    grad_x = next(grads) if need_input_grad else None
    return grad_x, [next(grads) if leaf.requires_grad else None for _, _, leaf in leaves]


class bound_parameters:  # noqa: N801 (a context manager, used like a function)
    """Inside the block every (module, name) of ``slots`` holds the slot's tensor (restored on exit), so a
    recomputation uses exactly the values forward saw (also under ``torch.func.functional_call``) and
    ``torch.autograd.grad`` can differentiate with respect to them."""

    def __init__(self, slots: Sequence[tuple[nn.Module, str, torch.Tensor]]):
        self.slots = slots
        self.originals: list[torch.Tensor] = []

    def __enter__(self):
        self.originals = [_get_parameter(module, name) for module, name, _ in self.slots]
        for module, name, tensor in self.slots:
            _set_parameter(module, name, tensor)

    def __exit__(self, *exc):
        for (module, name, _), original in zip(self.slots, self.originals):
            _set_parameter(module, name, original)


def _get_parameter(module: nn.Module, name: str) -> torch.Tensor:
    return module.__dict__[name] if getattr(module, "_is_replica", False) else module._parameters[name]


def _set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if getattr(module, "_is_replica", False):
        module.__dict__[name] = tensor
        module._former_parameters[name] = tensor
    else:
        module._parameters[name] = tensor


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
