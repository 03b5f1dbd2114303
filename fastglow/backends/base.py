"""The contract every backend meets: the per-step primitives the level algorithms use (:class:`Backend`), and
the folded ActNorm + 1x1 map they exchange (:class:`FoldedMix`).

A flow step is x -> mix -> y -> coupling -> out: the mix is ActNorm and the 1x1 conv folded into one per-pixel
affine map y = M x + m; the coupling keeps out_a = y_a and maps out_b = combine(y_b, h), h = NN(y_a). Tensors
are (B, C, H, W) in the parameters' dtype unless a docstring says otherwise; logdets are per sample, [B].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class FoldedMix:
    """One step's ActNorm + 1x1 conv folded into one per-pixel affine map and its inverse, and the per-pixel
    parameter logdet:  y = mix_weight @ x + mix_bias,  x = mix_weight_inv @ y + mix_bias_inv, with
    mix_weight = W diag(scale), mix_bias = W (scale * loc), mix_weight_inv = diag(1/scale) W^-1,
    mix_bias_inv = -loc, logdet_per_pixel = sum log|scale| + log|det W|. Matrices (C, C), vectors (C,), the
    logdet 0-dim; differentiable in the step's parameters when built under grad."""
    mix_weight: torch.Tensor
    mix_bias: torch.Tensor
    mix_weight_inv: torch.Tensor
    mix_bias_inv: torch.Tensor
    logdet_per_pixel: torch.Tensor


@dataclass(frozen=True)
class NetOptions:
    """How a backend runs the coupling networks (fastglow.Glow's execution options; same maths, same state):
    ``autocast_dtype`` (bfloat16/float16: the network under autocast, its output cast back to the input's
    dtype; None: the caller's autocast state) and ``channels_last`` (the network's input in channels_last)."""
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    def run(self, fn, x_a: torch.Tensor) -> torch.Tensor:
        """fn(x_a), fn the network or its first layers, under these options."""
        if self.channels_last:
            x_a = x_a.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return fn(x_a)
        with torch.autocast(x_a.device.type, dtype=self.autocast_dtype):
            return fn(x_a).to(x_a.dtype)

    def coupling_h(self, coupling: nn.Module, x_a: torch.Tensor) -> torch.Tensor:
        """h = NN(x_a), the coupling network's output."""
        return self.run(coupling.net, x_a)

    def coupling_h_raw(self, coupling: nn.Module, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_raw, zscale (C_h,)) with NN(x_a) = h_raw exp(3 zscale): the network up to its last conv's output
        (the reversible backward applies and differentiates the factor itself, so the network's graph ends at
        a conv, which saves its output nowhere)."""
        *body, last = coupling.net  # conv 3x3, ReLU, conv 1x1, ReLU, ZeroConv2d

        def raw(v):
            for layer in body:
                v = layer(v)
            return last.conv(F.pad(v, [1, 1, 1, 1], value=1))
        return self.run(raw, x_a), last.scale.reshape(-1)


DEFAULT_NET = NetOptions()


@runtime_checkable
class Backend(Protocol):
    """How a Glow level executes. ``steps`` is a sequence of :class:`fastglow.reference.Flow` modules."""

    name: str
    net: NetOptions  # how the coupling networks run
    reuses_buffers: bool  # whether coupling_backward(reuse=True) writes over its out and grad_out
    fold_group: int | None  # steps folded and differentiated together in the backward (None: the whole level)

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        """2x2 space-to-depth (B, C, H, W) -> (B, 4C, H/2, W/2) in rosinality's channel order."""

    def unsqueeze(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`squeeze`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""

    def forward(self, steps: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y = f_{K-1}(...f_0(x)) and logdet = sum_k ld_k [B]; differentiable (plain autograd)."""

    def inverse(self, steps: Sequence[nn.Module], y: torch.Tensor) -> torch.Tensor:
        """x = f_0^-1(...f_{K-1}^-1(y)), last step first; differentiable while autograd records."""

    def fold(self, steps: Sequence[nn.Module]) -> list[FoldedMix]:
        """Every step's ActNorm + 1x1 conv folded (:class:`FoldedMix`), in full precision, differentiable in
        the steps' current parameters."""

    def coupling_net(self, coupling: nn.Module, out_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The coupling network on out_a (B, C/2, H, W) without its last factor: (h_raw (B, C_h, H, W) in
        out_a's dtype, zscale (C_h,)), h = h_raw exp(3 zscale); C_h = C (affine) or C/2 (additive)."""

    def coupling_backward(self, out: torch.Tensor, grad_out: torch.Tensor, net_out, grad_logdet, affine: bool,
                          reuse: bool = False):
        """-> (y, grad_y, (grad_h_raw, grad_zscale)): the coupling input rebuilt, y_b = uncombine(out_b, h), and
        the combine's vector-Jacobian product (grad_y's first half without the network's path, which the
        caller adds). ``grad_logdet`` [B] or None. ``reuse``: out and grad_out are the caller's own buffers,
        and y, grad_y may be written over their second halves (never the first: the network's input)."""

    def mix_backward(self, y: torch.Tensor, grad_y: torch.Tensor, fold: FoldedMix):
        """-> (x, grad_x, grad_mix_weight (C, C), grad_mix_bias (C,)): x = M^-1 (y - m) and the mix's
        vector-Jacobian product grad_x = M^T grad_y, grad_M = sum_{b,p} grad_y x^T, grad_m = sum_{b,p} grad_y."""


BACKEND_PRIMITIVES = ("squeeze", "unsqueeze", "forward", "inverse", "fold", "coupling_net", "coupling_backward",
                      "mix_backward")  # Backend's methods (a test keeps the two in step)


def full_precision():
    """Autocast off (a no-op when it is off already): the 1x1 conv, the folded maps and the elementwise rebuilds
    must invert exactly, never in a low-precision autocast dtype."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def fold_mixes(flows, w: torch.Tensor, w_inv: torch.Tensor, w_logdet: torch.Tensor) -> list[FoldedMix]:
    """Fold each step's ActNorm into its 1x1 conv, given the conv weights W (K, C, C), W^-1 and log|det W| (K)."""
    scale = torch.stack([flow.actnorm.scale.reshape(-1) for flow in flows])  # (K, C)
    loc = torch.stack([flow.actnorm.loc.reshape(-1) for flow in flows])
    mix_weight = w * scale[:, None, :]
    mix_bias = (w * (scale * loc)[:, None, :]).sum(-1)  # elementwise: never a TF32 matmul
    mix_weight_inv = w_inv / scale[:, :, None]
    logdet_pp = torch.log(scale.abs()).sum(1) + w_logdet
    return [FoldedMix(mix_weight[k], mix_bias[k], mix_weight_inv[k], -loc[k], logdet_pp[k])
            for k in range(len(flows))]
