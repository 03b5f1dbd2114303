"""The Triton backend: a Glow level's K flow steps forward (fused across steps) and in reverse, and the per-step
primitives of the reversible backward (:func:`fastglow.level_backward.level_backward` is the algorithm, written
once for both backends), over the kernels' ``fastglow::`` ops and launchers.

Importing this module imports triton; :mod:`fastglow.backends` imports it lazily, at the Triton backend's first
use (``TRITON_INTERPRET`` must be decided before triton is first imported).

A flow step with ActNorm and the 1x1 conv folded into one per-pixel affine map (the "mix",
:class:`fastglow.backends.base.FoldedMix`):
    y = mix_weight @ x + mix_bias,    x = mix_weight_inv @ y + mix_bias_inv
    out = coupling(y, h_raw = NN_raw(y_a), zscale)                   (NN's exp(3 * zscale) folded in)
    logdet = H W (sum log|scale| + log|det W|) + sum log s
"""

from __future__ import annotations

import torch

from .. import reference
from ..kernels.channel_mix import channel_mix, channel_mix_rebuild_grad
from ..kernels.coupling import coupling, coupling_grad, coupling_mix, coupling_mix_inverse
from ..kernels.lu_weight import lu_weight, perm_from_matrix
from ..kernels.squeeze import squeeze
from ..kernels.utils import call
from .base import DEFAULT_NET, FoldedMix, NetOptions, fold_mixes, full_precision
from .eager import EagerSteps

__all__ = ["TritonSteps", "fold_level", "coupling_net_raw", "level_forward", "level_inverse", "coupling_backward",
           "mix_backward"]


def fold_level(flows) -> list[FoldedMix]:
    """Fold every step of a level; all LU weights of the level come from one batched kernel launch.
    Runs in full precision whatever autocast says: these maps must invert exactly."""
    invs = [flow.invconv for flow in flows]
    if not all(isinstance(inv, reference.InvConv2dLU) for inv in invs):
        return EagerSteps.fold(flows)
    with full_precision():
        perm = perm_from_matrix(torch.stack([inv.w_p for inv in invs]))
        w, w_inv, w_logdet = call(
            lu_weight, perm, *(torch.stack([getattr(inv, n) for inv in invs]) for n in ("w_l", "w_u", "w_s", "s_sign")))
        return fold_mixes(flows, w, w_inv, w_logdet)


def coupling_net_raw(coupling: reference.AffineCoupling, x_a: torch.Tensor, net: NetOptions = DEFAULT_NET):
    """``net.coupling_h_raw``: (h_raw, zscale), h_raw contiguous in x_a's dtype as the kernels read it."""
    h_raw, zscale = net.coupling_h_raw(coupling, x_a)
    return h_raw.to(x_a.dtype).contiguous(), zscale


def level_forward(flows, x: torch.Tensor, input_precision: str = "ieee", net: NetOptions = DEFAULT_NET):
    """A level's K flow steps: x -> (y, logdet [B]). One batched LU launch, then one fused kernel per step (the
    coupling of step k with the ActNorm + 1x1 of step k+1); the coupling networks run in torch between them.
    ``input_precision``: the mix's tl.dot precision ("ieee" or "tf32x3"), here and below; ``net``: how the
    coupling networks run (:class:`NetOptions`)."""
    folded = fold_level(flows)
    logdet = x.shape[2] * x.shape[3] * torch.stack([f.logdet_per_pixel for f in folded]).sum()  # 2 launches, not K
    y = call(channel_mix, x, folded[0].mix_weight, folded[0].mix_bias, input_precision)
    for k, flow in enumerate(flows):
        h_raw, zscale = coupling_net_raw(flow.coupling, y[:, : y.shape[1] // 2], net)
        if k + 1 < len(flows):
            y, det = coupling_mix(y, h_raw, zscale, folded[k + 1].mix_weight, folded[k + 1].mix_bias,
                             flow.coupling.affine, torch.is_grad_enabled(), input_precision)
        else:
            y, det = call(coupling, y, h_raw, zscale, flow.coupling.affine)
        logdet = logdet + det
    return y, logdet


def level_inverse(flows, y: torch.Tensor, input_precision: str = "ieee", net: NetOptions = DEFAULT_NET):
    """Inverse of a level's K flow steps, last step first: per step one kernel (uncombine and inverse mix).
    That kernel is not differentiable: while autograd records, the steps run through the eager backend."""
    if torch.is_grad_enabled() and (y.requires_grad or any(t.requires_grad for flow in flows
                                                           for t in flow.parameters())):
        return EagerSteps(net).inverse(flows, y)
    folded = fold_level(flows)
    for flow, fold in zip(reversed(flows), reversed(folded)):
        h_raw, zscale = coupling_net_raw(flow.coupling, y[:, : y.shape[1] // 2], net)
        y = coupling_mix_inverse(y, h_raw, zscale, fold.mix_weight_inv, fold.mix_bias_inv, flow.coupling.affine,
                                 input_precision)
    return y


def coupling_backward(out, grad_out, net_out, grad_logdet, affine: bool, reuse: bool = False):
    """Reversible-backward primitive: one kernel rebuilds the coupling input y from out and gives grad_y (first
    half without the network's path), d h_raw and d zscale. ``reuse`` is declined: the kernel writes fresh
    buffers (in place, lanes that replicate an element could read it after another lane rewrote it)."""
    h_raw, zscale = net_out
    y, grad_y, grad_h, grad_zs = coupling_grad(out, grad_out, h_raw, zscale, grad_logdet, affine)
    return y, grad_y, (grad_h, grad_zs)


def mix_backward(y, grad_y, fold: FoldedMix, input_precision: str = "ieee"):
    """Reversible-backward primitive: one kernel rebuilds x = mix_weight_inv @ y + mix_bias_inv and gives
    grad_x, grad_mix_weight, grad_mix_bias (``input_precision``: the mix's tl.dot precision, see
    :data:`fastglow.kernels.utils.MIX_PRECISIONS`)."""
    return channel_mix_rebuild_grad(y, grad_y, fold.mix_weight.detach(), fold.mix_weight_inv.detach(),
                                    fold.mix_bias_inv.detach(), input_precision)


class TritonSteps:
    """Flow steps through the fused Triton kernels (float32/float64; CUDA, or the interpreter on CPU)."""

    name = "triton"
    fold_group = None  # one batched LU launch each way per level
    reuses_buffers = False  # coupling_backward declines reuse: the kernel writes fresh buffers

    def __init__(self, mix_precision: str = "ieee", net: NetOptions = DEFAULT_NET):
        self.mix_precision = mix_precision  # tl.dot input precision of the 1x1 mix: "ieee" or "tf32x3"
        self.net = net  # how the coupling networks run

    fold = staticmethod(fold_level)
    coupling_backward = staticmethod(coupling_backward)

    @staticmethod
    def squeeze(x: torch.Tensor) -> torch.Tensor:
        return call(squeeze, x, False)

    @staticmethod
    def unsqueeze(y: torch.Tensor) -> torch.Tensor:
        return call(squeeze, y, True)

    def coupling_net(self, coupling, out_a: torch.Tensor):
        return coupling_net_raw(coupling, out_a, self.net)

    def forward(self, steps, x: torch.Tensor):
        return level_forward(list(steps), x, self.mix_precision, self.net)

    def inverse(self, steps, y: torch.Tensor) -> torch.Tensor:
        return level_inverse(list(steps), y, self.mix_precision, self.net)

    def mix_backward(self, y: torch.Tensor, grad_y: torch.Tensor, fold):
        return mix_backward(y, grad_y, fold, self.mix_precision)
