"""The folded ActNorm + 1x1 conv as a per-pixel channel mix, out = mix_weight @ x + mix_bias: forward (the
fused kernel of :mod:`.flow_step` without a coupling), backward kernels, launchers and the ``fastglow::`` ops.

Backward (optionally rebuilding x = mix_weight_inv @ out + mix_bias_inv first, for reversible backprop):
    grad_x = mix_weight^T grad_out                                       (_channel_mix_bwd_kernel)
    grad_mix_weight = sum_{b,p} grad_out x^T,  grad_mix_bias = sum_{b,p} grad_out   (_channel_mix_wgrad_kernel:
    each program sums a run of pixel tiles into one partial; torch adds the few partials)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flow_step import launch_forward
from .tiling import grid_tile, mix_tiles, weight_grad_tiles
from .utils import check_mix, check_tensor, dot_precision, fake_or_meta, register_autograd


@triton.jit
def _channel_mix_bwd_kernel(
    y_ptr, gy_ptr, w_ptr, winv_ptr, binv_ptr, x_ptr, gx_ptr,
    C_IN, C_OUT, P,
    RECOMPUTE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """y = M x + m (M, m: mix_weight, mix_bias). Program (i, q, b), input channels i-block, pixels q-block of
    sample b, summing over chunks of BLOCK_K output channels o: dx = sum_o M[o, i]^T dy[o] and (RECOMPUTE)
    x = sum_o M_inv[i, o] y[o] + m_inv[i]."""
    b, _, _, offs_i, mi, offs_p, mp = grid_tile(C_IN, P, BLOCK_I, BLOCK_P)
    gx = tl.zeros((BLOCK_I, BLOCK_P), dtype=gy_ptr.dtype.element_ty)
    x = tl.zeros((BLOCK_I, BLOCK_P), dtype=gy_ptr.dtype.element_ty)
    for o0 in range(0, C_OUT, BLOCK_K):
        offs_o = o0 + tl.arange(0, BLOCK_K)
        mo = offs_o < C_OUT
        o_off = b * C_OUT * P + offs_o[:, None] * P + offs_p[None, :]
        g = tl.load(gy_ptr + o_off, mask=mo[:, None] & mp[None, :], other=0.0)
        w_t = tl.load(w_ptr + offs_o[None, :] * C_IN + offs_i[:, None], mask=mi[:, None] & mo[None, :], other=0.0)
        gx = tl.dot(w_t, g, gx, input_precision=INPUT_PRECISION, out_dtype=gx.dtype)
        if RECOMPUTE:
            y = tl.load(y_ptr + o_off, mask=mo[:, None] & mp[None, :], other=0.0)
            winv = tl.load(winv_ptr + offs_i[:, None] * C_OUT + offs_o[None, :], mask=mi[:, None] & mo[None, :],
                           other=0.0)
            x = tl.dot(winv, y, x, input_precision=INPUT_PRECISION, out_dtype=x.dtype)
    mask = mi[:, None] & mp[None, :]
    i_off = b * C_IN * P + offs_i[:, None] * P + offs_p[None, :]
    tl.store(gx_ptr + i_off, gx, mask=mask)
    if RECOMPUTE:
        tl.store(x_ptr + i_off, x + tl.load(binv_ptr + offs_i, mask=mi, other=0.0)[:, None], mask=mask)


@triton.jit
def _channel_mix_wgrad_kernel(
    gy_ptr, x_ptr, gw_ptr, gb_ptr,
    C_IN, C_OUT, P, N_PB, N_TILES, TILES_PER_PROGRAM,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Program (o, i, s): partial s of dM[o-block, i-block] = sum dy x^T and (i == 0) of dm[o-block] = sum dy,
    over the (sample, pixel-block) tiles s * TILES_PER_PROGRAM ... of the B x N_PB tiles."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mo = offs_o < C_OUT
    mi = offs_i < C_IN
    gw = tl.zeros((BLOCK_O, BLOCK_I), dtype=gy_ptr.dtype.element_ty)
    gb = tl.zeros((BLOCK_O,), dtype=gy_ptr.dtype.element_ty)
    t0 = pid_s * TILES_PER_PROGRAM
    for t in range(t0, tl.minimum(t0 + TILES_PER_PROGRAM, N_TILES)):
        b = (t // N_PB).to(tl.int64)
        offs_p = (t % N_PB) * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = offs_p < P
        g = tl.load(gy_ptr + b * C_OUT * P + offs_o[:, None] * P + offs_p[None, :], mask=mo[:, None] & mp[None, :],
                    other=0.0)
        x = tl.load(x_ptr + b * C_IN * P + offs_i[:, None] * P + offs_p[None, :], mask=mi[:, None] & mp[None, :],
                    other=0.0)
        gw = tl.dot(g, tl.trans(x), gw, input_precision=INPUT_PRECISION, out_dtype=gw.dtype)
        gb += tl.sum(g, axis=1)
    tl.store(gw_ptr + pid_s * C_OUT * C_IN + offs_o[:, None] * C_IN + offs_i[None, :], gw,
             mask=mo[:, None] & mi[None, :])
    if pid_i == 0:
        tl.store(gb_ptr + pid_s * C_OUT + offs_o, gb, mask=mo)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def channel_mix_forward(x: torch.Tensor, mix_weight: torch.Tensor, mix_bias: torch.Tensor | None = None,
                        input_precision: str = "ieee"):
    """out[b, :, p] = mix_weight @ x[b, :, p] + mix_bias, exact ("ieee") or "tf32x3" (:func:`.dot_precision`).
    x: (B, C_in, H, W), mix_weight: (C_out, C_in)."""
    x = check_tensor("x", x, dim=4)
    mix_weight, mix_bias = check_mix(mix_weight, mix_bias, x.shape[1], x)
    mixed, _, _ = launch_forward(x, None, None, mix_weight, mix_bias, coupling=False, inverse=False,
                                 affine=False, store_coupled=False, input_precision=input_precision)
    return mixed


def channel_mix_backward(y, grad_y, mix_weight, mix_weight_inv=None, mix_bias_inv=None, x=None,
                         input_precision: str = "ieee"):
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
    precision = dot_precision(input_precision, grad_y.dtype)
    grad_x = grad_y.new_empty((b, c_in, hh, ww))
    tiles = mix_tiles(c_in, b, p, grad_y.dtype, accumulators=2 if recompute else 1)
    wg = weight_grad_tiles(c_in, c_out, b, p, grad_y.dtype)
    gw = grad_y.new_zeros((wg.split, c_out, c_in))
    gb = grad_y.new_zeros((wg.split, c_out))
    if b * p > 0:
        _channel_mix_bwd_kernel[tiles.grid(b)](
            y if recompute else grad_y, grad_y, mix_weight, mix_weight_inv if recompute else mix_weight,
            mix_bias_inv if recompute else mix_weight, x, grad_x, c_in, c_out, p,
            RECOMPUTE=recompute, BLOCK_I=tiles.block_rows, BLOCK_K=tiles.block_k, BLOCK_P=tiles.block_p,
            INPUT_PRECISION=precision, num_warps=tiles.num_warps,
        )
        _channel_mix_wgrad_kernel[wg.grid](
            grad_y, x, gw, gb, c_in, c_out, p, wg.n_pix, b * wg.n_pix, wg.tiles_per_program,
            BLOCK_O=wg.block_o, BLOCK_I=wg.block_i, BLOCK_P=wg.block_p, INPUT_PRECISION=precision,
            num_warps=wg.num_warps,
        )
    return x, grad_x, gw.sum(0), gb.sum(0)


# ----------------------------------------------------------------------------------------------
# op registration: fastglow::channel_mix and its backwards (opaque to the compiler)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastglow::channel_mix", mutates_args=())
def channel_mix(x: torch.Tensor, mix_weight: torch.Tensor, mix_bias: torch.Tensor | None = None,
                input_precision: str = "ieee") -> torch.Tensor:
    """out = mix_weight @ x + mix_bias per pixel (ActNorm + 1x1 conv folded), "ieee" (exact) or "tf32x3"."""
    return channel_mix_forward(x, mix_weight, mix_bias, input_precision)


@torch.library.custom_op("fastglow::channel_mix_backward", mutates_args=())
def channel_mix_grad(grad_y: torch.Tensor, mix_weight: torch.Tensor, x: torch.Tensor,
                     input_precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_mix_weight, grad_mix_bias) of :func:`channel_mix` at its input x."""
    return _channel_mix_grad(grad_y, mix_weight, x, input_precision)


def _channel_mix_grad(grad_y, mix_weight, x, input_precision="ieee"):
    return channel_mix_backward(None, grad_y, mix_weight, x=x, input_precision=input_precision)[1:]


@torch.library.custom_op("fastglow::channel_mix_rebuild_backward", mutates_args=())
def channel_mix_rebuild_grad(y: torch.Tensor, grad_y: torch.Tensor, mix_weight: torch.Tensor,
                             mix_weight_inv: torch.Tensor, mix_bias_inv: torch.Tensor, input_precision: str = "ieee"
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, grad_x, grad_mix_weight, grad_mix_bias): the mix input rebuilt from its output, x = mix_weight_inv @ y
    + mix_bias_inv, and the mix's vector-Jacobian product there (reversible backprop)."""
    return _channel_mix_rebuild_grad(y, grad_y, mix_weight, mix_weight_inv, mix_bias_inv, input_precision)


def _channel_mix_rebuild_grad(y, grad_y, mix_weight, mix_weight_inv, mix_bias_inv, input_precision="ieee"):
    return channel_mix_backward(y, grad_y, mix_weight, mix_weight_inv, mix_bias_inv, input_precision=input_precision)


def _mix_shape(x, mix_weight, *_):
    return x.new_empty((x.shape[0], mix_weight.shape[0], *x.shape[2:]))


def _grad_shapes(grad_y, mix_weight, x, *_):
    return x.new_empty(x.shape), mix_weight.new_empty(mix_weight.shape), mix_weight.new_empty(mix_weight.shape[:1])


def _rebuild_grad_shapes(y, grad_y, mix_weight, *_):
    x = y.new_empty((y.shape[0], mix_weight.shape[1], *y.shape[2:]))
    grad_w = mix_weight.new_empty(mix_weight.shape)  # contiguous whatever mix_weight's strides, as the launcher's
    return x, x.new_empty(x.shape), grad_w, mix_weight.new_empty(mix_weight.shape[:1])


def _mix_setup(ctx, inputs, output):
    x, mix_weight, mix_bias, ctx.input_precision = inputs
    ctx.has_bias = mix_bias is not None
    ctx.save_for_backward(x, mix_weight)


def _mix_grad(ctx, grad_out):
    x, mix_weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = channel_mix_grad(grad_out.contiguous(), mix_weight, x, ctx.input_precision)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None


channel_mix.register_fake(fake_or_meta(channel_mix_forward, _mix_shape))
channel_mix_grad.register_fake(fake_or_meta(_channel_mix_grad, _grad_shapes))
channel_mix_rebuild_grad.register_fake(fake_or_meta(_channel_mix_rebuild_grad, _rebuild_grad_shapes))
register_autograd(channel_mix, _mix_grad, _mix_setup)
