"""2x2 space-to-depth (squeeze) and its inverse as one Triton permutation kernel.

Channel order is rosinality's (see :func:`fastglow.reference.squeeze2d`)::

    y[b, 4c + 2dy + dx, i, j] = x[b, c, 2i + dy, 2j + dx]        dy, dx in {0, 1}

Both directions are pure index permutations, so each one's backward is the other applied to the
gradient: ``d squeeze / dx`` is ``unsqueeze(grad_y)`` and vice versa (no backward kernel exists).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import fake_or_meta, register_autograd

__all__ = ["squeeze_forward", "squeeze_backward", "unsqueeze_forward", "unsqueeze_backward", "squeeze"]

_BLOCK = 1024


@triton.jit
def _squeeze_fwd_kernel(src_ptr, dst_ptr, N, H, W,
                        BLOCK: tl.constexpr, INVERSE: tl.constexpr, WIDE: tl.constexpr):
    """dst[n] = src[pi(n)] over the contiguous *output*, so writes are coalesced.

    H, W are the fine (unsqueezed) spatial sizes. Let bc = b*C + c and q = 2dy + dx; then the coarse
    (squeezed) flat index is ((4bc + q) * H/2 + i) * W/2 + j and the fine one is
    (bc * H + 2i + dy) * W + 2j + dx. ``INVERSE=False`` walks the coarse layout (squeeze),
    ``INVERSE=True`` walks the fine one (unsqueeze). ``WIDE`` switches to int64 offsets.
    """
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    H2 = H // 2
    W2 = W // 2
    if INVERSE:
        w = offs % W
        t = offs // W
        h = t % H
        bc = t // H
        src = ((bc * 4 + 2 * (h % 2) + (w % 2)) * H2 + h // 2) * W2 + w // 2
    else:
        j = offs % W2
        t = offs // W2
        i = t % H2
        t = t // H2
        q = t % 4
        bc = t // 4
        src = (bc * H + 2 * i + q // 2) * W + 2 * j + q % 2
    val = tl.load(src_ptr + src, mask=mask)
    tl.store(dst_ptr + offs, val, mask=mask)


def _check(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    return x.contiguous()


def _launch(src: torch.Tensor, dst: torch.Tensor, fine_h: int, fine_w: int, inverse: bool) -> torch.Tensor:
    n = src.numel()
    if n == 0:
        return dst
    grid = (triton.cdiv(n, _BLOCK),)
    _squeeze_fwd_kernel[grid](src, dst, n, fine_h, fine_w,
                              BLOCK=_BLOCK, INVERSE=inverse, WIDE=n + _BLOCK >= 2**31)
    return dst


def squeeze_forward(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2); equal to :func:`fastglow.reference.squeeze2d`."""
    x = _check(x, "squeeze_forward")
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze_forward: H and W must be even, got H={h}, W={w}")
    y = torch.empty((b, 4 * c, h // 2, w // 2), dtype=x.dtype, device=x.device)
    return _launch(x, y, h, w, inverse=False)


def unsqueeze_forward(y: torch.Tensor) -> torch.Tensor:
    """(B, 4C, H, W) -> (B, C, 2H, 2W); equal to :func:`fastglow.reference.unsqueeze2d`."""
    y = _check(y, "unsqueeze_forward")
    b, c4, h, w = y.shape
    if c4 % 4:
        raise ValueError(f"unsqueeze_forward: the channel count must be a multiple of 4, got {c4}")
    x = torch.empty((b, c4 // 4, 2 * h, 2 * w), dtype=y.dtype, device=y.device)
    return _launch(y, x, 2 * h, 2 * w, inverse=True)


def squeeze_backward(grad_y: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`squeeze_forward`: the permutation's transpose is its inverse, so unsqueeze."""
    return unsqueeze_forward(grad_y)


def unsqueeze_backward(grad_x: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`unsqueeze_forward`: squeeze of the incoming gradient."""
    return squeeze_forward(grad_x)


# ----------------------------------------------------------------------------------------------
# op registration: fastglow::squeeze (opaque to the compiler; its gradient is the other direction)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastglow::squeeze", mutates_args=())
def squeeze(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """2x2 space-to-depth of x (B, C, H, W) -> (B, 4C, H/2, W/2), or its inverse when ``inverse``."""
    return _squeeze(x, inverse)


def _squeeze(x, inverse):
    return unsqueeze_forward(x) if inverse else squeeze_forward(x)


def _squeeze_shape(x, inverse):
    b, c, h, w = x.shape
    return x.new_empty((b, c // 4, 2 * h, 2 * w) if inverse else (b, 4 * c, h // 2, w // 2))


def _squeeze_setup(ctx, inputs, output):
    ctx.inverse = inputs[1]


def _squeeze_grad(ctx, grad):
    return squeeze(grad.contiguous(), not ctx.inverse), None


squeeze.register_fake(fake_or_meta(_squeeze, _squeeze_shape))
register_autograd(squeeze, _squeeze_grad, _squeeze_setup)
