"""All flow steps' LU-parameterised 1x1-conv weights in one launch (forward) and one launch (backward).

For S steps with the same channel count C, stacked along dim 0 (see :class:`fastglow.reference.InvConv2dLU`)::

    L = strict_lower(w_l) + I        U = strict_upper(w_u) + diag(s_sign * exp(w_s))
    W = P L U                        W^-1 = U^-1 L^-1 P^T             log|det W| = sum(w_s)

P is given as a row permutation ``perm``: (P M)[i, :] = M[perm[i], :] (see :func:`perm_from_matrix`).
Entries of w_l / w_u outside their strict triangles are ignored and get zero gradient, as in the reference.
Everything is computed in the parameters' dtype (float32 or float64) with plain multiply-adds: no TF32.

Kernels work on (CP x BN) register tiles, CP = next_power_of_2(C), with masks for the padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import lu_tiles
from .utils import fake_or_meta, register_autograd

__all__ = ["perm_from_matrix", "lu_weight_forward", "lu_weight_backward", "lu_weight", "lu_weight_grad"]


@triton.jit
def _lu_weight_fwd_kernel(perm_ptr, wl_ptr, wu_ptr, ws_ptr, sign_ptr, w_ptr, winv_ptr, logdet_ptr, C,
                          CP: tl.constexpr, BN: tl.constexpr, INVERSE: tl.constexpr):
    """Program (s, jb): columns jb*BN ... of W_s (and W_s^-1); logdet_s from jb == 0.

    W[:, J] = sum_k L[perm, k] U[k, J]                    (outer products; rows gathered through perm)
    W^-1[:, J] = U^-1 L^-1 E with E[r, j] = [r == perm[j]]  (since P^T e_j = e_perm[j]):
      forward substitution  y <- y - L[:, k] y[k, :]       for k = 0 .. C-1   (unit diagonal)
      back substitution     y[k, :] <- y[k, :] / U[k, k];  y <- y - U[:, k] y[k, :]  for k = C-1 .. 0
    """
    s = tl.program_id(0)
    jb = tl.program_id(1)
    dt = w_ptr.dtype.element_ty
    rows = tl.arange(0, CP)
    cols = jb * BN + tl.arange(0, BN)
    rmask = rows < C
    cmask = cols < C
    mat = s * C * C
    vec = s * C

    perm_r = tl.load(perm_ptr + vec + rows, mask=rmask, other=0)
    ws_c = tl.load(ws_ptr + vec + cols, mask=cmask, other=0.0).to(dt)
    d_c = tl.load(sign_ptr + vec + cols, mask=cmask, other=0.0).to(dt) * tl.exp(ws_c)

    acc = tl.zeros([CP, BN], dtype=dt)
    for k in range(0, C):
        l_k = tl.load(wl_ptr + mat + perm_r * C + k, mask=rmask & (perm_r > k), other=0.0).to(dt)
        l_k = tl.where(rmask & (perm_r == k), 1.0, l_k)
        u_k = tl.load(wu_ptr + mat + k * C + cols, mask=cmask & (cols > k), other=0.0).to(dt)
        u_k = tl.where(cols == k, d_c, u_k)
        acc += l_k[:, None] * u_k[None, :]
    out_mask = rmask[:, None] & cmask[None, :]
    out_offs = mat + rows[:, None] * C + cols[None, :]
    tl.store(w_ptr + out_offs, acc, mask=out_mask)

    ws_r = tl.load(ws_ptr + vec + rows, mask=rmask, other=0.0).to(dt)
    tl.store(logdet_ptr + s, tl.sum(ws_r, axis=0), mask=jb == 0)

    if INVERSE:
        perm_c = tl.load(perm_ptr + vec + cols, mask=cmask, other=-1)
        y = tl.where(rows[:, None] == perm_c[None, :], 1.0, 0.0).to(dt)
        for k in range(0, C):
            y_k = tl.sum(tl.where(rows[:, None] == k, y, 0.0), axis=0)
            l_k = tl.load(wl_ptr + mat + rows * C + k, mask=rmask & (rows > k), other=0.0).to(dt)
            y -= l_k[:, None] * y_k[None, :]
        for kk in range(0, C):
            k = C - 1 - kk
            d_k = tl.load(sign_ptr + vec + k).to(dt) * tl.exp(tl.load(ws_ptr + vec + k).to(dt))
            y_k = tl.sum(tl.where(rows[:, None] == k, y, 0.0), axis=0) / d_k
            u_k = tl.load(wu_ptr + mat + rows * C + k, mask=rows < k, other=0.0).to(dt)
            y = tl.where(rows[:, None] == k, y_k[None, :], y - u_k[:, None] * y_k[None, :])
        tl.store(winv_ptr + out_offs, y, mask=out_mask)


@triton.jit
def _lu_weight_bwd_kernel(perm_ptr, wl_ptr, wu_ptr, ws_ptr, sign_ptr, winv_ptr,
                          gw_ptr, gwinv_ptr, gld_ptr, gwl_ptr, gwu_ptr, gws_ptr, t_ptr, gm_ptr, C,
                          CP: tl.constexpr, BN: tl.constexpr, HAS_GW: tl.constexpr,
                          HAS_GWINV: tl.constexpr, HAS_GLD: tl.constexpr):
    """Program s: the whole backward of step s, in three phases over column blocks of BN.

    1. T = gWinv W^-T                                        (only with HAS_GWINV)
    2. G = gW - W^-T T  (= gW - W^-T gWinv W^-T);   gM = P^T G, i.e. gM[perm[i], :] = G[i, :]
    3. gU = L^T gM, gL = gM U^T;   grad_w_l = strict_lower(gL), grad_w_u = strict_upper(gU),
       grad_w_s = diag(gU) * s_sign * exp(w_s) + grad_logdet
    T and gM go through per-step scratch in global memory; a CTA barrier separates the phases.
    """
    s = tl.program_id(0)
    dt = gwl_ptr.dtype.element_ty
    rows = tl.arange(0, CP)
    rmask = rows < C
    mat = s * C * C
    vec = s * C
    perm_r = tl.load(perm_ptr + vec + rows, mask=rmask, other=0)

    if HAS_GWINV:
        for j0 in range(0, C, BN):
            cols = j0 + tl.arange(0, BN)
            cmask = cols < C
            acc = tl.zeros([CP, BN], dtype=dt)
            for k in range(0, C):
                a = tl.load(gwinv_ptr + mat + rows * C + k, mask=rmask, other=0.0).to(dt)
                b = tl.load(winv_ptr + mat + cols * C + k, mask=cmask, other=0.0).to(dt)
                acc += a[:, None] * b[None, :]
            tl.store(t_ptr + mat + rows[:, None] * C + cols[None, :], acc,
                     mask=rmask[:, None] & cmask[None, :])
        tl.debug_barrier()

    for j0 in range(0, C, BN):
        cols = j0 + tl.arange(0, BN)
        cmask = cols < C
        tile_mask = rmask[:, None] & cmask[None, :]
        if HAS_GW:
            g = tl.load(gw_ptr + mat + rows[:, None] * C + cols[None, :], mask=tile_mask, other=0.0).to(dt)
        else:
            g = tl.zeros([CP, BN], dtype=dt)
        if HAS_GWINV:
            for k in range(0, C):
                a = tl.load(winv_ptr + mat + k * C + rows, mask=rmask, other=0.0).to(dt)
                b = tl.load(t_ptr + mat + k * C + cols, mask=cmask, other=0.0, cache_modifier=".cg")
                g -= a[:, None] * b[None, :]
        tl.store(gm_ptr + mat + perm_r[:, None] * C + cols[None, :], g, mask=tile_mask)
    tl.debug_barrier()

    for j0 in range(0, C, BN):
        cols = j0 + tl.arange(0, BN)
        cmask = cols < C
        ws_c = tl.load(ws_ptr + vec + cols, mask=cmask, other=0.0).to(dt)
        d_c = tl.load(sign_ptr + vec + cols, mask=cmask, other=0.0).to(dt) * tl.exp(ws_c)
        gu = tl.zeros([CP, BN], dtype=dt)
        gl = tl.zeros([CP, BN], dtype=dt)
        for k in range(0, C):
            # gU[:, J] += L[k, :]^T gM[k, J]          (L[k, r]: w_l for r < k, 1 for r == k)
            lt = tl.load(wl_ptr + mat + k * C + rows, mask=rows < k, other=0.0).to(dt)
            lt = tl.where(rows == k, 1.0, lt)
            gm_k = tl.load(gm_ptr + mat + k * C + cols, mask=cmask, other=0.0, cache_modifier=".cg")
            gu += lt[:, None] * gm_k[None, :]
            # gL[:, J] += gM[:, k] U[J, k]^T          (U[j, k]: w_u for j < k, d_k for j == k)
            gm_c = tl.load(gm_ptr + mat + rows * C + k, mask=rmask, other=0.0, cache_modifier=".cg")
            ut = tl.load(wu_ptr + mat + cols * C + k, mask=cmask & (cols < k), other=0.0).to(dt)
            ut = tl.where(cols == k, d_c, ut)
            gl += gm_c[:, None] * ut[None, :]
        tile_mask = rmask[:, None] & cmask[None, :]
        offs = mat + rows[:, None] * C + cols[None, :]
        tl.store(gwl_ptr + offs, tl.where(rows[:, None] > cols[None, :], gl, 0.0), mask=tile_mask)
        tl.store(gwu_ptr + offs, tl.where(rows[:, None] < cols[None, :], gu, 0.0), mask=tile_mask)
        g_s = tl.sum(tl.where(rows[:, None] == cols[None, :], gu, 0.0), axis=0) * d_c
        if HAS_GLD:
            g_s += tl.load(gld_ptr + s).to(dt)
        tl.store(gws_ptr + vec + cols, g_s, mask=cmask)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def perm_from_matrix(w_p: torch.Tensor, validate: bool = False) -> torch.Tensor:
    """Stacked permutation matrices (..., C, C) -> row permutation (..., C) int64, with
    (P M)[i, :] = M[perm[i], :], i.e. P[i, perm[i]] = 1. ``validate`` checks P (a host sync)."""
    if w_p.dim() < 2 or w_p.shape[-1] != w_p.shape[-2]:
        raise ValueError(f"perm_from_matrix: expected (..., C, C), got shape {tuple(w_p.shape)}")
    perm = w_p.argmax(dim=-1)
    if validate:
        c = w_p.shape[-1]
        eye = torch.eye(c, dtype=w_p.dtype, device=w_p.device)
        if not torch.equal(w_p, eye[perm]):
            raise ValueError("perm_from_matrix: w_p is not a stack of permutation matrices")
    return perm.contiguous()


def _check_params(fn, perm, w_l, w_u, w_s, s_sign):
    if w_l.dim() != 3 or w_l.shape[1] != w_l.shape[2]:
        raise ValueError(f"{fn}: w_l must be (S, C, C), got shape {tuple(w_l.shape)}")
    s, c, _ = w_l.shape
    if w_l.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: parameters must be float32 or float64, got {w_l.dtype}")
    expect = {"w_u": (w_u, (s, c, c)), "w_s": (w_s, (s, c)), "s_sign": (s_sign, (s, c)),
              "perm": (perm, (s, c))}
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != w_l.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, w_l on {w_l.device}")
    for name, t in (("w_u", w_u), ("w_s", w_s)):
        if t.dtype != w_l.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}, w_l has {w_l.dtype}")
    if perm.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{fn}: perm must be int32 or int64, got {perm.dtype}")
    if not s_sign.is_floating_point():
        raise TypeError(f"{fn}: s_sign must be floating point, got {s_sign.dtype}")
    return s, c, [t.contiguous() for t in (perm, w_l, w_u, w_s, s_sign)]


def lu_weight_forward(perm, w_l, w_u, w_s, s_sign, inverse: bool = True):
    """(W, W_inv, logdet) for S stacked steps: W = P L U (S, C, C), W_inv = W^-1 (S, C, C) or None
    when ``inverse=False``, logdet = sum(w_s) = log|det W| (S,). One launch, grid (S, C/BN)."""
    s, c, (perm, w_l, w_u, w_s, s_sign) = _check_params("lu_weight_forward", perm, w_l, w_u, w_s, s_sign)
    w = torch.empty_like(w_l)
    w_inv = torch.empty_like(w_l) if inverse else None
    logdet = torch.empty((s,), dtype=w_l.dtype, device=w_l.device)
    if s == 0 or c == 0:
        if c == 0:
            logdet.zero_()
        return w, w_inv, logdet
    cp, bn, warps = lu_tiles(c, w_l.dtype)
    grid = (s, triton.cdiv(c, bn))
    _lu_weight_fwd_kernel[grid](perm, w_l, w_u, w_s, s_sign, w, w if w_inv is None else w_inv, logdet, c,
                                CP=cp, BN=bn, INVERSE=inverse, num_warps=warps)
    return w, w_inv, logdet


def lu_weight_backward(perm, w_l, w_u, w_s, s_sign, W_inv, grad_W, grad_W_inv=None, grad_logdet=None):
    """(grad_w_l, grad_w_u, grad_w_s) of the outputs of :func:`lu_weight_forward`.

    G = gW - W^-T gWinv W^-T;  gM = P^T G;  grad_w_l = strict_lower(gM U^T);  gU = L^T gM;
    grad_w_u = strict_upper(gU);  grad_w_s = diag(gU) * s_sign * exp(w_s) + grad_logdet.
    Any of grad_W, grad_W_inv, grad_logdet may be None (zero); W_inv is needed only with grad_W_inv.
    One launch, one program per step.
    """
    fn = "lu_weight_backward"
    s, c, (perm, w_l, w_u, w_s, s_sign) = _check_params(fn, perm, w_l, w_u, w_s, s_sign)
    dev = w_l.device
    for name, t, shape in (("grad_W", grad_W, (s, c, c)), ("grad_W_inv", grad_W_inv, (s, c, c)),
                           ("grad_logdet", grad_logdet, (s,))):
        if t is not None and (tuple(t.shape) != shape or t.device != dev):
            raise ValueError(f"{fn}: {name} must have shape {shape} on {dev}, "
                             f"got {tuple(t.shape)} on {t.device}")
    if grad_W_inv is not None:
        if W_inv is None:
            raise ValueError(f"{fn}: W_inv is required when grad_W_inv is given")
        if tuple(W_inv.shape) != (s, c, c) or W_inv.device != dev:
            raise ValueError(f"{fn}: W_inv must have shape {(s, c, c)} on {dev}, got {tuple(W_inv.shape)}")
        W_inv, grad_W_inv = W_inv.contiguous(), grad_W_inv.contiguous()
    grad_W = grad_W.contiguous() if grad_W is not None else None
    grad_logdet = grad_logdet.contiguous() if grad_logdet is not None else None

    g_wl = torch.empty_like(w_l)
    g_wu = torch.empty_like(w_l)
    g_ws = torch.empty_like(w_s)
    if s == 0 or c == 0:
        return g_wl, g_wu, g_ws
    scratch_t = torch.empty_like(w_l) if grad_W_inv is not None else g_wl
    scratch_gm = torch.empty_like(w_l)
    cp, bn, warps = lu_tiles(c, w_l.dtype)
    dummy = g_wl
    _lu_weight_bwd_kernel[(s,)](
        perm, w_l, w_u, w_s, s_sign,
        W_inv if grad_W_inv is not None else dummy,
        grad_W if grad_W is not None else dummy,
        grad_W_inv if grad_W_inv is not None else dummy,
        grad_logdet if grad_logdet is not None else dummy,
        g_wl, g_wu, g_ws, scratch_t, scratch_gm, c,
        CP=cp, BN=bn, HAS_GW=grad_W is not None, HAS_GWINV=grad_W_inv is not None,
        HAS_GLD=grad_logdet is not None, num_warps=warps)
    return g_wl, g_wu, g_ws


# ----------------------------------------------------------------------------------------------
# op registration: fastglow::lu_weight and its backward (opaque to the compiler)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastglow::lu_weight", mutates_args=())
def lu_weight(perm: torch.Tensor, w_l: torch.Tensor, w_u: torch.Tensor, w_s: torch.Tensor,
              s_sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S stacked LU-parameterised weights at once: (W, W^-1, log|det W|), one launch each way."""
    return _lu_weight(perm, w_l, w_u, w_s, s_sign)


def _lu_weight(perm, w_l, w_u, w_s, s_sign):
    return lu_weight_forward(perm, w_l, w_u, w_s, s_sign, inverse=True)


def _lu_weight_shapes(perm, w_l, w_u, w_s, s_sign):
    return w_l.new_empty(w_l.shape), w_l.new_empty(w_l.shape), w_l.new_empty(w_l.shape[:1])


@torch.library.custom_op("fastglow::lu_weight_backward", mutates_args=())
def lu_weight_grad(perm: torch.Tensor, w_l: torch.Tensor, w_u: torch.Tensor, w_s: torch.Tensor,
                   s_sign: torch.Tensor, w_inv: torch.Tensor, grad_w: torch.Tensor | None,
                   grad_w_inv: torch.Tensor | None, grad_logdet: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_w_l, grad_w_u, grad_w_s) of :func:`lu_weight` (:func:`lu_weight_backward`)."""
    return lu_weight_backward(perm, w_l, w_u, w_s, s_sign, w_inv, grad_w, grad_w_inv, grad_logdet)


def _lu_weight_grad_shapes(perm, w_l, w_u, w_s, *_):
    return w_l.new_empty(w_l.shape), w_l.new_empty(w_l.shape), w_s.new_empty(w_s.shape)


def _lu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


def _lu_grad(ctx, grad_w, grad_w_inv, grad_logdet):
    perm, w_l, w_u, w_s, s_sign, w_inv = ctx.saved_tensors
    return (None, *lu_weight_grad(perm, w_l, w_u, w_s, s_sign, w_inv, grad_w, grad_w_inv, grad_logdet), None)


lu_weight.register_fake(fake_or_meta(_lu_weight, _lu_weight_shapes))
lu_weight_grad.register_fake(fake_or_meta(lu_weight_backward, _lu_weight_grad_shapes))
register_autograd(lu_weight, _lu_grad, _lu_setup)
