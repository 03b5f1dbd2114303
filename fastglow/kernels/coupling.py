"""The coupling combine of a flow step: backward kernel (rebuilding the coupling input from its output),
launcher, and the ``fastglow::`` ops of the coupling alone, of the coupling fused with the next step's channel
mix, of a step's inverse, and of the coupling's backward (the forward kernel is :mod:`.flow_step`'s).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .channel_mix import channel_mix_grad
from .flow_step import coupling_mix_forward, sigmoid_parts
from .tiling import elementwise_tiles, grid_tile
from .utils import check_coupling, check_tensor, call, fake_or_meta, register_autograd


@triton.jit
def _coupling_bwd_kernel(
    out_ptr, gout_ptr, h_ptr, zs_ptr, gld_ptr, y_ptr, gy_ptr, gh_ptr, gzs_ptr,
    C, P, HALF, N_PB,
    AFFINE: tl.constexpr, HAS_GLD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """From the coupling output and its gradient: recompute the input y, and give dy, d h_raw, partial d zscale.
    Program (j, q, b): b-half channels j*BLOCK_H.. (and the a-half channels they pair with), pixels q-block of
    sample b; its d zscale partial goes to row b * N_PB + q."""
    b, _, pid_p, offs_j, mj, offs_p, mp = grid_tile(HALF, P, BLOCK_H, BLOCK_P)
    mask = mj[:, None] & mp[None, :]
    a_off = b * C * P + offs_j[:, None] * P + offs_p[None, :]  # a-half; b-half is + HALF * P
    b_off = a_off + HALF * P
    tl.store(y_ptr + a_off, tl.load(out_ptr + a_off, mask=mask, other=0.0), mask=mask)
    tl.store(gy_ptr + a_off, tl.load(gout_ptr + a_off, mask=mask, other=0.0), mask=mask)
    ob = tl.load(out_ptr + b_off, mask=mask, other=0.0)
    gob = tl.load(gout_ptr + b_off, mask=mask, other=0.0)
    part_row = gzs_ptr + (b * N_PB + pid_p) * (2 * HALF if AFFINE else HALF)

    if AFFINE:
        h_off = b * (2 * HALF) * P + offs_j[:, None] * P + offs_p[None, :]
        zs_s = tl.load(zs_ptr + offs_j, mask=mj, other=0.0)
        zs_t = tl.load(zs_ptr + HALF + offs_j, mask=mj, other=0.0)
        es = tl.exp(3.0 * zs_s)[:, None]
        et = tl.exp(3.0 * zs_t)[:, None]
        raw_s = tl.load(h_ptr + h_off, mask=mask, other=0.0)
        raw_t = tl.load(h_ptr + h_off + HALF * P, mask=mask, other=0.0)
        log_s = raw_s * es
        t = raw_t * et
        s, _logsig, one_minus_s = sigmoid_parts(log_s + 2.0)
        tl.store(y_ptr + b_off, ob / s - t, mask=mask)
        g_t = gob * s  # = d y_b
        tl.store(gy_ptr + b_off, g_t, mask=mask)
        g_log_s = gob * ob * one_minus_s  # (y_b + t) s (1 - s) = y_b' (1 - s)
        if HAS_GLD:
            g_log_s += tl.load(gld_ptr + b) * one_minus_s
        g_log_s = tl.where(mask, g_log_s, 0.0)
        g_t = tl.where(mask, g_t, 0.0)
        tl.store(gh_ptr + h_off, g_log_s * es, mask=mask)
        tl.store(gh_ptr + h_off + HALF * P, g_t * et, mask=mask)
        tl.store(part_row + offs_j, tl.sum(g_log_s * log_s, axis=1) * 3.0, mask=mj)
        tl.store(part_row + HALF + offs_j, tl.sum(g_t * t, axis=1) * 3.0, mask=mj)
    else:
        h_off = b * HALF * P + offs_j[:, None] * P + offs_p[None, :]
        e = tl.exp(3.0 * tl.load(zs_ptr + offs_j, mask=mj, other=0.0))[:, None]
        raw = tl.load(h_ptr + h_off, mask=mask, other=0.0)
        tl.store(y_ptr + b_off, ob - raw * e, mask=mask)
        tl.store(gy_ptr + b_off, gob, mask=mask)
        tl.store(gh_ptr + h_off, gob * e, mask=mask)
        tl.store(part_row + offs_j, tl.sum(gob * raw * e, axis=1) * 3.0, mask=mj)



# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------
def coupling_backward(out, grad_out, h_raw, zscale, grad_logdet=None, *, affine: bool):
    """Backward of ``coupling_combine`` from its output: returns (y, grad_y, grad_h_raw, grad_zscale).

    y is the recomputed coupling input (uncombine of ``out``). grad_y's a-half is grad_out's a-half only (the
    path through the coupling network is added by autograd outside). Affine: dy_b = g s, dt = g s,
    dlog_s = g y_b' (1 - s) + grad_logdet[b] (1 - s); then d h_raw = dh exp(3 zs), d zs = sum_{b,p} dh h 3.
    """
    out = check_tensor("out", out, dim=4)
    grad_out = check_tensor("grad_out", grad_out, out.dtype, out.device, 4)
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} != out shape {tuple(out.shape)}")
    zshape = zscale.shape if isinstance(zscale, torch.Tensor) else None
    h_raw, zs = check_coupling(out, h_raw, zscale, affine)
    b, c, hh, ww = out.shape
    if grad_logdet is not None:
        grad_logdet = check_tensor("grad_logdet", grad_logdet, out.dtype, out.device).reshape(-1)
        if grad_logdet.numel() != b:
            raise ValueError(f"grad_logdet must have {b} elements, got {grad_logdet.numel()}")
    p, half, c_h = hh * ww, c // 2, zs.numel()
    tiles = elementwise_tiles(half, b, p, out.dtype)
    y, grad_y, grad_h = torch.empty_like(out), torch.empty_like(out), torch.empty_like(h_raw)
    part = out.new_zeros((b * tiles.n_pix, c_h))
    if b * p > 0:
        _coupling_bwd_kernel[tiles.grid(b)](
            out, grad_out, h_raw, zs, grad_logdet if grad_logdet is not None and affine else out,
            y, grad_y, grad_h, part, c, p, half, tiles.n_pix,
            AFFINE=bool(affine), HAS_GLD=grad_logdet is not None and bool(affine),
            BLOCK_H=tiles.block_rows, BLOCK_P=tiles.block_p, num_warps=tiles.num_warps,
        )
    return y, grad_y, grad_h, part.sum(0).reshape(zshape)


# ----------------------------------------------------------------------------------------------
# op registration: fastglow::coupling, ::coupling_mix, ::coupling_mix_inverse, ::coupling_backward (opaque to
# the compiler: the launchers pick their tiles from concrete shapes)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastglow::coupling", mutates_args=())
def coupling(y: torch.Tensor, h_raw: torch.Tensor, zscale: torch.Tensor, affine: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """out = cat(y_a, combine(y_b, h_raw * exp(3 zscale))), logdet [B]; backward rebuilds y from out."""
    return _coupling(y, h_raw, zscale, affine)


def _coupling(y, h_raw, zscale, affine):
    _, out, logdet = coupling_mix_forward(y, h_raw, zscale, affine=affine)
    return out, logdet


@torch.library.custom_op("fastglow::coupling_mix", mutates_args=())
def coupling_mix_op(y: torch.Tensor, h_raw: torch.Tensor, zscale: torch.Tensor, mix_weight: torch.Tensor,
                    mix_bias: torch.Tensor, affine: bool, store: bool, input_precision: str = "ieee"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coupling of step k fused with the ActNorm + 1x1 mix of step k+1 in one pass: (mixed = mix_weight @
    cat(y_a, combine(y_b, h)) + mix_bias, logdet [B], coupled); ``store``: the coupled tensor (what the
    gradient needs) is written, else an empty tensor stands for it."""
    return _coupling_mix(y, h_raw, zscale, mix_weight, mix_bias, affine, store, input_precision)


def _coupling_mix(y, h_raw, zscale, mix_weight, mix_bias, affine, store, input_precision="ieee"):
    mixed, coupled, logdet = coupling_mix_forward(y, h_raw, zscale, mix_weight, mix_bias, affine=affine,
                                                  store_coupled=store, input_precision=input_precision)
    return mixed, logdet, coupled if store else y.new_empty(0)


def coupling_mix(y, h_raw, zscale, mix_weight, mix_bias, affine: bool, store: bool, input_precision: str = "ieee"):
    """:func:`coupling_mix_op` without its coupled tensor: (mixed, logdet [B])."""
    mixed, logdet, _ = call(coupling_mix_op, y, h_raw, zscale, mix_weight, mix_bias, affine, store, input_precision)
    return mixed, logdet


@torch.library.custom_op("fastglow::coupling_mix_inverse", mutates_args=())
def coupling_mix_inverse(out: torch.Tensor, h_raw: torch.Tensor, zscale: torch.Tensor,
                         mix_weight_inv: torch.Tensor, mix_bias_inv: torch.Tensor, affine: bool,
                         input_precision: str = "ieee") -> torch.Tensor:
    """One step inverted: mix_weight_inv @ cat(out_a, uncombine(out_b, h)) + mix_bias_inv. Not differentiable
    (a level's inverse runs the reference modules while autograd records)."""
    return _coupling_mix_inverse(out, h_raw, zscale, mix_weight_inv, mix_bias_inv, affine, input_precision)


def _coupling_mix_inverse(out, h_raw, zscale, mix_weight_inv, mix_bias_inv, affine, input_precision="ieee"):
    return coupling_mix_forward(out, h_raw, zscale, mix_weight_inv, mix_bias_inv, affine=affine, inverse=True,
                                input_precision=input_precision)[0]


@torch.library.custom_op("fastglow::coupling_backward", mutates_args=())
def coupling_grad(out: torch.Tensor, grad_out: torch.Tensor, h_raw: torch.Tensor, zscale: torch.Tensor,
                  grad_logdet: torch.Tensor | None, affine: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, grad_y, grad_h_raw, grad_zscale) of the coupling from its output (:func:`coupling_backward`)."""
    return _coupling_grad(out, grad_out, h_raw, zscale, grad_logdet, affine)


def _coupling_grad(out, grad_out, h_raw, zscale, grad_logdet, affine):
    return coupling_backward(out, grad_out, h_raw, zscale, grad_logdet, affine=affine)


def _coupling_shapes(y, *_):
    return y.new_empty(y.shape), y.new_empty(y.shape[:1])


def _coupling_mix_shapes(y, h_raw, zscale, mix_weight, mix_bias, affine, store, *_):
    mixed = y.new_empty((y.shape[0], mix_weight.shape[0], *y.shape[2:]))
    return mixed, y.new_empty(y.shape[:1]), y.new_empty(y.shape) if store else y.new_empty(0)


def _inverse_shape(out, h_raw, zscale, mix_weight_inv, *_):
    return out.new_empty((out.shape[0], mix_weight_inv.shape[0], *out.shape[2:]))


def _coupling_grad_shapes(out, grad_out, h_raw, zscale, *_):
    return tuple(t.new_empty(t.shape) for t in (out, out, h_raw, zscale))  # contiguous, as the launcher's


def _coupling_setup(ctx, inputs, output):
    ctx.affine = inputs[3]
    ctx.save_for_backward(output[0], inputs[1], inputs[2])


def _coupling_backprop(ctx, grad_out, grad_logdet):
    out, h_raw, zscale = ctx.saved_tensors
    _, grad_y, grad_h, grad_zs = coupling_grad(out, grad_out.contiguous(), h_raw, zscale, grad_logdet, ctx.affine)
    return grad_y, grad_h, grad_zs, None


def _coupling_mix_setup(ctx, inputs, output):
    ctx.affine, ctx.store, ctx.input_precision = inputs[5:8] if len(inputs) > 7 else (*inputs[5:7], "ieee")
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(output[2], inputs[1], inputs[2], inputs[3])


def _coupling_mix_backprop(ctx, grad_mixed, grad_logdet, _grad_coupled):
    if not ctx.store:
        raise RuntimeError("fastglow::coupling_mix ran with store=False: its coupled tensor was not kept")
    coupled, h_raw, zscale, mix_weight = ctx.saved_tensors
    grad_coupled, grad_w, grad_b = channel_mix_grad(grad_mixed.contiguous(), mix_weight, coupled, ctx.input_precision)
    _, grad_y, grad_h, grad_zs = coupling_grad(coupled, grad_coupled, h_raw, zscale, grad_logdet, ctx.affine)
    return grad_y, grad_h, grad_zs, grad_w, grad_b, None, None, None


coupling.register_fake(fake_or_meta(_coupling, _coupling_shapes))
coupling_mix_op.register_fake(fake_or_meta(_coupling_mix, _coupling_mix_shapes))
coupling_mix_inverse.register_fake(fake_or_meta(_coupling_mix_inverse, _inverse_shape))
coupling_grad.register_fake(fake_or_meta(_coupling_grad, _coupling_grad_shapes))
register_autograd(coupling, _coupling_backprop, _coupling_setup)
register_autograd(coupling_mix_op, _coupling_mix_backprop, _coupling_mix_setup)
