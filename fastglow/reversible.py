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
Double backward is not supported.

As an op: a level's forward is ``fastglow::reversible_level`` (x, the steps' parameter tensors, the level's
:class:`LevelHandle` key and options -> y, logdet), registered with torch.library with a fake implementation
and an autograd formula that calls ``fastglow::reversible_level_backward`` (the reversible backward, trust
check and fallback included). Both are opaque to torch.compile, so a compiled graph holds one op per level and
its backward one op per level; torch.export keeps them too."""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import numbers
import warnings
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .backends import BACKEND_PRIMITIVES, DEFAULT_NET, NetOptions, select_backend
from .kernels.utils import autograd_inside_op, fake_or_meta, under_functorch
from .level_backward import batch_slices, call_with, level_backward, parameter_slots, replay_level_backward
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


class LevelHandle:
    """What a level op needs beyond tensors, registered under an int ``key`` (the op's argument): the steps, the
    backend object (None: chosen per call from the op's backend name, running the coupling networks under
    ``net``) and where to record the reconstruction error. A model owns one per level; copies (deepcopy,
    unpickling) register themselves under a new key."""

    def __init__(self, steps, backend=None, monitor: ReconstructionMonitor | None = None, level: int = 0,
                 net: NetOptions = DEFAULT_NET):
        self.steps, self.backend, self.monitor, self.level, self.net = steps, backend, monitor, level, net
        self.autocast = None  # the latest forward's autocast state, replayed by its backward
        self._register()

    def _register(self) -> None:
        self.key = next(_KEYS)
        _HANDLES[self.key] = self

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "key"}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._register()

    def resolve(self, backend: str, mix_precision: str, x: torch.Tensor):
        return self.backend if self.backend is not None else select_backend(backend, x, mix_precision, self.net)


_KEYS = itertools.count(1)
_HANDLES: "weakref.WeakValueDictionary[int, LevelHandle]" = weakref.WeakValueDictionary()
_STANDALONE: "collections.OrderedDict[tuple, LevelHandle]" = collections.OrderedDict()  # reversible_steps' own
_STANDALONE_SIZE = 64


def _standalone_handle(steps, backend, options: ReversibleOptions) -> LevelHandle:
    """A handle for a direct :func:`reversible_steps` call, reused while the same steps, backend and monitor come
    back (the most recent few are kept alive: the backward looks its handle up by key)."""
    ident = (tuple(map(id, steps)), id(backend), id(options.monitor), options.level)
    handle = _STANDALONE.pop(ident, None)
    if handle is None or handle.backend is not backend or any(a is not b for a, b in zip(handle.steps, steps)):
        handle = LevelHandle(list(steps), backend, options.monitor, options.level)
    _STANDALONE[ident] = handle
    while len(_STANDALONE) > _STANDALONE_SIZE:
        _STANDALONE.popitem(last=False)
    return handle


def reversible_steps(steps: Sequence[nn.Module], x: torch.Tensor, backend, options: ReversibleOptions | None = None,
                     handle: LevelHandle | None = None):
    """Same result as ``backend.forward(steps, x)`` (plain autograd keeps every step's activations); backward
    rebuilds activations from the output (memory flat in K), see the module docstring. ``handle``: the level's
    registered handle (:class:`fastglow.Glow` passes its own; made here otherwise).

    Without anything to differentiate (``torch.no_grad()``, inference mode, nothing requires grad) it is
    ``backend.forward`` and saves nothing. Else one ``fastglow::reversible_level`` op.
    """
    steps = list(steps)
    _check_arguments(steps, x, backend)
    params = [t for step in steps for _, _, t in step_slots(step)]
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return backend.forward(steps, x)
    _require_initialized(steps, "forward")
    options = options or ReversibleOptions()
    if handle is None:
        handle = _standalone_handle(steps, backend, options)
    args = (handle.key, backend.name, getattr(backend, "mix_precision", "ieee"), options.tolerance(x.dtype),
            options.chunk)
    if under_functorch(x, *params):
        y, logdet = _FunctorchLevel.apply(x, args, *params)
        return y, logdet
    return reversible_level(x, params, *args)


def step_slots(step: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """:func:`fastglow.level_backward.parameter_slots`, or on an ``nn.DataParallel`` replica (whose parameters
    are plain attributes, so ``parameters()`` is empty) the replicated tensors, found as DataParallel lists
    them (``_former_parameters``, a private attribute: read for that wrapper only)."""
    slots = parameter_slots(step)
    if slots or not any(getattr(m, "_is_replica", False) for m in step.modules()):
        return slots
    return [(owner, f"{prefix}.{name}" if prefix else name, t) for prefix, owner in step.named_modules()
            for name, t in getattr(owner, "_former_parameters", {}).items() if t is not None]


@torch.library.custom_op("fastglow::reversible_level", mutates_args=())
def reversible_level(x: torch.Tensor, params: list[torch.Tensor], key: int, backend: str, mix_precision: str,
                     tol: float | None, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A level's K steps, x -> (y, logdet [B]), with the parameters ``params`` (the steps' slot order); its
    autograd formula is the reversible backward, ``fastglow::reversible_level_backward``."""
    return _level_forward(x, params, key, backend, mix_precision, tol, chunk)


def _level_forward(x, params, key, backend, mix_precision, tol, chunk):
    handle = _HANDLES[key]
    steps = list(handle.steps)
    handle.autocast = _autocast_state(x.device.type)
    with torch.no_grad():
        return call_with(steps, [step_slots(s) for s in steps], params, _chunked_forward, x,
                         handle.resolve(backend, mix_precision, x), chunk)


@torch.library.custom_op("fastglow::reversible_level_backward", mutates_args=())
def reversible_level_grad(x0: torch.Tensor, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor | None,
                          params: list[torch.Tensor], key: int, backend: str, mix_precision: str, tol: float | None,
                          chunk: int | None) -> list[torch.Tensor]:
    """[∂L/∂x, ∂L/∂param for each of ``params``]: the level's reversible backward from its output y, its rebuilt
    input checked against the stored x0 (above ``tol``: the exact replay from x0, counted and warned about)."""
    return _level_backward(x0, y, grad_y, grad_logdet, params, key, backend, mix_precision, tol, chunk)


def _level_backward(x0, y, grad_y, grad_logdet, params, key, backend, mix_precision, tol, chunk):
    handle = _HANDLES[key]
    steps = list(handle.steps)
    _require_initialized(steps, "backward recomputation")
    backend_steps = handle.resolve(backend, mix_precision, x0)
    tensors = iter(params)
    slots = [[(m, n, next(tensors)) for m, n, _ in step_slots(step)] for step in steps]
    with _autocast(handle.autocast), autograd_inside_op():
        result = level_backward(steps, y, grad_y, grad_logdet, backend_steps, x0=x0, chunk=chunk, slots=slots)
        if handle.monitor is not None:
            handle.monitor.record(handle.level, result.error)
        error = None if tol is None else result.error.item()  # the one host sync of the backward
        if error is not None and not error <= tol:
            _report_fallback(handle, error, tol)
            result = replay_level_backward(steps, x0, grad_y, grad_logdet, backend_steps, chunk, slots)
    grads = [g for step_grads in result.param_grads for g in step_grads]
    return _distinct([result.grad_x] + [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])


def _distinct(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """An op's outputs may not share memory: gradients of stacked parameters (one batched LU launch) are views
    of one tensor, so every tensor whose storage an earlier one uses is copied (parameter-sized)."""
    seen, out = set(), []
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        out.append(t.clone() if ptr in seen else t)
        seen.add(ptr)
    return out


def _level_shapes(x, *_):
    return torch.empty_like(x), x.new_empty(x.shape[:1])


def _level_grad_shapes(x0, y, grad_y, grad_logdet, params, *_):
    return [torch.empty_like(x0)] + [torch.empty_like(p) for p in params]


def _level_setup(ctx, inputs, output):
    x, params, *ctx.args = inputs
    ctx.save_for_backward(x, output[0], *params)


def _level_backprop(ctx, grad_y, grad_logdet):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("reversible backprop is once-differentiable: double backward "
                           "(create_graph=True) is not supported; use reversible=False for it")
    grads = _level_grads(ctx, grad_y, grad_logdet)
    return grads[0], list(grads[1:]), *([None] * len(ctx.args))


def _level_grads(ctx, grad_y, grad_logdet):
    x0, y, *params = ctx.saved_tensors
    return reversible_level_grad(x0, y, grad_y.contiguous(), grad_logdet, params, *ctx.args)


class _FunctorchLevel(torch.autograd.Function):
    """The same two ops under torch.func transforms (grad, vjp, vmap of grad): an op's registered autograd has
    no setup_context, which functorch requires (pytorch/pytorch#168393), so there the pair runs through this
    Function. (Its backward runs under functorch's own grad mode: once-differentiable is not enforced.)"""

    generate_vmap_rule = True  # vmap reaches the ops' own rules

    @staticmethod
    def forward(x, args, *params):
        return reversible_level(x, list(params), *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _level_setup(ctx, (inputs[0], inputs[2:], *inputs[1]), output)

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        with torch.no_grad():  # the backward op has no autograd formula of its own
            grads = _level_grads(ctx, grad_y, grad_logdet)
        return grads[0], None, *grads[1:]


def _vmap_by_loop(op):
    """A vmap rule that runs ``op`` once per index of the vmapped dimension and stacks the results (the
    levels' ops are per-sample along their own batch dimension; vmap adds an outer one)."""
    def pick(arg, dim, i):
        if isinstance(arg, (list, tuple)):
            dims = dim if isinstance(dim, (list, tuple)) else [dim] * len(arg)
            return [pick(a, d, i) for a, d in zip(arg, dims)]
        return arg if dim is None else arg.select(dim, i)

    def rule(info, in_dims, *args):
        results = [op(*(pick(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
        stacked = type(results[0])(torch.stack(parts) for parts in zip(*results))
        return stacked, type(results[0])([0] * len(stacked))
    return rule


reversible_level.register_fake(fake_or_meta(_level_forward, _level_shapes))
reversible_level_grad.register_fake(fake_or_meta(_level_backward, _level_grad_shapes))
reversible_level.register_autograd(_level_backprop, setup_context=_level_setup)
reversible_level.register_vmap(_vmap_by_loop(reversible_level))
reversible_level_grad.register_vmap(_vmap_by_loop(reversible_level_grad))
def _report_fallback(handle: LevelHandle, error: float, tol: float) -> None:
    if handle.monitor is not None:
        handle.monitor.fallbacks += 1
    warnings.warn(f"reversible backward of level {handle.level}: the rebuilt input's relative error {error:.3g} "
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
    if not all(callable(getattr(backend, name, None)) for name in BACKEND_PRIMITIVES):
        raise TypeError(f"backend must have the callables {', '.join(BACKEND_PRIMITIVES)} "
                        "(fastglow.backends.base.Backend)")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating tensor with a leading batch dimension")


def _autocast_state(device_type: str):
    """Forward's autocast state, replayed in backward so the recomputation matches the forward's precision."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def _autocast(state):
    return contextlib.nullcontext() if state is None else torch.autocast(state[0], dtype=state[1])
