"""Constant-memory backprop through a sequence of invertible steps (a Glow level's K flow steps).

Plain autograd keeps every step's activations for backward: memory grows as O(K). Here the forward runs the
steps under ``no_grad`` and keeps only the level's input x_0 and output x_K (and the parameters, alive anyway).
Backward walks the steps from last to first. For step k, x_{k+1} = f_k(x_k; θ_k) with log-determinant ld_k:

    x_k               = f_k⁻¹(x_{k+1})           reconstruct (for k = 0 the stored x_0 is used instead)
    x'_{k+1}, ld_k    = f_k(x_k; θ_k)            recompute with grad, on detached leaves x_k and θ_k
    g_k, ∂L/∂θ_k      = vjp of (x'_{k+1}, ld_k) with (g_{k+1}, ∂L/∂logdet)   one torch.autograd.grad

where g_k = ∂L/∂x_k; step k's graph is freed before step k-1 starts, so activation memory is one step's
worth, flat in K. logdet = Σ_k ld_k, so every step receives the same ∂L/∂logdet.

What is kept: the level output x_K costs nothing, the split's kept half and latent are views of it (measured in
tests/test_reversible.py through saved-tensor hooks); x_0 is the squeezed copy of the level's input, one
level-input-sized tensor per level (under 2 images' worth over all levels), independent of K.

Reconstruction error: x_k is rebuilt through K-1-k inverses and is exact only up to rounding. It never crosses a
level: each level starts from its own stored output, and its first step is recomputed from the stored x_0
rather than from a reconstruction (no re-anchoring inside a level). Only the level's own gradients see rebuilt
inputs.

Backend-agnostic: the steps run only through a backend object (:mod:`fastglow.backends`):
``forward(steps, x) -> (y, logdet [B])`` and ``inverse(steps, y) -> x``, plus an optional fused
``backward_from_output(steps, y, grad_y, grad_logdet, x0)`` that replaces the whole loop of inversions and
recomputations (the Triton backend has one). Double backward is not supported.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Sequence

import torch
from torch import nn

from .reference import ActNorm

_N_NON_PARAM_INPUTS = 4  # x, steps, sizes, backend precede the parameters in apply()


def reversible_steps(steps: Sequence[nn.Module], x: torch.Tensor, backend):
    """Same result as ``backend.forward(steps, x)`` (plain autograd keeps every step's activations); backward
    rebuilds activations by inversion (memory flat in K).

    Without anything to differentiate (``torch.no_grad()``, inference mode, nothing requires grad) it is
    ``backend.forward`` and saves nothing.
    """
    steps = list(steps)
    _check_arguments(steps, x, backend)
    params_per_step = [[t for _, _, t in parameter_slots(step)] for step in steps]
    params = [p for step_params in params_per_step for p in step_params]
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return backend.forward(steps, x)
    _require_initialized(steps, "forward")
    sizes = tuple(len(step_params) for step_params in params_per_step)
    return ReversibleSteps.apply(x, steps, sizes, backend, *params)


class ReversibleSteps(torch.autograd.Function):
    """autograd node for a whole level: inputs (x, steps, sizes, backend, *params),
    outputs (y, logdet [B]). ``params`` are the steps' parameters in ``step.parameters()`` order, ``sizes[k]``
    of them for step k; they are explicit inputs so autograd accumulates their gradients into ``.grad``.

    Backward returns all the level's parameter gradients at once (autograd's contract), so it holds them until
    it returns: parameter-sized, independent of batch and image size (autograd adopts them as ``.grad`` when
    that is ``None``, as after ``zero_grad()``, else adds them in place).
    """

    @staticmethod
    def forward(ctx, x, steps, sizes, backend, *params):
        y, logdet = backend.forward(steps, x)  # Function.forward runs under no_grad: nothing kept
        if y.shape != x.shape or logdet.shape != (x.shape[0],):
            raise ValueError(f"backend.forward must map x {tuple(x.shape)} to (y of the same shape, logdet of "
                             f"shape ({x.shape[0]},)); got {tuple(y.shape)} and {tuple(logdet.shape)}")
        ctx.steps, ctx.sizes = steps, sizes
        ctx.backend = backend
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, y, *params)  # y: the split's kept half and latent are views of it
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        if torch.is_grad_enabled():
            raise RuntimeError("reversible backprop is once-differentiable: double backward "
                               "(create_graph=True) is not supported; use reversible=False for it")
        x0, y, *params = ctx.saved_tensors
        needs_param_grad = ctx.needs_input_grad[_N_NON_PARAM_INPUTS:]
        ends = list(itertools.accumulate(ctx.sizes))
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        grad = grad_y
        if ctx.backend.backward_from_output is not None:
            grad, param_grads = fused_level_backward(ctx, params, needs_param_grad, x0, y, grad_y, grad_logdet)
            return (grad, None, None, None, *param_grads)
        with _autocast(ctx.autocast):
            for k in reversed(range(len(ctx.steps))):
                step, lo, hi = ctx.steps[k], ends[k] - ctx.sizes[k], ends[k]
                need_input_grad = k > 0 or ctx.needs_input_grad[0]
                if k == 0:
                    x = x0
                else:  # reconstruct x_k = f_k^-1(x_{k+1}) with the parameters forward saw
                    with _bound_parameters(step, [p.detach() for p in params[lo:hi]]):
                        x = ctx.backend.inverse([step], y)
                y = None  # free step k's output before recomputing it (the level output stays saved in ctx)
                grad, param_grads[lo:hi] = recompute_step_backward(
                    step, params[lo:hi], needs_param_grad[lo:hi], x, grad, grad_logdet,
                    need_input_grad=need_input_grad, backend=ctx.backend)
                y = x
        return (grad, None, None, None, *param_grads)


def recompute_step_backward(step, params, needs_param_grad, x, grad_y, grad_logdet, *, need_input_grad, backend):
    """Vector-Jacobian product of one step at its input x: -> (∂L/∂x or None, [∂L/∂θ or None, ...]).

    Recomputes (y, ld) = f(x; θ) with grad on detached leaves and runs one ``torch.autograd.grad``; the step's
    graph is freed on return. A backend's ``backward_from_output`` replaces this and the inversion before it
    with one fused pass.
    """
    _require_initialized([step], "backward recomputation")
    x_leaf = x.detach().requires_grad_(need_input_grad)
    leaves = [p.detach().requires_grad_(need) for p, need in zip(params, needs_param_grad)]
    with torch.enable_grad(), _bound_parameters(step, leaves):
        y, logdet = backend.forward([step], x_leaf)
    outputs = [(t, g) for t, g in ((y, grad_y), (logdet, grad_logdet)) if t.requires_grad]
    wrt = [t for t in (x_leaf, *leaves) if t.requires_grad]
    grads = iter(torch.autograd.grad([t for t, _ in outputs], wrt, [g for _, g in outputs], allow_unused=True)
                 if outputs and wrt else [None] * len(wrt))
    grad_x = next(grads) if need_input_grad else None
    return grad_x, [next(grads) if need else None for need in needs_param_grad]


def fused_level_backward(ctx, params, needs_param_grad, x0, y, grad_y, grad_logdet):
    """The level's backward through a backend's fused ``backward_from_output``:
    -> (∂L/∂x, [∂L/∂θ per parameter])."""
    _require_initialized(ctx.steps, "backward recomputation")
    leaves = [p.detach().requires_grad_(need) for p, need in zip(params, needs_param_grad)]
    ends = list(itertools.accumulate(ctx.sizes))
    with contextlib.ExitStack() as stack, _autocast(ctx.autocast):
        for step, end, size in zip(ctx.steps, ends, ctx.sizes):
            stack.enter_context(_bound_parameters(step, leaves[end - size:end]))
        grad_x, grads_per_step = ctx.backend.backward_from_output(ctx.steps, y, grad_y, grad_logdet, x0)
    grads = [g for step_grads in grads_per_step for g in step_grads]
    return grad_x, [g if need else None for g, need in zip(grads, needs_param_grad)]


@contextlib.contextmanager
def _bound_parameters(step: nn.Module, tensors: Sequence[torch.Tensor]):
    """Inside the block ``step``'s parameters (``step.parameters()`` order) are ``tensors``, so the
    recomputation uses exactly the values forward saw (also under ``torch.func.functional_call``) and
    ``torch.autograd.grad`` can differentiate with respect to them."""
    slots = parameter_slots(step)
    if len(slots) != len(tensors):
        raise RuntimeError(f"a step's parameters changed between forward and backward "
                           f"({len(tensors)} then {len(slots)})")
    for (module, name, _), tensor in zip(slots, tensors):
        _set_parameter(module, name, tensor)
    try:
        yield
    finally:
        for module, name, original in slots:
            _set_parameter(module, name, original)


def parameter_slots(step: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(owner, name, tensor) of every parameter of ``step`` in ``step.parameters()`` order. On an
    ``nn.DataParallel`` replica the parameters are plain attributes (listed in ``_former_parameters``)
    and ``step.parameters()`` is empty: the replicated tensors are returned then."""
    slots = []
    for module in step.modules():
        source = module._former_parameters if getattr(module, "_is_replica", False) else module._parameters
        slots += [(module, name, t) for name, t in source.items() if t is not None]
    return slots


def _set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if getattr(module, "_is_replica", False):
        module.__dict__[name] = tensor
        module._former_parameters[name] = tensor
    else:
        module._parameters[name] = tensor


def _require_initialized(steps, where: str) -> None:
    """ActNorm's data-dependent init must see a real batch: never a reconstruction or a recomputation."""
    for step in steps:
        for module in step.modules():
            if isinstance(module, ActNorm) and not module.is_initialized:
                raise RuntimeError(f"an ActNorm is not initialised in the reversible {where}; its "
                                   "data-dependent init must run on a real first batch through the plain "
                                   "path (fastglow.Glow.forward does this), never inside a reversible level")


def _check_arguments(steps, x, backend) -> None:
    if not steps:
        raise ValueError("reversible_steps needs at least one step")
    if not all(isinstance(step, nn.Module) for step in steps):
        raise TypeError("every step must be an nn.Module (its parameters are the Function's inputs)")
    if not (callable(getattr(backend, "forward", None)) and callable(getattr(backend, "inverse", None))):
        raise TypeError("backend must have forward(steps, x) and inverse(steps, y) callables "
                        "(see fastglow.backends)")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating tensor with a leading batch dimension")


def _autocast_state(device_type: str):
    """Forward's autocast state, replayed in backward so the recomputation matches the forward's precision."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def _autocast(state):
    return contextlib.nullcontext() if state is None else torch.autocast(state[0], dtype=state[1])
