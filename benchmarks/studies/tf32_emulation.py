"""What ``input_precision="tf32x3"`` in the 1x1 mix would do to Glow, estimated in torch on a CPU.

The interpreter ignores ``tl.dot``'s ``input_precision`` (ieee, tf32 and tf32x3 give identical results there),
so the effect is emulated: TF32 keeps 10 of float32's 23 mantissa bits (round to nearest, ties away, as
``cvt.rna.tf32.f32``), and

    tf32   A B ~ t(A) t(B)                                        (one tensor-core pass)
    tf32x3 A B ~ t(A) t(B) + t(A) lo(B) + lo(A) t(B),  lo(M) = t(M - t(M))     (three passes, ~fp32)

with float32 accumulation; products of two TF32 numbers are exact in float32, so a float32 matmul of the
rounded parts reproduces the tensor-core maths up to the order of the sums. :func:`mix_precision` swaps
every 1x1 conv of the eager model (forward, reverse and their gradients) for such a product.

    python -m benchmarks.studies.tf32_emulation          # the numbers in benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import time
from unittest import mock

import torch

from fastglow import reference

PRECISIONS = ("ieee", "tf32", "tf32x3")


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest TF32 value (10 mantissa bits; ties away from zero), still stored as float32."""
    if x.dtype != torch.float32:
        raise TypeError(f"round_tf32 takes float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b as ``tl.dot(a, b, input_precision=precision)`` computes it on a GPU (float32 operands)."""
    if precision == "ieee" or a.dtype != torch.float32:
        return a @ b
    a_hi, b_hi = round_tf32(a), round_tf32(b)
    if precision == "tf32":
        return a_hi @ b_hi
    if precision != "tf32x3":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    a_lo, b_lo = round_tf32(a - a_hi), round_tf32(b - b_hi)
    return (a_lo @ b_hi + a_hi @ b_lo) + a_hi @ b_hi


class _Mix(torch.autograd.Function):
    """y[b, :, p] = w @ x[b, :, p] with every product (forward, grad_x = w^T g, grad_w = g x^T) in
    ``precision``, as the Triton mix kernels compute them."""

    @staticmethod
    def forward(ctx, x, w, precision):
        ctx.save_for_backward(x, w)
        ctx.precision = precision
        b, c, h, wd = x.shape
        cols = x.permute(1, 0, 2, 3).reshape(c, -1)
        return matmul(w, cols, precision).reshape(-1, b, h, wd).permute(1, 0, 2, 3).contiguous()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        b, c, h, wd = x.shape
        g_cols = g.permute(1, 0, 2, 3).reshape(g.shape[1], -1)
        x_cols = x.permute(1, 0, 2, 3).reshape(c, -1)
        grad_x = matmul(w.t(), g_cols, ctx.precision).reshape(c, b, h, wd).permute(1, 0, 2, 3)
        return grad_x, matmul(g_cols, x_cols.t(), ctx.precision), None


@contextlib.contextmanager
def mix_precision(precision: str):
    """Within the block every 1x1 conv of the reference modules (so of ``backend="eager"`` models) runs
    its products in ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cls = reference._InvConv1x1

    def forward(self, x):
        return _Mix.apply(x, self.calc_weight(), precision), x.shape[2] * x.shape[3] * self.log_abs_det()

    def reverse(self, y):
        return _Mix.apply(y, reference.matrix_inverse(self.calc_weight()), precision)

    with mock.patch.object(cls, "forward", forward), mock.patch.object(cls, "reverse", reverse):
        yield


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _models(n_flow, n_block, hidden, batch, img, seed=0):
    """A float32 eager Glow at perturbed weights (DESIGN section 5, sigma 0.01) and its float64 twin."""
    import fastglow
    from fastglow.testing import initialized_model
    torch.manual_seed(seed)
    x = torch.rand(batch, 3, img, img, dtype=torch.float64) - 0.5 + torch.rand(batch, 3, img, img,
                                                                              dtype=torch.float64) / 256
    kw = dict(affine=True, hidden_channels=hidden, backend="eager", reversible=False)
    f64 = initialized_model(fastglow.Glow(3, n_flow, n_block, **kw).double(), x)
    f32 = fastglow.Glow(3, n_flow, n_block, **kw)
    f32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in f64.state_dict().items()})
    return f32, f64, x


def _run(model, x):
    """(round-trip error of reverse(forward(x)), z, gradient of the mean NLL w.r.t. x and every parameter)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    log_p, logdet, z = model(x)
    (-(log_p + logdet).mean()).backward()
    with torch.no_grad():
        rec = model.reverse([t.detach() for t in z], reconstruct=True)
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return _rel(rec, x.detach()), torch.cat([t.detach().flatten() for t in z]), torch.cat([g.flatten() for g in grads])


def estimate(n_flow=32, n_block=3, hidden=512, batch=2, img=32) -> dict:
    """Per precision: reverse(forward(x)) error, and z and gradients against the float64 model."""
    f32, f64, x = _models(n_flow, n_block, hidden, batch, img)
    rt64, z64, g64 = _run(f64, x)
    out = {"float64 (ieee)": dict(round_trip=rt64, z=0.0, grad=0.0)}
    for precision in PRECISIONS:
        with mix_precision(precision):
            rt, z, g = _run(f32, x.float())
        out[f"float32 {precision}"] = dict(round_trip=rt, z=_rel(z, z64), grad=_rel(g, g64))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-flow", type=int, default=32)
    parser.add_argument("--n-block", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = estimate(args.n_flow, args.n_block, args.hidden, args.batch)
    print(f"3x32x32, K={args.n_flow}, L={args.n_block}, width {args.hidden}, batch {args.batch}, affine, "
          f"sigma 0.01 ({time.perf_counter() - start:.0f} s)")
    print("| 1x1 mix | reverse(forward(x)) rel. error | z vs float64 | gradients vs float64 |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['round_trip']:.2e} | {r['z']:.2e} | {r['grad']:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
