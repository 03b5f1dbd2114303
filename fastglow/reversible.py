"""Constant-memory backprop through a Glow level's K flow steps, and how far to trust it.

Plain autograd keeps every step's activations for backward: memory grows as O(K). Here the forward runs the
steps under ``no_grad`` and keeps only the level's input x_0 and output x_K (and the parameters, alive anyway);
backward rebuilds the activations from x_K, running each coupling network once
(:func:`fastglow.level_backward.level_backward`, one algorithm for every backend): memory flat in K, one network
forward more than plain autograd. ``chunk=N`` runs the no-grad forward and the backward N samples at a time.

Trust (exploding inverses, Behrmann et al. 2021: coupling scales near 0 amplify rounding in the inverse): the
first step's rebuilt input x̂_0 is compared with the stored x_0 for free; the level's error,
max over samples of ||x̂_0 - x_0|| / ||x_0|| (NaN counts as infinite), is recorded on the device without a
host sync (:class:`ReconstructionMonitor`). With a tolerance, it is read on the host once per level (the one
host sync of the reversible backward) and, above it, the level's gradients are recomputed exactly from x_0
(:func:`fastglow.level_backward.replay_level_backward`, per-step checkpointing's arithmetic), counted and warned
about: never a silently wrong gradient. Below it, the gradients are the exact gradients at a level input within
that relative distance (not necessarily within it elementwise: ReLU kinks make gradients discontinuous).
``tol=None`` skips the check: no host sync at all (e.g. for CUDA-graph capture); the errors are still recorded.

What is kept: the level output x_K costs nothing, the split's kept half and latent are views of it (measured in
tests/test_reversible.py through saved-tensor hooks); x_0 is the squeezed copy of the level's input, one
level-input-sized tensor per level (under 2 images' worth over all levels), independent of K.
Double backward is not supported."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .level_backward import (batch_slices, bound_parameters, level_backward, parameter_slots,
                             replay_level_backward)
from .reference import ActNorm

# reversible_tol="auto": the square root of the level dtype's machine epsilon, half its digits (float32: 3.5e-4,
# float64: 1.5e-8). Measured (benchmarks/RESULTS.md, "Reconstruction error"): healthy float32 models rebuild their
# level inputs to 1e-6..3e-5 (K=8..32), a 12x margin; failing inversions measure 1e-2..inf.


@dataclass(frozen=True)
class ReversibleOptions:
    """How a reversible level runs its backward: ``tol`` on the rebuilt input's relative error ("auto", a number,
    or None: no check, no host sync), ``chunk`` samples at a time (None: the whole batch), and where to record
    the error."""
    tol: float | str | None = "auto"
    chunk: int | None = None
    monitor: "ReconstructionMonitor | None" = None
    level: int = 0

    def tolerance(self, dtype: torch.dtype) -> float | None:
        return math.sqrt(torch.finfo(dtype).eps) if self.tol == "auto" else self.tol


def check_reversible_options(tol, chunk) -> None:
    """``reversible_tol``: "auto", a non-negative finite number or None; ``backward_chunk``: a positive int or
    None."""
    if tol is not None and not (isinstance(tol, str) and tol == "auto"):
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
            raise TypeError(f"reversible_tol must be 'auto', a number or None, got {tol!r}")
        if not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"reversible_tol must be a finite number >= 0, got {tol!r}")
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral):
            raise TypeError(f"backward_chunk must be an int or None, got {type(chunk).__name__}")
        if chunk < 1:
            raise ValueError(f"backward_chunk must be >= 1, got {chunk}")


class ReconstructionMonitor:
    """Per-level relative reconstruction error of the latest reversible backward of each level (a device tensor
    [n_levels], written without a host sync; NaN where no level backward ran yet) and ``fallbacks``, the number
    of level backwards recomputed exactly because their error exceeded the tolerance."""

    def __init__(self, n_levels: int):
        self.n_levels = n_levels
        self.fallbacks = 0
        self._errors: torch.Tensor | None = None

    def record(self, level: int, error: torch.Tensor) -> None:
        if self._errors is None or self._errors.device != error.device:
            self._errors = torch.full((self.n_levels,), math.nan, device=error.device)
        self._errors[level] = error

    def errors(self) -> torch.Tensor:
        return torch.full((self.n_levels,), math.nan) if self._errors is None else self._errors.clone()


def reversible_steps(steps: Sequence[nn.Module], x: torch.Tensor, backend, options: ReversibleOptions | None = None):
    """Same result as ``backend.forward(steps, x)`` (plain autograd keeps every step's activations); backward
    rebuilds activations from the output (memory flat in K), see the module docstring.

    Without anything to differentiate (``torch.no_grad()``, inference mode, nothing requires grad) it is
    ``backend.forward`` and saves nothing.
    """
    steps = list(steps)
    _check_arguments(steps, x, backend)
    slots = [parameter_slots(step) for step in steps]
    params = [t for step_slots in slots for _, _, t in step_slots]
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return backend.forward(steps, x)
    _require_initialized(steps, "forward")
    layout = [[(module, name) for module, name, _ in step_slots] for step_slots in slots]
    return ReversibleSteps.apply(x, steps, layout, backend, options or ReversibleOptions(), *params)


_BACKEND_PRIMITIVES = ("forward", "fold", "coupling_net", "coupling_backward", "mix_backward")
_N_NON_PARAM_INPUTS = 5  # x, steps, layout, backend, options precede the parameters in apply()


class ReversibleSteps(torch.autograd.Function):
    """autograd node for a whole level: inputs (x, steps, layout, backend, options, *params),
    outputs (y, logdet [B]). ``params`` are the steps' parameters in ``step.parameters()`` order, step k's
    owned by the (module, name) pairs ``layout[k]``; they are explicit inputs so autograd accumulates their
    gradients into ``.grad``.

    Backward returns all the level's parameter gradients at once (autograd's contract), so it holds them until
    it returns: parameter-sized, independent of batch and image size (autograd adopts them as ``.grad`` when
    that is ``None``, as after ``zero_grad()``, else adds them in place).
    """

    @staticmethod
    def forward(ctx, x, steps, layout, backend, options, *params):
        y, logdet = _chunked_forward(steps, x, backend, options.chunk)  # under no_grad: nothing kept
        ctx.steps, ctx.layout, ctx.backend, ctx.options = steps, layout, backend, options
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, y, *params)  # y: the split's kept half and latent are views of it
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        if torch.is_grad_enabled():
            raise RuntimeError("reversible backprop is once-differentiable: double backward "
                               "(create_graph=True) is not supported; use reversible=False for it")
        x0, y, *params = ctx.saved_tensors
        options, steps = ctx.options, ctx.steps
        _require_initialized(steps, "backward recomputation")
        needs = iter(ctx.needs_input_grad[_N_NON_PARAM_INPUTS:])
        leaves = iter(params)
        slots = [[(m, n, next(leaves).detach().requires_grad_(next(needs))) for m, n in names]
                 for names in ctx.layout]
        with bound_parameters([s for step_slots in slots for s in step_slots]), _autocast(ctx.autocast):
            result = level_backward(steps, y, grad_y, grad_logdet, ctx.backend, x0=x0, chunk=options.chunk,
                                    slots=slots)
            if options.monitor is not None:
                options.monitor.record(options.level, result.error)
            tol = options.tolerance(x0.dtype)
            error = None if tol is None else result.error.item()  # the one host sync of the backward
            if error is not None and not error <= tol:
                _report_fallback(options, error, tol)
                result = replay_level_backward(steps, x0, grad_y, grad_logdet, ctx.backend, options.chunk, slots)
        grads = [g for step_grads in result.param_grads for g in step_grads]
        return (result.grad_x if ctx.needs_input_grad[0] else None, None, None, None, None, *grads)


def _report_fallback(options: ReversibleOptions, error: float, tol: float) -> None:
    if options.monitor is not None:
        options.monitor.fallbacks += 1
    warnings.warn(f"reversible backward of level {options.level}: the rebuilt input's relative error {error:.3g} "
                  f"exceeds reversible_tol={tol:.3g}; that level's gradients were recomputed exactly from "
                  "its stored input (the model may be ill-conditioned: coupling scales near 0)", RuntimeWarning,
                  stacklevel=2)


def _chunked_forward(steps, x, backend, chunk):
    """``backend.forward`` on batch chunks of ``chunk`` samples (the whole batch when it is None)."""
    parts = batch_slices(x.shape[0], chunk)
    if len(parts) == 1:
        return _checked_forward(steps, x, backend)
    y, logdet = x.new_empty(x.shape), x.new_empty(x.shape[:1])
    for part in parts:
        y[part], logdet[part] = _checked_forward(steps, x[part], backend)
    return y, logdet


def _checked_forward(steps, x, backend):
    y, logdet = backend.forward(steps, x)
    if y.shape != x.shape or logdet.shape != (x.shape[0],):
        raise ValueError(f"backend.forward must map x {tuple(x.shape)} to (y of the same shape, logdet of "
                         f"shape ({x.shape[0]},)); got {tuple(y.shape)} and {tuple(logdet.shape)}")
    return y, logdet


def _require_initialized(steps, where: str) -> None:
    """ActNorm's data-dependent init must see a real batch: never a reconstruction or a recomputation."""
    for step in steps:
        actnorm = getattr(step, "actnorm", None)  # a flow step has one; any other module is searched
        for module in [actnorm] if isinstance(actnorm, ActNorm) else step.modules():
            if isinstance(module, ActNorm) and not module.is_initialized:
                raise RuntimeError(f"an ActNorm is not initialised in the reversible {where}; its "
                                   "data-dependent init must run on a real first batch through the plain "
                                   "path (fastglow.Glow.forward does this), never inside a reversible level")


def _check_arguments(steps, x, backend) -> None:
    if not steps:
        raise ValueError("reversible_steps needs at least one step")
    if not all(isinstance(step, nn.Module) for step in steps):
        raise TypeError("every step must be an nn.Module (its parameters are the Function's inputs)")
    if not all(callable(getattr(backend, name, None)) for name in _BACKEND_PRIMITIVES):
        raise TypeError(f"backend must have the callables {', '.join(_BACKEND_PRIMITIVES)} "
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
