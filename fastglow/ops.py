"""The level algorithms of the Triton backend: a Glow level's K flow steps forward (fused across steps), in
reverse, and backward from the level output (reversible backprop), over the kernels' autograd Functions.

Importing this module imports triton; :mod:`fastglow.backends` imports it lazily, once, at the Triton backend's
construction (``TRITON_INTERPRET`` must be decided before triton is first imported).

A flow step with ActNorm and the 1x1 conv folded into one per-pixel affine map (the "mix"):
    y = mix_weight @ x + mix_bias,    mix_weight = W diag(scale),  mix_bias = W (scale * loc)
    x = mix_weight_inv @ y + mix_bias_inv,  mix_weight_inv = diag(1/scale) W^-1,  mix_bias_inv = -loc
    out = coupling(y, h_raw = NN_raw(y_a), zscale)                   (NN's exp(3 * zscale) folded in)
    logdet = H W (sum log|scale| + log|det W|) + sum log s
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from . import reference
from .kernels.channel_mix import ChannelMixFunction, channel_mix_backward
from .kernels.coupling import CouplingFunction, CouplingMixFunction, coupling_backward
from .kernels.flow_step import coupling_mix_forward
from .kernels.lu_weight import LUWeightFunction, perm_from_matrix
from .reversible import parameter_slots


@dataclass
class FoldedMix:
    """One step's ActNorm + 1x1 conv folded into the mix and its inverse (see the module docstring), and the
    per-pixel parameter logdet sum log|scale| + log|det W|."""
    mix_weight: torch.Tensor
    mix_bias: torch.Tensor
    mix_weight_inv: torch.Tensor
    mix_bias_inv: torch.Tensor
    logdet_per_pixel: torch.Tensor


def fold_level(flows) -> list[FoldedMix]:
    """Fold every step of a level; all LU weights of the level come from one batched kernel launch.
    Runs in full precision whatever autocast says: these maps must invert exactly."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        invs = [flow.invconv for flow in flows]
        if all(isinstance(inv, reference.InvConv2dLU) for inv in invs):
            perm = perm_from_matrix(torch.stack([inv.w_p for inv in invs]))
            w, w_inv, w_logdet = LUWeightFunction.apply(
                perm, *(torch.stack([getattr(inv, n) for inv in invs]) for n in ("w_l", "w_u", "w_s", "s_sign")))
        else:
            w = torch.stack([inv.calc_weight() for inv in invs])
            w_inv = reference.matrix_inverse(w)
            w_logdet = torch.stack([inv.log_abs_det() for inv in invs])
        scale = torch.stack([flow.actnorm.scale.reshape(-1) for flow in flows])  # (K, C)
        loc = torch.stack([flow.actnorm.loc.reshape(-1) for flow in flows])
        mix_weight = w * scale[:, None, :]
        mix_bias = (w * (scale * loc)[:, None, :]).sum(-1)  # elementwise: never a TF32 matmul
        mix_weight_inv = w_inv / scale[:, :, None]
        logdet_pp = torch.log(scale.abs()).sum(1) + w_logdet
    return [FoldedMix(mix_weight[k], mix_bias[k], mix_weight_inv[k], -loc[k], logdet_pp[k]) for k in range(len(flows))]


def coupling_net_raw(coupling: reference.AffineCoupling, x_a: torch.Tensor):
    """The coupling network without its final exp(3 * scale): (h_raw, zscale); h_raw contiguous in x_a's dtype
    (the network itself may run under autocast, and in channels_last: ``coupling.run_net``)."""
    net = coupling.net

    def raw(v):
        return net[4].conv(F.pad(net[3](net[2](net[1](net[0](v)))), [1, 1, 1, 1], value=1))

    return coupling.run_net(raw, x_a).to(x_a.dtype).contiguous(), net[4].scale.reshape(-1)


def level_forward(flows, x: torch.Tensor, input_precision: str = "ieee"):
    """A level's K flow steps: x -> (y, logdet [B]). One batched LU launch, then one fused kernel per step (the
    coupling of step k with the ActNorm + 1x1 of step k+1); the coupling networks run in torch between them.
    ``input_precision``: the mix's tl.dot precision ("ieee" or "tf32x3"), here and below."""
    folded = fold_level(flows)
    logdet = x.shape[2] * x.shape[3] * torch.stack([f.logdet_per_pixel for f in folded]).sum()  # 2 launches, not K
    y = ChannelMixFunction.apply(x, folded[0].mix_weight, folded[0].mix_bias, input_precision)
    for k, flow in enumerate(flows):
        h_raw, zscale = coupling_net_raw(flow.coupling, y[:, : y.shape[1] // 2])
        if k + 1 < len(flows):
            y, det = CouplingMixFunction.apply(y, h_raw, zscale, folded[k + 1].mix_weight, folded[k + 1].mix_bias,
                                               flow.coupling.affine, torch.is_grad_enabled(), input_precision)
        else:
            y, det = CouplingFunction.apply(y, h_raw, zscale, flow.coupling.affine)
        logdet = logdet + det
    return y, logdet


def level_inverse(flows, y: torch.Tensor, input_precision: str = "ieee") -> torch.Tensor:
    """Inverse of a level's K flow steps, last step first: per step one kernel (uncombine and inverse mix).
    That kernel is not differentiable: while autograd records, the steps run through the reference modules."""
    if torch.is_grad_enabled() and (y.requires_grad or any(t.requires_grad for flow in flows
                                                           for _, _, t in parameter_slots(flow))):
        for flow in reversed(flows):
            y = flow.reverse(y)
        return y
    folded = fold_level(flows)
    for flow, fold in zip(reversed(flows), reversed(folded)):
        h_raw, zscale = coupling_net_raw(flow.coupling, y[:, : y.shape[1] // 2])
        y, _, _ = coupling_mix_forward(y, h_raw, zscale, fold.mix_weight_inv, fold.mix_bias_inv,
                                       affine=flow.coupling.affine, inverse=True, input_precision=input_precision)
    return y


def level_backward_from_output(flows, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor | None,
                               x0: torch.Tensor | None = None, input_precision: str = "ieee"):
    """Reversible backward of a level of Triton flow steps from its output y:
    -> (grad_x, [parameter grads of each flow, in ``parameter_slots(flow)`` order]).

    All steps' folded maps come from one LU launch (with grad); then, last step first, the coupling network runs
    once with grad on y_a = out_a, one kernel rebuilds the coupling input y' and gives grad_y', d h_raw,
    d zscale, autograd takes those through the network (adding its path into y'_a), and one kernel rebuilds the
    step input x = mix_weight_inv @ y' + mix_bias_inv (the stored level input ``x0`` for the first step) and
    gives grad_x, grad_mix_weight, grad_mix_bias. One autograd pass at the end takes every grad_mix_weight,
    grad_mix_bias and the parameter logdet H W (sum log|scale| + log|det W|) to loc, scale and W (one batched
    LU backward).
    """
    half = y.shape[1] // 2
    with torch.enable_grad():
        folded = fold_level(flows)
    by_param: dict[int, torch.Tensor] = {}
    fold_out: list[tuple[torch.Tensor, torch.Tensor]] = []
    grad = grad_y
    grad_logdet_per_pixel = None if grad_logdet is None else y.shape[2] * y.shape[3] * grad_logdet.sum()
    for k in reversed(range(len(flows))):
        flow, fold = flows[k], folded[k]
        with torch.enable_grad():
            y_a = y[:, :half].detach().requires_grad_()
            h_raw, zscale = coupling_net_raw(flow.coupling, y_a)
        y_mix, grad_mix, grad_h, grad_zs = coupling_backward(y, grad, h_raw.detach(), zscale.detach(),
                                                             grad_logdet, affine=flow.coupling.affine)
        net_params = [t for _, _, t in parameter_slots(flow.coupling) if t.requires_grad]
        net_out = [(t, g) for t, g in ((h_raw, grad_h), (zscale, grad_zs)) if t.requires_grad]
        grads = torch.autograd.grad([t for t, _ in net_out], [y_a, *net_params], [g for _, g in net_out],
                                    allow_unused=True)
        by_param.update(zip(map(id, net_params), grads[1:]))
        grad_mix[:, :half] += grads[0]
        y, grad, grad_w, grad_b = channel_mix_backward(y_mix, grad_mix, fold.mix_weight.detach(),
                                                       fold.mix_weight_inv.detach(), fold.mix_bias_inv.detach(),
                                                       x=x0 if k == 0 else None, input_precision=input_precision)
        fold_out += [(fold.mix_weight, grad_w), (fold.mix_bias, grad_b)]
        if grad_logdet_per_pixel is not None:
            fold_out.append((fold.logdet_per_pixel, grad_logdet_per_pixel))
    fold_params = [t for f in flows for m in (f.actnorm, f.invconv) for _, _, t in parameter_slots(m)
                   if t.requires_grad]
    fold_out = [(t, g) for t, g in fold_out if t.requires_grad]
    if fold_params and fold_out:
        fold_grads = torch.autograd.grad([t for t, _ in fold_out], fold_params, [g for _, g in fold_out],
                                         allow_unused=True)
        by_param.update(zip(map(id, fold_params), fold_grads))
    return grad, [[by_param.get(id(t)) for _, _, t in parameter_slots(flow)] for flow in flows]
