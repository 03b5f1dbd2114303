"""How a Glow level executes: one backend object, chosen once per call from ``backend=`` and the tensor.

Both backends run the same maths on the same modules (:mod:`fastglow.reference` owns the parameters):

- :class:`EagerSteps` calls the reference modules (any device and dtype; autograd does the rest).
- :class:`TritonSteps` runs the fused kernels of :mod:`fastglow.kernels` through :mod:`fastglow.ops`
  (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), and offers a fused reversible backward.

The interface :func:`fastglow.reversible.reversible_steps` and :class:`fastglow.Glow` use:
``squeeze(x)``, ``unsqueeze(y)``, ``forward(steps, x) -> (y, logdet [B])``, ``inverse(steps, y) -> x`` (last
step first) and ``backward_from_output`` (``None``, or ``(steps, y, grad_y, grad_logdet, x0) -> (grad_x,
[[grad per parameter of each step]])``: the whole reversible backward of a level in one fused pass).
"""

from __future__ import annotations

import functools
import os

import torch

from . import reference


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class EagerSteps:
    """Flow steps through the reference modules: rosinality's maths, any device and dtype."""

    name = "eager"
    backward_from_output = None  # reversible backward: the generic reconstruct-and-recompute loop

    @staticmethod
    def squeeze(x: torch.Tensor) -> torch.Tensor:
        return reference.squeeze2d(x)

    @staticmethod
    def unsqueeze(y: torch.Tensor) -> torch.Tensor:
        return reference.unsqueeze2d(y)

    @staticmethod
    def forward(steps, x: torch.Tensor):
        """y = f_{K-1}(...f_0(x)), logdet = sum_k ld_k [B]."""
        logdet = x.new_zeros(x.shape[0])
        for step in steps:
            x, det = step(x)
            logdet = logdet + det
        return x, logdet

    @staticmethod
    def inverse(steps, y: torch.Tensor) -> torch.Tensor:
        """x = f_0^-1(...f_{K-1}^-1(y))."""
        for step in reversed(list(steps)):
            y = step.reverse(y)
        return y


class TritonSteps:
    """Flow steps through the fused Triton kernels (float32/float64; CUDA, or the interpreter on CPU)."""

    name = "triton"

    def __init__(self, mix_precision: str = "ieee"):
        from . import ops  # the one place triton is imported (lazily: TRITON_INTERPRET is decided by then)
        from .kernels.squeeze import SqueezeFunction
        self._ops = ops
        self._squeeze = SqueezeFunction
        self.mix_precision = mix_precision  # tl.dot input precision of the 1x1 mix: "ieee" or "tf32x3"

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        return self._squeeze.apply(x, False)

    def unsqueeze(self, y: torch.Tensor) -> torch.Tensor:
        return self._squeeze.apply(y, True)

    def forward(self, steps, x: torch.Tensor):
        return self._ops.level_forward(list(steps), x, self.mix_precision)

    def inverse(self, steps, y: torch.Tensor) -> torch.Tensor:
        return self._ops.level_inverse(list(steps), y, self.mix_precision)

    def backward_from_output(self, steps, y, grad_y, grad_logdet, x0=None):
        return self._ops.level_backward_from_output(list(steps), y, grad_y, grad_logdet, x0, self.mix_precision)


@functools.lru_cache(maxsize=None)
def _triton_steps(mix_precision: str) -> TritonSteps:
    return TritonSteps(mix_precision)


def select_backend(requested: str, x: torch.Tensor, mix_precision: str = "ieee"):
    """``auto`` -> Triton on float32/float64 CUDA tensors, else eager; refuse ``triton`` where it cannot run."""
    if requested == "auto":
        requested = "triton" if x.is_cuda and x.dtype in (torch.float32, torch.float64) else "eager"
    if requested == "eager":
        return EagerSteps()
    if not (x.is_cuda or triton_interpreter_enabled()):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         f"got a tensor on {x.device}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"backend='triton' runs float32 or float64, got {x.dtype}")
    return _triton_steps(mix_precision)
