"""How a Glow level executes: one backend object, chosen once per call from ``backend=`` and the tensor.

Both backends run the same maths on the same modules (:mod:`fastglow.reference` owns the parameters):

- :class:`EagerSteps` calls the reference modules and functions (any device and dtype; autograd does the rest).
- :class:`TritonSteps` runs the fused kernels of :mod:`fastglow.kernels` through :mod:`fastglow.ops`
  (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Level passes (:class:`fastglow.Glow`, :func:`fastglow.reversible.reversible_steps`): ``squeeze(x)``,
``unsqueeze(y)``, ``forward(steps, x) -> (y, logdet [B])``, ``inverse(steps, y) -> x`` (last step first).

Per-step primitives of the reversible backward (:func:`fastglow.reversible.level_backward`, written once for
both backends), for one flow step x -> mix -> y -> coupling -> out:

- ``fold(steps) -> [FoldedMix]``: ActNorm + 1x1 conv of every step folded into y = M x + m (and its
  inverse), differentiable in the parameters; ``fold_group``: how many steps' maps are folded and differentiated
  together (None: the whole level);
- ``coupling_net(coupling, out_a) -> (h_raw, zscale)``: the coupling network on the output's first half (equal
  to the input's) without its last factor, h = h_raw exp(3 zscale); run with grad, it is the one network
  evaluation of the step in backward;
- ``coupling_backward(out, grad_out, net_out, grad_logdet, affine, reuse) -> (y, grad_y, (grad per net_out
  tensor))``: the coupling input rebuilt and the vector-Jacobian product of the combine (grad_y's first
  half without the network's path, which the caller adds); ``reuse``: out and grad_out belong to the caller
  alone, so y and grad_y may be written over them (their second halves: the network's graph holds out's
  first half, which is never written);
- ``mix_backward(y, grad_y, fold) -> (x, grad_x, grad_mix_weight, grad_mix_bias)``: the mix input rebuilt,
  x = M^-1 (y - m), and the vector-Jacobian product of the mix.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from . import reference
from .permutation import ChannelPermutation, permutation_weights


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class FoldedMix:
    """One step's ActNorm + 1x1 conv folded into one per-pixel affine map and its inverse, and the per-pixel
    parameter logdet:  y = mix_weight @ x + mix_bias,  x = mix_weight_inv @ y + mix_bias_inv, with
    mix_weight = W diag(scale), mix_bias = W (scale * loc), mix_weight_inv = diag(1/scale) W^-1,
    mix_bias_inv = -loc, logdet_per_pixel = sum log|scale| + log|det W|."""
    mix_weight: torch.Tensor
    mix_bias: torch.Tensor
    mix_weight_inv: torch.Tensor
    mix_bias_inv: torch.Tensor
    logdet_per_pixel: torch.Tensor


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


class EagerSteps:
    """Flow steps through the reference modules: rosinality's maths, any device and dtype."""

    name = "eager"
    fold_group = 1  # the reference's per-step weight maths keeps many small tensors for its backward

    @staticmethod
    def squeeze(x: torch.Tensor) -> torch.Tensor:
        return reference.squeeze2d(x)

    @staticmethod
    def unsqueeze(y: torch.Tensor) -> torch.Tensor:
        return reference.unsqueeze2d(y)

    @staticmethod
    def forward(steps, x: torch.Tensor):
        """y = f_{K-1}(...f_0(x)), logdet = sum_k ld_k [B]: each reference Flow's maths, its ActNorm and 1x1
        conv in full precision under autocast (as the Triton backend's mix), so the step inverts exactly."""
        logdet = x.new_zeros(x.shape[0])
        for step in steps:
            with full_precision():
                y, det_actnorm = step.actnorm(x)
                y, det_invconv = step.invconv(y)
            x, det_coupling = step.coupling(y)
            logdet = logdet + (det_coupling + (det_actnorm + det_invconv))
        return x, logdet

    @staticmethod
    def inverse(steps, y: torch.Tensor) -> torch.Tensor:
        """x = f_0^-1(...f_{K-1}^-1(y)), the ActNorm and 1x1 conv in full precision as in :meth:`forward`."""
        for step in reversed(list(steps)):
            y = step.coupling.reverse(y)
            with full_precision():
                y = step.actnorm.reverse(step.invconv.reverse(y))
        return y

    @staticmethod
    def fold(steps) -> list[FoldedMix]:
        """Fixed permutations (:mod:`fastglow.permutation`) come stacked, inverted by transposition."""
        with full_precision():
            if all(isinstance(step.invconv, ChannelPermutation) for step in steps):
                return fold_mixes(steps, *permutation_weights([step.invconv for step in steps]))
            w = torch.stack([step.invconv.calc_weight() for step in steps])
            w_logdet = torch.stack([step.invconv.log_abs_det() for step in steps])
            return fold_mixes(steps, w, reference.matrix_inverse(w.detach()), w_logdet)

    @staticmethod
    def coupling_net(coupling: reference.AffineCoupling, out_a: torch.Tensor):
        return coupling.run_net_raw(out_a)

    @staticmethod
    def coupling_backward(out, grad_out, net_out, grad_logdet, affine: bool, reuse: bool = False):
        """With h = h_raw e, e = exp(3 zscale): y_b = uncombine(out_b, h) (the reference's arithmetic) and the
        combine's vjp, g = ∂L/∂out_b: additive ∂y_b = ∂h = g; affine (s = sigmoid(log_s + 2)) ∂y_b = ∂t = g s,
        ∂log_s = (g out_b + ∂L/∂logdet) (1 - s); then ∂h_raw = ∂h e, ∂zscale = 3 Σ_{b,p} ∂h h.
        ``reuse``: y_b and ∂y_b are written over out_b and g (no level-sized allocation but ∂h_raw's)."""
        h_raw, zscale = net_out
        half = out.shape[1] // 2
        if not reuse:
            out, grad_out = out.clone(), grad_out.clone()
        out_b, g = out[:, half:], grad_out[:, half:]
        with full_precision():
            e = torch.exp(zscale * 3).view(1, -1, 1, 1)
            h = h_raw * e
            if affine:
                log_s, t = h.chunk(2, 1)
                s = torch.sigmoid(log_s + 2)
                grad_log_s = g * out_b
                if grad_logdet is not None:
                    grad_log_s += grad_logdet.view(-1, 1, 1, 1)
                grad_h = torch.cat([grad_log_s.mul_(1 - s), g.mul_(s)], 1)
                out_b.div_(s).sub_(t)
            else:
                grad_h = g.clone()
                out_b.sub_(h)
            grad_zscale = (grad_h * h).sum((0, 2, 3)).mul_(3)
        return out, grad_out, (grad_h.mul_(e), grad_zscale)

    @staticmethod
    def mix_backward(y, grad_y, fold: FoldedMix):
        """x = M^-1 y + m^-1; grad_x = M^T grad_y, grad_M = sum_{b,p} grad_y x^T, grad_m = sum_{b,p} grad_y."""
        with full_precision():
            weight, weight_inv = fold.mix_weight.detach(), fold.mix_weight_inv.detach()
            x = F.conv2d(y, weight_inv[:, :, None, None], fold.mix_bias_inv.detach())
            grad_x = F.conv2d(grad_y, weight.t()[:, :, None, None])
            grad_weight = torch.einsum("bohw,bihw->oi", grad_y, x)
        return x, grad_x, grad_weight, grad_y.sum((0, 2, 3))


class TritonSteps:
    """Flow steps through the fused Triton kernels (float32/float64; CUDA, or the interpreter on CPU)."""

    name = "triton"
    fold_group = None  # one batched LU launch each way per level

    def __init__(self, mix_precision: str = "ieee"):
        from . import ops  # the one place triton is imported (lazily: TRITON_INTERPRET is decided by then)
        from .kernels.squeeze import SqueezeFunction
        self._ops = ops
        self._squeeze = SqueezeFunction
        self.mix_precision = mix_precision  # tl.dot input precision of the 1x1 mix: "ieee" or "tf32x3"
        self.fold = ops.fold_level
        self.coupling_net = ops.coupling_net_raw
        self.coupling_backward = ops.coupling_backward

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        return self._squeeze.apply(x, False)

    def unsqueeze(self, y: torch.Tensor) -> torch.Tensor:
        return self._squeeze.apply(y, True)

    def forward(self, steps, x: torch.Tensor):
        return self._ops.level_forward(list(steps), x, self.mix_precision)

    def inverse(self, steps, y: torch.Tensor) -> torch.Tensor:
        return self._ops.level_inverse(list(steps), y, self.mix_precision)

    def mix_backward(self, y: torch.Tensor, grad_y: torch.Tensor, fold):
        return self._ops.mix_backward(y, grad_y, fold, self.mix_precision)


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
