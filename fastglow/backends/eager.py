"""The eager backend: flow steps through the reference modules and functions (any device and dtype; autograd
does the rest). The contract it meets is :class:`fastglow.backends.base.Backend`."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .. import reference
from ..permutation import ChannelPermutation, permutation_weights
from .base import DEFAULT_NET, FoldedMix, NetOptions, fold_mixes, full_precision


class EagerSteps:
    """Flow steps through the reference modules: rosinality's maths, any device and dtype; the coupling
    networks run under ``net`` (:class:`NetOptions`)."""

    name = "eager"
    fold_group = 1  # the reference's per-step weight maths keeps many small tensors for its backward
    reuses_buffers = True  # coupling_backward(reuse=True) rebuilds y_b over out_b

    def __init__(self, net: NetOptions = DEFAULT_NET):
        self.net = net

    @staticmethod
    def squeeze(x: torch.Tensor) -> torch.Tensor:
        return reference.squeeze2d(x)

    @staticmethod
    def unsqueeze(y: torch.Tensor) -> torch.Tensor:
        return reference.unsqueeze2d(y)

    def forward(self, steps, x: torch.Tensor):
        """y = f_{K-1}(...f_0(x)), logdet = sum_k ld_k [B]: each reference Flow's maths, its ActNorm and 1x1
        conv in full precision under autocast (as the Triton backend's mix), so the step inverts exactly."""
        logdet = x.new_zeros(x.shape[0])
        for step in steps:
            with full_precision():
                y, det_actnorm = step.actnorm(x)
                y, det_invconv = step.invconv(y)
            y_a, y_b = y.chunk(2, 1)
            y_b, det_coupling = reference.coupling_combine(y_b, self.net.coupling_h(step.coupling, y_a),
                                                           step.coupling.affine)
            x = torch.cat([y_a, y_b], 1)
            logdet = logdet + (det_coupling + (det_actnorm + det_invconv))
        return x, logdet

    def inverse(self, steps, y: torch.Tensor) -> torch.Tensor:
        """x = f_0^-1(...f_{K-1}^-1(y)), the ActNorm and 1x1 conv in full precision as in :meth:`forward`."""
        for step in reversed(list(steps)):
            y_a, y_b = y.chunk(2, 1)
            y_b = reference.coupling_uncombine(y_b, self.net.coupling_h(step.coupling, y_a), step.coupling.affine)
            with full_precision():
                y = step.actnorm.reverse(step.invconv.reverse(torch.cat([y_a, y_b], 1)))
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

    def coupling_net(self, coupling: reference.AffineCoupling, out_a: torch.Tensor):
        return self.net.coupling_h_raw(coupling, out_a)

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
