"""Static cost model: the least bytes and the FLOPs of each fused flow-step kernel at the real shapes, and of
the eager op sequence it replaces, hence roofline times on an H100 and a predicted speedup.

    python -m benchmarks.studies.cost_model [--md F]

Per level (C channels after the squeeze, N = B*H*W pixels, half H2 = C/2, h channels Ch = C affine, C/2
additive) and per flow step, in float32 (4 B). Each launch takes max(bytes / 3.0 TB/s, FLOPs / 60 TFLOP/s
(FMA), MIN_LAUNCH_S): a kernel that moves nothing still costs a couple of microseconds back to back.

- fused kernels move their inputs and outputs once (weights and per-program partials are small); the mix
  does 2 C^2 N FLOPs (``tf32x3``: three tensor-core products at ~400 TFLOP/s instead of FMA);
- the eager sequence is the reference maths as separate torch ops (ActNorm, 1x1 conv, coupling): every
  elementwise op reads its operands and writes its result; autograd's backward of an op reads the
  incoming gradient and the saved operands it needs and writes one gradient per tensor input (views,
  ``cat`` and additions pass gradients without a kernel);
- backward: fused is the reversible backward (rebuilds the step input, so it does *more* than plain
  autograd); eager is plain autograd's backward of the eager forward (no rebuilding): a conservative
  comparison. Both exclude the coupling network (the same cuDNN convolutions in both, listed apart) and the
  parameter-sized ops (weight folding, LU, logdet sums).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from benchmarks.compile_gate.launch_capture import SHAPES
from fastglow.testing.workloads import ModelShape

BYTES = 4
HBM_BPS = 3.0e12
FMA_FLOPS = 60e12
TF32_FLOPS = 400e12
MIN_LAUNCH_S = 2e-6
SECONDS_PER_MIX_FLOP = {"ieee": 1 / FMA_FLOPS, "tf32x3": 3 / TF32_FLOPS, "tf32": 1 / TF32_FLOPS}


@dataclass(frozen=True)
class Op:
    """One launch: ``reads`` and ``writes`` in channel planes (x N elements), ``flops`` per pixel; ``mix_flops``
    the part a matmul does (``precision`` "tf32x3" / "tf32" moves it to tensor cores)."""
    name: str
    reads: float
    writes: float
    flops: float = 0.0
    mix_flops: float = 0.0

    def seconds(self, n: int, precision: str = "ieee") -> float:
        other = (self.flops - self.mix_flops) * n / FMA_FLOPS
        mix = self.mix_flops * n * SECONDS_PER_MIX_FLOP[precision]
        return max((self.reads + self.writes) * n * BYTES / HBM_BPS, other + mix, MIN_LAUNCH_S)

    def megabytes(self, n: int) -> float:
        return (self.reads + self.writes) * n * BYTES / 1e6


def _ew(name, reads, writes, flops_per_out=1.0):
    return Op(name, reads, writes, flops_per_out * writes)


# ------------------------------------------------------------------------------------------------
# Eager sequences (reference maths), per step
# ------------------------------------------------------------------------------------------------
def eager_mix(c: int) -> list[Op]:
    """ActNorm scale * (x + loc), then the 1x1 conv."""
    return [_ew("x + loc", c, c), _ew("scale * .", c, c), Op("conv1x1", c, c, 2 * c * c, 2 * c * c)]


def eager_coupling(c: int, affine: bool, inverse: bool = False) -> list[Op]:
    """ZeroConv2d's exp(3 scale) factor, then (un)combine and the logdet, then cat(y_a, y_b)."""
    h2 = c // 2
    ch = c if affine else h2
    ops = [_ew("h_raw * exp(3 zs)", ch, ch)]
    if affine:
        ops += [_ew("log_s + 2", h2, h2), _ew("sigmoid", h2, h2, 4)]
        if inverse:
            ops += [_ew("y_b' / s", 2 * h2, h2), _ew("- t", 2 * h2, h2)]
        else:
            ops += [_ew("y_b + t", 2 * h2, h2), _ew("* s", 2 * h2, h2), _ew("log s", h2, h2, 4),
                    Op("sum (logdet)", h2, 0, h2)]
    else:
        ops += [_ew("y_b -+ h", 2 * h2, h2)]
    return ops + [_ew("cat", c, c, 0)]


def eager_inverse_mix(c: int) -> list[Op]:
    """1x1 conv with W^-1, then ActNorm's inverse y / scale - loc."""
    return [Op("conv1x1 (W^-1)", c, c, 2 * c * c, 2 * c * c), _ew("/ scale", c, c), _ew("- loc", c, c)]


def eager_step_backward(c: int, affine: bool) -> list[Op]:
    """Autograd's backward of eager_mix + eager_coupling (plain, from saved activations)."""
    h2 = c // 2
    ch = c if affine else h2
    ops = [Op("d x+loc: sum for d loc", c, 0, c), Op("d scale*.: g*x, sum, g*scale", 2 * c, 2 * c, 2 * c),
           Op("conv1x1 dgrad", c, c, 2 * c * c, 2 * c * c), Op("conv1x1 wgrad", 2 * c, 0, 2 * c * c, 2 * c * c),
           Op("d h_raw, d zs", 2 * ch, 2 * ch, 2 * ch)]
    if affine:
        ops += [Op("d (y_b+t)*s", 3 * h2, 2 * h2, 2 * h2), Op("d log s", 2 * h2, h2, h2),
                _ew("add d s", 2 * h2, h2), Op("d sigmoid", 2 * h2, h2, 2 * h2)]
    return ops + [_ew("add d y_a (network path)", 2 * h2, h2)]


# ------------------------------------------------------------------------------------------------
# Fused kernels, per step
# ------------------------------------------------------------------------------------------------
def fused_forward(c: int, affine: bool, store: bool = False) -> list[Op]:
    """_flow_step_fwd_kernel: coupling of step k + mix of step k+1 (``store``: also writes the coupled
    tensor, plain autograd only); the logdet partials' sum."""
    ch = c if affine else c // 2
    mix = 2 * c * c
    coupling = 15 * (c // 2) if affine else c // 2
    ops = [Op("coupling + mix", c + ch, c * (2 if store else 1), mix + coupling, mix)]
    return ops + ([Op("logdet partials sum", 0, 0)] if affine else [])


def fused_inverse(c: int, affine: bool) -> list[Op]:
    """_flow_step_fwd_kernel, INVERSE: uncombine of step k + inverse mix of step k (sampling, reverse)."""
    ch = c if affine else c // 2
    return [Op("uncombine + inverse mix", c + ch, c, 2 * c * c + 15 * (c // 2), 2 * c * c)]


def fused_backward(c: int, affine: bool) -> list[Op]:
    """Reversible backward of a step: _coupling_bwd_kernel, _channel_mix_bwd_kernel (rebuilding the step
    input), _channel_mix_wgrad_kernel, and the torch sums of their partials."""
    ch = c if affine else c // 2
    return [Op("coupling bwd (rebuild y)", 2 * c + ch, 2 * c + ch, 20 * (c // 2)),
            Op("mix bwd (rebuild x)", 2 * c, 2 * c, 4 * c * c, 4 * c * c),
            Op("mix wgrad", 2 * c, 0, 2 * c * c, 2 * c * c),
            Op("partials: d zs", 0, 0), Op("partials: d W, d b", 0, 0)]


def coupling_network(c: int, affine: bool, width: int) -> Op:
    """The coupling network's convolutions (3x3 C/2 -> w, 1x1 w -> w, 3x3 w -> Ch), forward: the same in both
    (cuDNN, TF32 by PyTorch's default: time it with precision "tf32")."""
    ch = c if affine else c // 2
    flops = 2 * (9 * (c // 2) * width + width * width + 9 * width * ch)
    return Op("coupling network (cuDNN, fwd)", c // 2 + 2 * width, 2 * width + ch, flops, flops)


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
def levels(shape: ModelShape):
    """(C, H, W) of each level's flow steps (after its squeeze)."""
    c, size = shape.in_channel, shape.img_size
    for _ in range(shape.n_block):
        c, size = 4 * c, size // 2
        yield c, size, size
        c //= 2


def _time(ops, n, precision="ieee") -> float:
    return sum(op.seconds(n, precision) for op in ops)


@dataclass
class Row:
    shape: str
    level: str
    kernel: str
    n: int
    fused: list
    eager: list

    def cells(self) -> list[str]:
        f_us, e_us = 1e6 * _time(self.fused, self.n), 1e6 * _time(self.eager, self.n)
        f_mb = sum(o.megabytes(self.n) for o in self.fused)
        e_mb = sum(o.megabytes(self.n) for o in self.eager)
        gflop = sum(o.flops for o in self.fused) * self.n / 1e9
        return [self.shape, self.level, self.kernel, f"{len(self.fused)}", f"{f_mb:.1f}", f"{gflop:.2f}",
                f"{f_us:.1f}", f"{1e6 * _time(self.fused, self.n, 'tf32x3'):.1f}", f"{len(self.eager)}",
                f"{e_mb:.1f}", f"{e_us:.1f}", f"{e_us / f_us:.1f}x", "", ""]


def rows(shapes=SHAPES) -> list[Row]:
    out = []
    for shape in shapes:
        for c, h, w in levels(shape):
            n, lv = shape.batch * h * w, f"{c}x{h}x{w}"
            a = shape.affine
            out += [Row(shape.name, lv, "forward step", n, fused_forward(c, a),
                        eager_coupling(c, a) + eager_mix(c)),
                    Row(shape.name, lv, "backward step", n, fused_backward(c, a), eager_step_backward(c, a)),
                    Row(shape.name, lv, "inverse step", n, fused_inverse(c, a),
                        eager_coupling(c, a, inverse=True) + eager_inverse_mix(c))]
    return out


def totals(shapes=SHAPES) -> list[list[str]]:
    """One training step (forward + backward) and one sampling pass of the flow maths over every level and
    step, fused vs eager, next to the coupling networks' forward (a lower bound of what both add)."""
    lines = []
    for shape in shapes:
        t = {"fused": [0.0, 0.0], "eager": [0.0, 0.0]}
        net = 0.0
        for r in rows([shape]):
            k = shape.n_flow
            slot = 1 if r.kernel == "inverse step" else 0
            t["fused"][slot] += k * _time(r.fused, r.n)
            t["eager"][slot] += k * _time(r.eager, r.n)
        for c, h, w in levels(shape):
            net += shape.n_flow * coupling_network(c, shape.affine, shape.hidden).seconds(shape.batch * h * w, "tf32")
        for slot, what in ((0, "training step (fwd + bwd)"), (1, "sampling (inverse)")):
            f, e = 1e3 * t["fused"][slot], 1e3 * t["eager"][slot]
            lines.append([f"{shape.name} B={shape.batch}", what, f"{f:.2f}", f"{e:.2f}", f"{e / f:.1f}x",
                          f"{1e3 * net:.2f}", "", ""])
    return lines


HEADER = ["shape", "level", "kernel", "fused launches", "fused MB", "fused GFLOP", "fused µs (ieee)",
          "fused µs (tf32x3)", "eager launches", "eager MB", "eager µs", "predicted speedup",
          "measured fused µs", "measured eager µs"]
TOTAL_HEADER = ["shape", "flow maths of", "fused ms", "eager ms", "predicted speedup",
                "coupling networks fwd ms (TF32, both)", "measured fused ms", "measured eager ms"]


def _table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def markdown() -> str:
    return (_table(HEADER, [r.cells() for r in rows()]) + "\n\nWhole model, per pass:\n\n"
            + _table(TOTAL_HEADER, totals()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md", default=None, help="write the tables here too")
    args = parser.parse_args(argv)
    text = markdown()
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
