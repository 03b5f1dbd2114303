"""One function per fused operation of a Glow level, dispatching on the backend.

``eager`` calls the reference maths (:mod:`fastglow.reference`); ``triton`` runs the fused kernels of
:mod:`fastglow.kernels` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) through the
``torch.autograd.Function`` wrappers below.

Triton flow step (ActNorm and the 1x1 conv folded into one per-pixel affine map):
    y = A x + c,  A = W diag(scale),  c = W (scale * loc)           (inverse: x = A^-1 y - loc)
    out = coupling(y, h_raw = NN_raw(y_a), zscale)                   (NN's exp(3 * zscale) folded in)
    logdet = H W (sum log|scale| + log|det W|) + sum log s
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from . import reference
from .reversible import parameter_slots


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(requested: str, x: torch.Tensor) -> str:
    """``auto`` -> ``triton`` on float32/float64 CUDA tensors, else ``eager``; refuse ``triton`` where it
    cannot run."""
    if requested == "auto":
        requested = "triton" if x.is_cuda and x.dtype in (torch.float32, torch.float64) else "eager"
    if requested == "triton":
        if not (x.is_cuda or triton_interpreter_enabled()):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                             f"got a tensor on {x.device}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"backend='triton' runs float32 or float64, got {x.dtype}")
    return requested


def _kernels():
    """Import triton lazily: TRITON_INTERPRET must be decided before triton is first imported."""
    from .kernels import flow_step, lu_weight, squeeze
    return flow_step, lu_weight, squeeze


# ----------------------------------------------------------------------------------------------
# autograd Functions around the kernels
# ----------------------------------------------------------------------------------------------
class SqueezeFunction(torch.autograd.Function):
    """2x2 space-to-depth (or its inverse): a permutation, so each direction's gradient is the other."""

    @staticmethod
    def forward(ctx, x, inverse: bool):
        ctx.inverse = inverse
        _, _, sq = _kernels()
        return sq.unsqueeze_forward(x) if inverse else sq.squeeze_forward(x)

    @staticmethod
    def backward(ctx, grad):
        _, _, sq = _kernels()
        return (sq.squeeze_forward(grad) if ctx.inverse else sq.unsqueeze_forward(grad)), None


class LUWeightFunction(torch.autograd.Function):
    """S stacked LU-parameterised weights at once: (W, W^-1, log|det W|), one launch each way."""

    @staticmethod
    def forward(ctx, perm, w_l, w_u, w_s, s_sign):
        _, lu, _ = _kernels()
        w, w_inv, logdet = lu.lu_weight_forward(perm, w_l, w_u, w_s, s_sign, inverse=True)
        ctx.save_for_backward(perm, w_l, w_u, w_s, s_sign, w_inv)
        ctx.set_materialize_grads(False)  # an unused W^-1 costs the backward kernel nothing
        return w, w_inv, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_w, grad_w_inv, grad_logdet):
        _, lu, _ = _kernels()
        perm, w_l, w_u, w_s, s_sign, w_inv = ctx.saved_tensors
        g_l, g_u, g_s = lu.lu_weight_backward(perm, w_l, w_u, w_s, s_sign, w_inv, grad_w, grad_w_inv,
                                              grad_logdet)
        return None, g_l, g_u, g_s, None


class ChannelMixFunction(torch.autograd.Function):
    """y = A x + c per pixel (ActNorm + 1x1 conv), exact float32."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        fs, _, _ = _kernels()
        ctx.save_for_backward(x, weight)
        return fs.channel_mix_forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        fs, _, _ = _kernels()
        x, weight = ctx.saved_tensors
        _, grad_x, grad_w, grad_b = fs.channel_mix_backward(None, grad_y, weight, x=x)
        return grad_x, grad_w, grad_b


class CouplingFunction(torch.autograd.Function):
    """out = cat(y_a, combine(y_b, h_raw * exp(3 zscale))), logdet [B]; backward recomputes y from out."""

    @staticmethod
    def forward(ctx, y, h_raw, zscale, affine: bool):
        fs, _, _ = _kernels()
        _, out, logdet = fs.coupling_mix_forward(y, h_raw, zscale, affine=affine)
        ctx.affine = affine
        ctx.save_for_backward(out, h_raw, zscale)
        return out, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_logdet):
        fs, _, _ = _kernels()
        out, h_raw, zscale = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        _, grad_y, grad_h, grad_zs = fs.coupling_backward(out, grad_out, h_raw, zscale, grad_logdet,
                                                          affine=ctx.affine)
        return grad_y, grad_h, grad_zs, None


class CouplingMixFunction(torch.autograd.Function):
    """Coupling of step k fused with the ActNorm + 1x1 mix of step k+1 in one pass:
    y' = A cat(y_a, combine(y_b, h)) + c, logdet [B]. The coupled tensor is written only when a
    gradient will need it."""

    @staticmethod
    def forward(ctx, y, h_raw, zscale, weight, bias, affine: bool, store: bool):
        fs, _, _ = _kernels()
        mixed, coupled, logdet = fs.coupling_mix_forward(y, h_raw, zscale, weight, bias, affine=affine,
                                                         store_coupled=store)
        ctx.affine = affine
        if store:
            ctx.save_for_backward(coupled, h_raw, zscale, weight)
        return mixed, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mixed, grad_logdet):
        fs, _, _ = _kernels()
        coupled, h_raw, zscale, weight = ctx.saved_tensors
        if grad_mixed is None:
            grad_mixed = torch.zeros_like(coupled)
        _, grad_coupled, grad_w, grad_b = fs.channel_mix_backward(None, grad_mixed, weight, x=coupled)
        _, grad_y, grad_h, grad_zs = fs.coupling_backward(coupled, grad_coupled, h_raw, zscale, grad_logdet,
                                                          affine=ctx.affine)
        return grad_y, grad_h, grad_zs, grad_w, grad_b, None, None


# ----------------------------------------------------------------------------------------------
# The operations
# ----------------------------------------------------------------------------------------------
def squeeze(x: torch.Tensor, backend: str) -> torch.Tensor:
    """2x2 space-to-depth in rosinality's channel order."""
    return SqueezeFunction.apply(x, False) if backend == "triton" else reference.squeeze2d(x)


def unsqueeze(x: torch.Tensor, backend: str) -> torch.Tensor:
    return SqueezeFunction.apply(x, True) if backend == "triton" else reference.unsqueeze2d(x)


@dataclass
class StepWeights:
    """One step's ActNorm + 1x1 conv folded: y = A x + c, x = A_inv y + inv_bias; and the per-pixel
    parameter logdet sum log|scale| + log|det W|."""
    A: torch.Tensor
    c: torch.Tensor
    A_inv: torch.Tensor
    inv_bias: torch.Tensor
    logdet_per_pixel: torch.Tensor


def level_step_weights(flows) -> list[StepWeights]:
    """Fold every step of a level; all LU weights of the level come from one batched kernel launch.
    Runs in full precision whatever autocast says: these maps must invert exactly."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        return _fold_level_weights(flows)


def _fold_level_weights(flows) -> list[StepWeights]:
    invs = [flow.invconv for flow in flows]
    if all(isinstance(inv, reference.InvConv2dLU) for inv in invs):
        _, lu, _ = _kernels()
        perm = lu.perm_from_matrix(torch.stack([inv.w_p for inv in invs]))
        w, w_inv, w_logdet = LUWeightFunction.apply(
            perm, *(torch.stack([getattr(inv, n) for inv in invs]) for n in ("w_l", "w_u", "w_s", "s_sign")))
    else:
        w = torch.stack([inv.calc_weight() for inv in invs])
        w_inv = torch.linalg.inv(w)
        w_logdet = torch.stack([inv.log_abs_det() for inv in invs])
    scale = torch.stack([flow.actnorm.scale.reshape(-1) for flow in flows])  # (K, C)
    loc = torch.stack([flow.actnorm.loc.reshape(-1) for flow in flows])
    a = w * scale[:, None, :]
    c = (w * (scale * loc)[:, None, :]).sum(-1)  # elementwise: never a TF32 matmul
    a_inv = w_inv / scale[:, :, None]
    logdet_pp = torch.log(scale.abs()).sum(1) + w_logdet
    return [StepWeights(a[k], c[k], a_inv[k], -loc[k], logdet_pp[k]) for k in range(len(flows))]


def coupling_net_raw(coupling: reference.AffineCoupling, x_a: torch.Tensor):
    """The coupling network without its final exp(3 * scale): (h_raw, zscale); h_raw in x_a's dtype
    (the network itself may run under autocast)."""
    net = coupling.net
    hidden = net[3](net[2](net[1](net[0](x_a))))
    h_raw = net[4].conv(F.pad(hidden, [1, 1, 1, 1], value=1))
    return h_raw.to(x_a.dtype), net[4].scale.reshape(-1)


def flow_forward(flow: reference.Flow, x: torch.Tensor, backend: str):
    """One flow step (ActNorm, 1x1 conv, coupling): x -> (y, logdet [B])."""
    return level_forward([flow], x, backend)


def flow_reverse(flow: reference.Flow, y: torch.Tensor, backend: str,
                 weights: StepWeights | None = None) -> torch.Tensor:
    """Inverse of one flow step. The Triton path (uncombine and inverse mix in one kernel) is not
    differentiable: while autograd records, the step runs eagerly."""
    if backend != "triton" or (torch.is_grad_enabled() and
                               (y.requires_grad or any(t.requires_grad for _, _, t in parameter_slots(flow)))):
        return flow.reverse(y)
    fs, _, _ = _kernels()
    weights = weights if weights is not None else level_step_weights([flow])[0]
    h_raw, zscale = coupling_net_raw(flow.coupling, y[:, : y.shape[1] // 2])
    x, _, _ = fs.coupling_mix_forward(y, h_raw, zscale, weights.A_inv, weights.inv_bias,
                                      affine=flow.coupling.affine, inverse=True)
    return x


def level_forward(flows, x: torch.Tensor, backend: str):
    """A level's K flow steps: x -> (y, logdet [B]). Triton: one batched LU launch, then one fused
    kernel per step (the coupling of step k with the ActNorm + 1x1 of step k+1); the coupling
    networks run in torch between them."""
    if backend != "triton":
        logdet = x.new_zeros(x.shape[0])
        for flow in flows:
            x, det = flow(x)
            logdet = logdet + det
        return x, logdet
    weights = level_step_weights(flows)
    logdet = x.shape[2] * x.shape[3] * torch.stack([w.logdet_per_pixel for w in weights]).sum()  # 2 launches, not K
    y = ChannelMixFunction.apply(x, weights[0].A, weights[0].c)
    for k, flow in enumerate(flows):
        h_raw, zscale = coupling_net_raw(flow.coupling, y[:, : y.shape[1] // 2])
        if k + 1 < len(flows):
            y, det = CouplingMixFunction.apply(y, h_raw, zscale, weights[k + 1].A, weights[k + 1].c,
                                               flow.coupling.affine, torch.is_grad_enabled())
        else:
            y, det = CouplingFunction.apply(y, h_raw, zscale, flow.coupling.affine)
        logdet = logdet + det
    return y, logdet


def level_backward_from_output(flows, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor | None,
                               x0: torch.Tensor | None = None):
    """Reversible backward of a level of Triton flow steps from its output y:
    -> (grad_x, [parameter grads of each flow, in ``parameter_slots(flow)`` order]).

    All steps' folded weights come from one LU launch (with grad); then, last step first, the coupling
    network runs once with grad on y_a = out_a, one kernel rebuilds the coupling input y' and gives
    grad_y', d h_raw, d zscale, autograd takes those through the network (adding its path into y'_a), and
    one kernel rebuilds the step input x = A^-1 y' - loc (the stored level input ``x0`` for the first
    step) and gives grad_x, grad_A, grad_c. One autograd pass at the end takes every grad_A, grad_c and the
    parameter logdet H W (sum log|scale| + log|det W|) to loc, scale and W (one batched LU backward).
    """
    fs, _, _ = _kernels()
    half = y.shape[1] // 2
    with torch.enable_grad():
        weights = level_step_weights(flows)
    by_param: dict[int, torch.Tensor] = {}
    fold_out: list[tuple[torch.Tensor, torch.Tensor]] = []
    grad = grad_y
    grad_logdet_per_pixel = None if grad_logdet is None else y.shape[2] * y.shape[3] * grad_logdet.sum()
    for k in reversed(range(len(flows))):
        flow, w = flows[k], weights[k]
        with torch.enable_grad():
            y_a = y[:, :half].detach().requires_grad_()
            h_raw, zscale = coupling_net_raw(flow.coupling, y_a)
        y_mix, grad_mix, grad_h, grad_zs = fs.coupling_backward(y, grad, h_raw.detach(), zscale.detach(),
                                                                grad_logdet, affine=flow.coupling.affine)
        net_params = [t for _, _, t in parameter_slots(flow.coupling) if t.requires_grad]
        net_out = [(t, g) for t, g in ((h_raw, grad_h), (zscale, grad_zs)) if t.requires_grad]
        grads = torch.autograd.grad([t for t, _ in net_out], [y_a, *net_params], [g for _, g in net_out],
                                    allow_unused=True)
        by_param.update(zip(map(id, net_params), grads[1:]))
        grad_mix[:, :half] += grads[0]
        y, grad, grad_a, grad_c = fs.channel_mix_backward(y_mix, grad_mix, w.A.detach(), w.A_inv.detach(),
                                                          w.inv_bias.detach(), x=x0 if k == 0 else None)
        fold_out += [(w.A, grad_a), (w.c, grad_c)]
        if grad_logdet_per_pixel is not None:
            fold_out.append((w.logdet_per_pixel, grad_logdet_per_pixel))
    fold_params = [t for f in flows for m in (f.actnorm, f.invconv) for _, _, t in parameter_slots(m)
                   if t.requires_grad]
    fold_out = [(t, g) for t, g in fold_out if t.requires_grad]
    if fold_params and fold_out:
        fold_grads = torch.autograd.grad([t for t, _ in fold_out], fold_params, [g for _, g in fold_out],
                                         allow_unused=True)
        by_param.update(zip(map(id, fold_params), fold_grads))
    return grad, [[by_param.get(id(t)) for _, _, t in parameter_slots(flow)] for flow in flows]
