"""One CPU training step (forward, bits/dim, backward) of ``torch.compile(fastglow.Glow)`` against eager
fastglow and eager rosinality/glow-pytorch at one shape (3x32x32, K=16, L=3, width 512, batch 8), timed by the
harness's one timer in this process: interleaved rounds (the order rotates from round to round), a figure is the
median over rounds, a ratio the median of the per-round ratios. fastglow runs its defaults (reversible backprop,
eager backend on CPU) with ``validate=False``, the setting in which a step is one graph (and, for scale, plain
autograd, ``reversible=False``); the compiled model is ``torch.compile(model, fullgraph=True)`` (inductor),
compiled by the untimed warm-up step.

    OMP_NUM_THREADS=2 python -m benchmarks.studies.compile_step --rosinality /tmp/rosinality/model.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks.harness import ModelShape, build_model, time_rounds, training_step

SHAPE = ModelShape("cifar", 3, 32, 16, 3, 512, True, 8)
RATIOS = (("fastglow compiled", "fastglow eager"), ("fastglow compiled", "rosinality eager"),
          ("fastglow eager", "rosinality eager"), ("fastglow plain eager", "rosinality eager"))


def steps(rosinality: str) -> dict:
    """name -> one training step, each model built (ActNorm initialised) on the same batch."""
    ros, ros_run, x = build_model("rosinality", SHAPE, rosinality=rosinality)
    fast, fast_run, _ = build_model("fastglow-reversible", SHAPE, backend="eager", validate=False)
    compiled_model, _, _ = build_model("fastglow-reversible", SHAPE, backend="eager", validate=False)
    plain, plain_run, _ = build_model("fastglow-plain", SHAPE, backend="eager", validate=False)
    compiled = torch.compile(compiled_model, fullgraph=True)
    return {"rosinality eager": lambda: training_step(ros, ros_run, x),
            "fastglow eager": lambda: training_step(fast, fast_run, x),
            "fastglow plain eager": lambda: training_step(plain, plain_run, x),
            "fastglow compiled": lambda: training_step(compiled_model, compiled, x)}


def measure(rounds: int, rosinality: str) -> dict:
    t0 = time.perf_counter()
    timed = time_rounds(steps(rosinality), rounds, warmup=1, min_rounds=rounds)
    times = {name: t["wall_s"] for name, t in timed.items()}
    ratios = {f"{a} / {b}": statistics.median(x / y for x, y in zip(times[a], times[b])) for a, b in RATIOS}
    return dict(times_s=times, first_s={n: t["first_s"] for n, t in timed.items()}, ratios=ratios,
                total_s=time.perf_counter() - t0)


def format_table(result: dict) -> str:
    names = list(result["times_s"])
    return "\n".join([
        "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
        "| " + " | ".join(f"{statistics.median(result['times_s'][n]):.3f} s" for n in names) + " |", "",
        "| " + " | ".join(result["ratios"]) + " |", "|" + "---|" * len(result["ratios"]),
        "| " + " | ".join(f"{v:.3f}x" for v in result["ratios"].values()) + " |"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rosinality", default=os.environ.get("ROSINALITY_MODEL"),
                        help="rosinality/glow-pytorch's model.py (default: $ROSINALITY_MODEL)")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per implementation, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.rosinality:
        parser.error("give rosinality/glow-pytorch's model.py with --rosinality PATH or $ROSINALITY_MODEL")
    torch.set_num_threads(args.threads)
    result = measure(args.rounds, args.rosinality)
    for name, times in result["times_s"].items():
        print(f"{name}: first (warm-up) {result['first_s'][name]:.1f} s, steps " + " ".join(f"{t:.3f}" for t in times)
              + " s", file=sys.stderr)
    print(format_table(result))


if __name__ == "__main__":
    main()
