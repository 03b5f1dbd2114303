"""Fused Triton kernels for one Glow flow step: folded ActNorm + 1x1 conv (a per-pixel channel mix) and the
coupling combine / uncombine, forward, inverse and backward.

Tensors are NCHW contiguous and seen as (B, C, P), P = H*W. A program owns one batch sample and a block of
pixels with *all* channels (padded to a power of two, masked), so the channel mix is a small matmul per tile.

Maths (h = h_raw * exp(3 * zscale), halves y_a = y[:, :C/2], y_b = y[:, C/2:]):
    channel mix      out = M y + c                 (ActNorm + 1x1 folded: M = W diag(scale), c = W (scale * loc))
    affine coupling  log_s, t = h[:, :C/2], h[:, C/2:];  s = sigmoid(log_s + 2)
                     combine   y_b' = (y_b + t) s,  logdet[b] = sum_{c,p} log s;   uncombine  y_b = y_b' / s - t
    additive         y_b' = y_b + h  (logdet 0);                                   uncombine  y_b = y_b' - h
The channel mix is exact (``tl.dot(..., input_precision="ieee")``, never TF32) so steps invert to rounding.
Reductions (logdet, d zscale, d weight, d bias) write one partial per program into a buffer that torch sums
afterwards: deterministic, no atomics; they accumulate in the input dtype (float32, or float64 for float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid_parts(u):
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
def _flow_step_fwd_kernel(
    x_ptr, h_ptr, zs_ptr, w_ptr, bias_ptr, mixed_ptr, coupled_ptr, ld_ptr,
    C, C_OUT, P, HALF, N_PB,
    HAS_COUPLING: tl.constexpr, INVERSE: tl.constexpr, AFFINE: tl.constexpr, HAS_MIX: tl.constexpr,
    STORE_COUPLED: tl.constexpr, LOGDET: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """coupled = combine/uncombine(x, h) (or x); optionally store it; mixed = M coupled + bias per pixel."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mc = offs_c < C
    mp = offs_p < P
    mask = mc[:, None] & mp[None, :]
    x = tl.load(x_ptr + b * C * P + offs_c[:, None] * P + offs_p[None, :], mask=mask, other=0.0)

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
            s, logsig, _one_minus_s = _sigmoid_parts(log_s + 2.0)
            if INVERSE:
                yb = x / s - t
            else:
                yb = (x + t) * s
            if LOGDET:
                part = tl.sum(tl.sum(tl.where(mb, logsig, 0.0), axis=1), axis=0)
                tl.store(ld_ptr + b * N_PB + pid_p, part)
        else:
            e = tl.exp(3.0 * tl.load(zs_ptr + j, mask=in_b, other=0.0))
            h = tl.load(h_ptr + b * HALF * P + j[:, None] * P + offs_p[None, :], mask=mb, other=0.0) * e[:, None]
            if INVERSE:
                yb = x - h
            else:
                yb = x + h
        x = tl.where(mb, yb, x)

    if STORE_COUPLED:
        tl.store(coupled_ptr + b * C * P + offs_c[:, None] * P + offs_p[None, :], x, mask=mask)

    if HAS_MIX:
        for o0 in range(0, C_OUT, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            mo = offs_o < C_OUT
            w = tl.load(w_ptr + offs_o[:, None] * C + offs_c[None, :], mask=mo[:, None] & mc[None, :], other=0.0)
            acc = tl.dot(w, x, input_precision="ieee")
            acc += tl.load(bias_ptr + offs_o, mask=mo, other=0.0)[:, None]
            tl.store(mixed_ptr + b * C_OUT * P + offs_o[:, None] * P + offs_p[None, :], acc,
                     mask=mo[:, None] & mp[None, :])


@triton.jit
def _coupling_bwd_kernel(
    out_ptr, gout_ptr, h_ptr, zs_ptr, gld_ptr, y_ptr, gy_ptr, gh_ptr, gzs_ptr,
    C, P, HALF, N_PB,
    AFFINE: tl.constexpr, HAS_GLD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """From the coupling output and its gradient: recompute the input y, and give dy, d h_raw, partial d zscale."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_H)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mj = offs_j < HALF
    mp = offs_p < P
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
        s, _logsig, one_minus_s = _sigmoid_parts(log_s + 2.0)
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


@triton.jit
def _channel_mix_bwd_kernel(
    y_ptr, gy_ptr, w_ptr, winv_ptr, binv_ptr, x_ptr, gx_ptr, gw_ptr, gb_ptr,
    C_IN, C_OUT, P, N_PB,
    RECOMPUTE: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = W x + c: (optionally) x = W_inv y + c_inv; dx = W^T dy; partial dW = dy x^T and dc = sum dy per tile."""
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
def _check(name, t, dtype=None, device=None, dim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} like the activation")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t.contiguous()


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _block_p(p: int, channels_pow2: int, budget: int = 8192) -> int:
    """Pixels per tile: up to `budget` elements of a (channels x pixels) tile, at least 16 (tl.dot)."""
    return max(16, min(_pow2(p), 128, budget // channels_pow2))


def _check_mix(weight, bias, c_in, x):
    weight = _check("weight", weight, x.dtype, x.device, 2)
    if weight.shape[1] != c_in:
        raise ValueError(f"weight must have shape (C_out, {c_in}), got {tuple(weight.shape)}")
    if bias is None:
        return weight, weight.new_zeros(weight.shape[0])
    bias = _check("bias", bias, x.dtype, x.device).reshape(-1)
    if bias.numel() != weight.shape[0]:
        raise ValueError(f"bias must have {weight.shape[0]} elements, got {bias.numel()}")
    return weight, bias


def _check_coupling(y, h_raw, zscale, affine):
    b, c, hh, ww = y.shape
    if c % 2:
        raise ValueError(f"coupling needs an even channel count, got C={c}")
    c_h = c if affine else c // 2
    h_raw = _check("h_raw", h_raw, y.dtype, y.device, 4)
    if tuple(h_raw.shape) != (b, c_h, hh, ww):
        raise ValueError(f"h_raw must have shape {(b, c_h, hh, ww)} (affine={affine}), got {tuple(h_raw.shape)}")
    zscale = _check("zscale", zscale, y.dtype, y.device)
    if zscale.numel() != c_h:
        raise ValueError(f"zscale must have {c_h} elements (affine={affine}), got {zscale.numel()}")
    return h_raw, zscale.reshape(-1)


def _launch_fwd(x, h_raw, zscale, weight, bias, *, coupling, inverse, affine, store_coupled):
    b, c, hh, ww = x.shape
    p = hh * ww
    has_mix = weight is not None
    c_out = weight.shape[0] if has_mix else c
    logdet = coupling and affine and not inverse
    block_c = _pow2(c)
    block_p = _block_p(p, block_c)
    n_pb = triton.cdiv(p, block_p)
    mixed = x.new_empty((b, c_out, hh, ww)) if has_mix else None
    coupled = x.new_empty(x.shape) if store_coupled else None
    ld = x.new_zeros((b, n_pb)) if logdet else None
    if b * p > 0:
        _flow_step_fwd_kernel[(n_pb, b)](
            x, h_raw if coupling else x, zscale if coupling else x, weight if has_mix else x,
            bias if has_mix else x, mixed if has_mix else x, coupled if store_coupled else x, ld if logdet else x,
            c, c_out, p, c // 2, n_pb,
            HAS_COUPLING=coupling, INVERSE=inverse, AFFINE=affine, HAS_MIX=has_mix,
            STORE_COUPLED=store_coupled, LOGDET=logdet,
            BLOCK_C=block_c, BLOCK_O=max(16, min(64, 8192 // block_c)), BLOCK_P=block_p,
        )
    return mixed, coupled, (ld.sum(1) if logdet else None)


def channel_mix_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, :, p] = weight @ x[b, :, p] + bias, exact (no TF32). x: (B, C_in, H, W), weight: (C_out, C_in)."""
    x = _check("x", x, dim=4)
    weight, bias = _check_mix(weight, bias, x.shape[1], x)
    mixed, _, _ = _launch_fwd(x, None, None, weight, bias, coupling=False, inverse=False, affine=False,
                              store_coupled=False)
    return mixed


def coupling_mix_forward(y, h_raw, zscale, weight=None, bias=None, *, affine: bool, inverse: bool = False,
                         store_coupled: bool = False):
    """Coupling (combine, or uncombine if ``inverse``) of y with h = h_raw * exp(3 zscale), then optionally the
    channel mix ``weight @ coupled + bias`` in the same pass.

    Returns ``(mixed or None, coupled or None, logdet)``: ``coupled`` when ``store_coupled`` or no weight;
    ``logdet`` [B] = sum log s in a forward pass (zeros if additive), None when ``inverse``.
    """
    y = _check("y", y, dim=4)
    h_raw, zscale = _check_coupling(y, h_raw, zscale, affine)
    if weight is not None:
        weight, bias = _check_mix(weight, bias, y.shape[1], y)
    elif bias is not None:
        raise ValueError("bias given without weight")
    mixed, coupled, logdet = _launch_fwd(y, h_raw, zscale, weight, bias, coupling=True, inverse=bool(inverse),
                                         affine=bool(affine), store_coupled=bool(store_coupled) or weight is None)
    if logdet is None and not inverse:
        logdet = y.new_zeros(y.shape[0])
    return mixed, coupled, logdet


def coupling_backward(out, grad_out, h_raw, zscale, grad_logdet=None, *, affine: bool):
    """Backward of ``coupling_combine`` from its output: returns (y, grad_y, grad_h_raw, grad_zscale).

    y is the recomputed coupling input (uncombine of ``out``). grad_y's a-half is grad_out's a-half only (the
    path through the coupling network is added by autograd outside). Affine: dy_b = g s, dt = g s,
    dlog_s = g y_b' (1 - s) + grad_logdet[b] (1 - s); then d h_raw = dh exp(3 zs), d zs = sum_{b,p} dh h 3.
    """
    out = _check("out", out, dim=4)
    grad_out = _check("grad_out", grad_out, out.dtype, out.device, 4)
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} != out shape {tuple(out.shape)}")
    zshape = zscale.shape if isinstance(zscale, torch.Tensor) else None
    h_raw, zs = _check_coupling(out, h_raw, zscale, affine)
    b, c, hh, ww = out.shape
    if grad_logdet is not None:
        grad_logdet = _check("grad_logdet", grad_logdet, out.dtype, out.device).reshape(-1)
        if grad_logdet.numel() != b:
            raise ValueError(f"grad_logdet must have {b} elements, got {grad_logdet.numel()}")
    p, half, c_h = hh * ww, c // 2, zs.numel()
    block_h = _pow2(half, lo=1)
    block_p = _block_p(p, block_h, budget=4096)
    n_pb = triton.cdiv(p, block_p)
    y, grad_y, grad_h = torch.empty_like(out), torch.empty_like(out), torch.empty_like(h_raw)
    part = out.new_zeros((b * n_pb, c_h))
    if b * p > 0:
        _coupling_bwd_kernel[(n_pb, b)](
            out, grad_out, h_raw, zs, grad_logdet if grad_logdet is not None and affine else out,
            y, grad_y, grad_h, part, c, p, half, n_pb,
            AFFINE=bool(affine), HAS_GLD=grad_logdet is not None and bool(affine),
            BLOCK_H=block_h, BLOCK_P=block_p,
        )
    return y, grad_y, grad_h, part.sum(0).reshape(zshape)


def channel_mix_backward(y, grad_y, weight, inv_weight=None, inv_bias=None, x=None):
    """Backward of y = weight @ x + bias per pixel: returns (x, grad_x, grad_weight, grad_bias).

    With ``x`` None the input is recomputed as x = inv_weight @ y + inv_bias (reversible backprop).
    grad_x = weight^T grad_y; grad_weight = sum_{b,p} grad_y x^T; grad_bias = sum_{b,p} grad_y.
    """
    grad_y = _check("grad_y", grad_y, dim=4)
    b, c_out, hh, ww = grad_y.shape
    weight = _check("weight", weight, grad_y.dtype, grad_y.device, 2)
    if weight.shape[0] != c_out:
        raise ValueError(f"weight must have shape ({c_out}, C_in), got {tuple(weight.shape)}")
    c_in = weight.shape[1]
    recompute = x is None
    if recompute:
        y = _check("y", y, grad_y.dtype, grad_y.device, 4)
        if y.shape != grad_y.shape:
            raise ValueError(f"y shape {tuple(y.shape)} != grad_y shape {tuple(grad_y.shape)}")
        if inv_weight is None:
            raise ValueError("need x or inv_weight to recover the mix input")
        inv_weight = _check("inv_weight", inv_weight, grad_y.dtype, grad_y.device, 2)
        if tuple(inv_weight.shape) != (c_in, c_out):
            raise ValueError(f"inv_weight must have shape {(c_in, c_out)}, got {tuple(inv_weight.shape)}")
        inv_bias = inv_weight.new_zeros(c_in) if inv_bias is None else \
            _check("inv_bias", inv_bias, grad_y.dtype, grad_y.device).reshape(-1)
        if inv_bias.numel() != c_in:
            raise ValueError(f"inv_bias must have {c_in} elements, got {inv_bias.numel()}")
        x = grad_y.new_empty((b, c_in, hh, ww))
    else:
        x = _check("x", x, grad_y.dtype, grad_y.device, 4)
        if tuple(x.shape) != (b, c_in, hh, ww):
            raise ValueError(f"x must have shape {(b, c_in, hh, ww)}, got {tuple(x.shape)}")
    p = hh * ww
    block_co = _pow2(c_out)
    block_p = _block_p(p, block_co, budget=4096)
    n_pb = triton.cdiv(p, block_p)
    grad_x = grad_y.new_empty((b, c_in, hh, ww))
    gw = grad_y.new_zeros((b * n_pb, c_out, c_in))
    gb = grad_y.new_zeros((b * n_pb, c_out))
    if b * p > 0:
        _channel_mix_bwd_kernel[(n_pb, b)](
            y if recompute else grad_y, grad_y, weight, inv_weight if recompute else weight,
            inv_bias if recompute else weight, x, grad_x, gw, gb, c_in, c_out, p, n_pb,
            RECOMPUTE=recompute, BLOCK_CO=block_co, BLOCK_I=max(16, min(_pow2(c_in), 8192 // block_co)),
            BLOCK_P=block_p,
        )
    return x, grad_x, gw.sum(0), gb.sum(0)
