"""The fused forward kernel of a Glow flow step, shared by :mod:`.channel_mix` and :mod:`.coupling`:
coupling combine / uncombine of one step fused with the folded ActNorm + 1x1 conv (a per-pixel channel mix) of
the next, and its host launcher (the checks it shares with the other kernels are :mod:`.utils`'s).

Tensors are NCHW contiguous and seen as (B, C, P), P = H*W. A program owns a block of output channels and a
block of pixels of one sample and walks the input channels in chunks (coupling, then a small matmul per
chunk), so no tile holds all C channels; sizes come from :mod:`.tiling`'s register budget.

Maths (h = h_raw * exp(3 * zscale), halves y_a = y[:, :C/2], y_b = y[:, C/2:]):
    channel mix      out = mix_weight @ y + mix_bias      (the folded map: ActNorm + 1x1 conv,
                     mix_weight = W diag(scale), mix_bias = W (scale * loc); its inverse
                     y = mix_weight_inv @ out + mix_bias_inv, mix_weight_inv = diag(1/scale) W^-1, mix_bias_inv = -loc)
    affine coupling  log_s, t = h[:, :C/2], h[:, C/2:];  s = sigmoid(log_s + 2)
                     combine   y_b' = (y_b + t) s,  logdet[b] = sum_{c,p} log s;   uncombine  y_b = y_b' / s - t
    additive         y_b' = y_b + h  (logdet 0);                                   uncombine  y_b = y_b' - h
The channel mix is exact by default (``tl.dot(..., input_precision="ieee")``, never plain TF32, which breaks
invertibility); ``input_precision="tf32x3"`` (float32 only: three TF32 tensor-core products, ~float32 accuracy,
see benchmarks/studies/tf32_emulation.py) is an option until a GPU run decides. float64 always runs "ieee".
Reductions (logdet, d zscale, d mix_weight, d mix_bias) write one partial per program into a buffer that torch
sums afterwards: deterministic, no atomics; they accumulate in the input dtype (float32, or float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import elementwise_tiles, grid_tile, mix_tiles
from .utils import check_coupling, check_mix, check_tensor, dot_precision



# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def sigmoid_parts(u):
    """(s, log s, 1 - s) for s = sigmoid(u), stable for any u; log1p via Goldberg's trick (no libdevice)."""
    e = tl.exp(-tl.abs(u))
    w = 1.0 + e
    exact = w == 1.0
    log1p_e = tl.where(exact, e, tl.log(w) * (e / tl.where(exact, 1.0, w - 1.0)))
    big = 1.0 / w  # sigmoid(|u|)
    small = e / w  # sigmoid(-|u|)
    pos = u >= 0
    return tl.where(pos, big, small), tl.minimum(u, 0.0) - log1p_e, tl.where(pos, small, big)



@triton.jit
def coupled_chunk(x_ptr, h_ptr, zs_ptr, b, offs_c, offs_p, mp, C, P, HALF,
                  HAS_COUPLING: tl.constexpr, INVERSE: tl.constexpr, AFFINE: tl.constexpr):
    """Channels offs_c x pixels offs_p of sample b after the coupling (combine, or uncombine if INVERSE):
    -> (coupled, log s with zeros outside the b-half and the masks)."""
    mc = offs_c < C
    mask = mc[:, None] & mp[None, :]
    x = tl.load(x_ptr + b * C * P + offs_c[:, None] * P + offs_p[None, :], mask=mask, other=0.0)
    logsig = tl.zeros_like(x)
    if HAS_COUPLING:
        in_b = mc & (offs_c >= HALF)
        mb = in_b[:, None] & mp[None, :]
        j = tl.where(in_b, offs_c - HALF, 0)  # channel index within the b-half
        if AFFINE:
            h_base = h_ptr + b * (2 * HALF) * P
            es = tl.exp(3.0 * tl.load(zs_ptr + j, mask=in_b, other=0.0))
            et = tl.exp(3.0 * tl.load(zs_ptr + HALF + j, mask=in_b, other=0.0))
            log_s = tl.load(h_base + j[:, None] * P + offs_p[None, :], mask=mb, other=0.0) * es[:, None]
            t = tl.load(h_base + (HALF + j)[:, None] * P + offs_p[None, :], mask=mb, other=0.0) * et[:, None]
            s, ls, _one_minus_s = sigmoid_parts(log_s + 2.0)
            if INVERSE:
                yb = x / s - t
            else:
                yb = (x + t) * s
            logsig = tl.where(mb, ls, 0.0)
        else:
            e = tl.exp(3.0 * tl.load(zs_ptr + j, mask=in_b, other=0.0))
            h = tl.load(h_ptr + b * HALF * P + j[:, None] * P + offs_p[None, :], mask=mb, other=0.0) * e[:, None]
            if INVERSE:
                yb = x - h
            else:
                yb = x + h
        x = tl.where(mb, yb, x)
    return x, logsig


@triton.jit
def _flow_step_fwd_kernel(
    x_ptr, h_ptr, zs_ptr, w_ptr, bias_ptr, mixed_ptr, coupled_ptr, ld_ptr,
    C, C_OUT, P, HALF, N_PB,
    HAS_COUPLING: tl.constexpr, INVERSE: tl.constexpr, AFFINE: tl.constexpr, HAS_MIX: tl.constexpr,
    STORE_COUPLED: tl.constexpr, LOGDET: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Program (o, q, b): coupled = combine/uncombine(x, h) (or x) over chunks of BLOCK_C channels of pixel
    block q of sample b; mixed[o-block] = sum over chunks mix_weight[o-block, chunk] @ coupled[chunk] + mix_bias.
    The o == 0 program also stores coupled (STORE_COUPLED) and the logdet partial sum log s (LOGDET)."""
    b, pid_o, pid_p, offs_o, mo, offs_p, mp = grid_tile(C_OUT, P, BLOCK_O, BLOCK_P)
    first = pid_o == 0
    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=x_ptr.dtype.element_ty)
    ld = tl.zeros((BLOCK_P,), dtype=x_ptr.dtype.element_ty)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x, logsig = coupled_chunk(x_ptr, h_ptr, zs_ptr, b, offs_c, offs_p, mp, C, P, HALF,
                                  HAS_COUPLING, INVERSE, AFFINE)
        if LOGDET:
            ld += tl.sum(logsig, axis=0)
        if STORE_COUPLED:
            if first:
                tl.store(coupled_ptr + b * C * P + offs_c[:, None] * P + offs_p[None, :], x,
                         mask=(offs_c < C)[:, None] & mp[None, :])
        if HAS_MIX:
            w = tl.load(w_ptr + offs_o[:, None] * C + offs_c[None, :], mask=mo[:, None] & (offs_c < C)[None, :],
                        other=0.0)
            acc = tl.dot(w, x, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    if LOGDET:
        if first:
            tl.store(ld_ptr + b * N_PB + pid_p, tl.sum(ld, axis=0))
    if HAS_MIX:
        acc += tl.load(bias_ptr + offs_o, mask=mo, other=0.0)[:, None]
        tl.store(mixed_ptr + b * C_OUT * P + offs_o[:, None] * P + offs_p[None, :], acc,
                 mask=mo[:, None] & mp[None, :])


# ----------------------------------------------------------------------------------------------
# Host helpers and launcher
# ----------------------------------------------------------------------------------------------
def launch_forward(x, h_raw, zscale, mix_weight, mix_bias, *, coupling, inverse, affine, store_coupled,
                   input_precision="ieee"):
    """Launch :func:`_flow_step_fwd_kernel` on checked operands: -> (mixed, coupled, logdet [B] or None)."""
    b, c, hh, ww = x.shape
    p = hh * ww
    has_mix = mix_weight is not None
    c_out = mix_weight.shape[0] if has_mix else c
    logdet = coupling and affine and not inverse
    precision = dot_precision(input_precision, x.dtype) if has_mix else "ieee"  # no dot: one specialisation
    tiles = mix_tiles(c_out, b, p, x.dtype) if has_mix else elementwise_tiles(c, b, p, x.dtype, rows_in_grid=False)
    mixed = x.new_empty((b, c_out, hh, ww)) if has_mix else None
    coupled = x.new_empty(x.shape) if store_coupled else None
    ld = x.new_zeros((b, tiles.n_pix)) if logdet else None
    if b * p > 0:
        _flow_step_fwd_kernel[tiles.grid(b)](
            x, h_raw if coupling else x, zscale if coupling else x, mix_weight if has_mix else x,
            mix_bias if has_mix else x, mixed if has_mix else x, coupled if store_coupled else x, ld if logdet else x,
            c, c_out, p, c // 2, tiles.n_pix,
            HAS_COUPLING=coupling, INVERSE=inverse, AFFINE=affine, HAS_MIX=has_mix,
            STORE_COUPLED=store_coupled, LOGDET=logdet,
            BLOCK_C=tiles.block_k, BLOCK_O=tiles.block_rows, BLOCK_P=tiles.block_p,
            INPUT_PRECISION=precision, num_warps=tiles.num_warps,
        )
    return mixed, coupled, (ld.sum(1) if logdet else None)


def coupling_mix_forward(y, h_raw, zscale, mix_weight=None, mix_bias=None, *, affine: bool, inverse: bool = False,
                         store_coupled: bool = False, input_precision: str = "ieee"):
    """Coupling (combine, or uncombine if ``inverse``) of y with h = h_raw * exp(3 zscale), then optionally the
    channel mix ``mix_weight @ coupled + mix_bias`` in the same pass.

    Returns ``(mixed or None, coupled or None, logdet)``: ``coupled`` when ``store_coupled`` or no mix_weight;
    ``logdet`` [B] = sum log s in a forward pass (zeros if additive), None when ``inverse``.
    """
    y = check_tensor("y", y, dim=4)
    h_raw, zscale = check_coupling(y, h_raw, zscale, affine)
    if mix_weight is not None:
        mix_weight, mix_bias = check_mix(mix_weight, mix_bias, y.shape[1], y)
    elif mix_bias is not None:
        raise ValueError("mix_bias given without mix_weight")
    mixed, coupled, logdet = launch_forward(y, h_raw, zscale, mix_weight, mix_bias, coupling=True,
                                            inverse=bool(inverse), affine=bool(affine),
                                            store_coupled=bool(store_coupled) or mix_weight is None,
                                            input_precision=input_precision)
    if logdet is None and not inverse:
        logdet = y.new_zeros(y.shape[0])
    return mixed, coupled, logdet
