"""How a Glow level executes: one backend object, chosen once per call from ``backend=`` and the tensor.

Both backends run the same maths on the same modules (:mod:`fastglow.reference` owns the parameters) and meet
one contract, :class:`.base.Backend`:

- :class:`.eager.EagerSteps` calls the reference modules and functions (any device and dtype).
- :class:`.triton.TritonSteps` runs the fused kernels of :mod:`fastglow.kernels`, registered as ``fastglow::``
  ops (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). It is imported on first use only, so
  importing fastglow never imports triton (``TRITON_INTERPRET`` must be decided before triton is imported).
"""

from __future__ import annotations

import os

import torch

from .base import BACKEND_PRIMITIVES, DEFAULT_NET, Backend, FoldedMix, NetOptions, fold_mixes, full_precision
from .eager import EagerSteps

__all__ = ["BACKEND_PRIMITIVES", "DEFAULT_NET", "Backend", "EagerSteps", "FoldedMix", "NetOptions", "TritonSteps",
           "fold_mixes", "full_precision", "select_backend", "triton_interpreter_enabled"]


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def __getattr__(name: str):
    if name == "TritonSteps":  # imports triton: only when asked for
        from .triton import TritonSteps
        return TritonSteps
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_BACKENDS: dict = {}  # one backend object per (name, mix precision, network options)


def select_backend(requested: str, x: torch.Tensor, mix_precision: str = "ieee",
                   net: NetOptions = DEFAULT_NET) -> Backend:
    """``auto`` -> Triton on float32/float64 CUDA tensors, else eager; refuse ``triton`` where it cannot run.
    ``net``: how the backend runs the coupling networks (:class:`NetOptions`)."""
    if requested == "auto":
        requested = "triton" if x.is_cuda and x.dtype in (torch.float32, torch.float64) else "eager"
    if requested == "eager":
        key = ("eager", None, net)
        if key not in _BACKENDS:
            _BACKENDS[key] = EagerSteps(net)
        return _BACKENDS[key]
    if not (x.is_cuda or triton_interpreter_enabled()):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         f"got a tensor on {x.device}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"backend='triton' runs float32 or float64, got {x.dtype}")
    key = ("triton", mix_precision, net)
    if key not in _BACKENDS:
        from .triton import TritonSteps
        _BACKENDS[key] = TritonSteps(mix_precision, net)
    return _BACKENDS[key]
