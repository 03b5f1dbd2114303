"""The folded ActNorm + 1x1 conv as a per-pixel channel mix, out = mix_weight @ x + mix_bias: forward (the
fused kernel of :mod:`.flow_step` without a coupling), backward kernel, launchers and the autograd Function.

Backward (optionally rebuilding x = mix_weight_inv @ out + mix_bias_inv first, for reversible backprop):
    grad_x = mix_weight^T grad_out,  grad_mix_weight = sum_{b,p} grad_out x^T,  grad_mix_bias = sum_{b,p} grad_out
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .flow_step import check_mix, check_tensor, launch_forward, pixel_block, pow2


@triton.jit
def _channel_mix_bwd_kernel(
    y_ptr, gy_ptr, w_ptr, winv_ptr, binv_ptr, x_ptr, gx_ptr, gw_ptr, gb_ptr,
    C_IN, C_OUT, P, N_PB,
    RECOMPUTE: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = M x + m (M, m: mix_weight, mix_bias): (optionally) x = M_inv y + m_inv; dx = M^T dy; partial dM = dy x^T
    and dm = sum dy per tile."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tile = b * N_PB + pid_p
    offs_o = tl.arange(0, BLOCK_CO)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mo = offs_o < C_OUT
    mp = offs_p < P
    o_off = b * C_OUT * P + offs_o[:, None] * P + offs_p[None, :]
    g = tl.load(gy_ptr + o_off, mask=mo[:, None] & mp[None, :], other=0.0)
    if RECOMPUTE:
        y = tl.load(y_ptr + o_off, mask=mo[:, None] & mp[None, :], other=0.0)
    tl.store(gb_ptr + tile * C_OUT + offs_o, tl.sum(g, axis=1), mask=mo)
    for i0 in range(0, C_IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mi = offs_i < C_IN
        mask_i = mi[:, None] & mp[None, :]
        i_off = b * C_IN * P + offs_i[:, None] * P + offs_p[None, :]
        if RECOMPUTE:
            winv = tl.load(winv_ptr + offs_i[:, None] * C_OUT + offs_o[None, :],
                           mask=mi[:, None] & mo[None, :], other=0.0)
            x = tl.dot(winv, y, input_precision="ieee")
            x += tl.load(binv_ptr + offs_i, mask=mi, other=0.0)[:, None]
            x = tl.where(mask_i, x, 0.0)
            tl.store(x_ptr + i_off, x, mask=mask_i)
        else:
            x = tl.load(x_ptr + i_off, mask=mask_i, other=0.0)
        w_t = tl.load(w_ptr + offs_o[None, :] * C_IN + offs_i[:, None], mask=mi[:, None] & mo[None, :], other=0.0)
        tl.store(gx_ptr + i_off, tl.dot(w_t, g, input_precision="ieee"), mask=mask_i)
        gw = tl.dot(g, tl.trans(x), input_precision="ieee")  # (BLOCK_CO, BLOCK_I)
        tl.store(gw_ptr + tile * C_OUT * C_IN + offs_o[:, None] * C_IN + offs_i[None, :], gw,
                 mask=mo[:, None] & mi[None, :])


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def channel_mix_forward(x: torch.Tensor, mix_weight: torch.Tensor, mix_bias: torch.Tensor | None = None):
    """out[b, :, p] = mix_weight @ x[b, :, p] + mix_bias, exact (no TF32).
    x: (B, C_in, H, W), mix_weight: (C_out, C_in)."""
    x = check_tensor("x", x, dim=4)
    mix_weight, mix_bias = check_mix(mix_weight, mix_bias, x.shape[1], x)
    mixed, _, _ = launch_forward(x, None, None, mix_weight, mix_bias, coupling=False, inverse=False,
                                 affine=False, store_coupled=False)
    return mixed


def channel_mix_backward(y, grad_y, mix_weight, mix_weight_inv=None, mix_bias_inv=None, x=None):
    """Backward of y = mix_weight @ x + mix_bias per pixel: returns (x, grad_x, grad_mix_weight, grad_mix_bias).

    With ``x`` None the input is recomputed as x = mix_weight_inv @ y + mix_bias_inv (reversible backprop).
    grad_x = mix_weight^T grad_y; grad_mix_weight = sum_{b,p} grad_y x^T; grad_mix_bias = sum_{b,p} grad_y.
    """
    grad_y = check_tensor("grad_y", grad_y, dim=4)
    b, c_out, hh, ww = grad_y.shape
    mix_weight = check_tensor("mix_weight", mix_weight, grad_y.dtype, grad_y.device, 2)
    if mix_weight.shape[0] != c_out:
        raise ValueError(f"mix_weight must have shape ({c_out}, C_in), got {tuple(mix_weight.shape)}")
    c_in = mix_weight.shape[1]
    recompute = x is None
    if recompute:
        y = check_tensor("y", y, grad_y.dtype, grad_y.device, 4)
        if y.shape != grad_y.shape:
            raise ValueError(f"y shape {tuple(y.shape)} != grad_y shape {tuple(grad_y.shape)}")
        if mix_weight_inv is None:
            raise ValueError("need x or mix_weight_inv to recover the mix input")
        mix_weight_inv = check_tensor("mix_weight_inv", mix_weight_inv, grad_y.dtype, grad_y.device, 2)
        if tuple(mix_weight_inv.shape) != (c_in, c_out):
            raise ValueError(f"mix_weight_inv must have shape {(c_in, c_out)}, got {tuple(mix_weight_inv.shape)}")
        mix_bias_inv = mix_weight_inv.new_zeros(c_in) if mix_bias_inv is None else \
            check_tensor("mix_bias_inv", mix_bias_inv, grad_y.dtype, grad_y.device).reshape(-1)
        if mix_bias_inv.numel() != c_in:
            raise ValueError(f"mix_bias_inv must have {c_in} elements, got {mix_bias_inv.numel()}")
        x = grad_y.new_empty((b, c_in, hh, ww))
    else:
        x = check_tensor("x", x, grad_y.dtype, grad_y.device, 4)
        if tuple(x.shape) != (b, c_in, hh, ww):
            raise ValueError(f"x must have shape {(b, c_in, hh, ww)}, got {tuple(x.shape)}")
    p = hh * ww
    block_co = pow2(c_out)
    block_p = pixel_block(p, block_co, budget=4096)
    n_pb = triton.cdiv(p, block_p)
    grad_x = grad_y.new_empty((b, c_in, hh, ww))
    gw = grad_y.new_zeros((b * n_pb, c_out, c_in))
    gb = grad_y.new_zeros((b * n_pb, c_out))
    if b * p > 0:
        _channel_mix_bwd_kernel[(n_pb, b)](
            y if recompute else grad_y, grad_y, mix_weight, mix_weight_inv if recompute else mix_weight,
            mix_bias_inv if recompute else mix_weight, x, grad_x, gw, gb, c_in, c_out, p, n_pb,
            RECOMPUTE=recompute, BLOCK_CO=block_co, BLOCK_I=max(16, min(pow2(c_in), 8192 // block_co)),
            BLOCK_P=block_p,
        )
    return x, grad_x, gw.sum(0), gb.sum(0)


# ----------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------
class ChannelMixFunction(torch.autograd.Function):
    """out = mix_weight @ x + mix_bias per pixel (ActNorm + 1x1 conv folded), exact float32."""

    @staticmethod
    def forward(ctx, x, mix_weight, mix_bias):
        ctx.save_for_backward(x, mix_weight)
        return channel_mix_forward(x, mix_weight, mix_bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, mix_weight = ctx.saved_tensors
        _, grad_x, grad_w, grad_b = channel_mix_backward(None, grad_out, mix_weight, x=x)
        return grad_x, grad_w, grad_b
