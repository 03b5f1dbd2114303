"""One function per fused operation of a Glow level, dispatching on the backend.

``eager`` calls the reference maths (:mod:`fastglow.reference`); ``triton`` runs the fused kernels of
:mod:`fastglow.kernels` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch

from . import reference


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(requested: str, x: torch.Tensor) -> str:
    """``auto`` -> ``triton`` on CUDA tensors and ``eager`` elsewhere; refuse ``triton`` where it cannot run."""
    if requested == "auto":
        requested = "triton" if x.is_cuda else "eager"
    if requested == "triton":
        if not (x.is_cuda or triton_interpreter_enabled()):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                             f"got a tensor on {x.device}")
        raise NotImplementedError("the Triton backend is not built yet; use backend='eager'")
    return requested


def squeeze(x: torch.Tensor, backend: str) -> torch.Tensor:
    """2x2 space-to-depth in rosinality's channel order."""
    return reference.squeeze2d(x)


def unsqueeze(x: torch.Tensor, backend: str) -> torch.Tensor:
    return reference.unsqueeze2d(x)


def flow_forward(flow: reference.Flow, x: torch.Tensor, backend: str):
    """One flow step (ActNorm, 1x1 conv, coupling): x -> (y, logdet [B])."""
    return flow(x)


def flow_reverse(flow: reference.Flow, y: torch.Tensor, backend: str) -> torch.Tensor:
    return flow.reverse(y)
