"""fastglow's reversible backprop against per-Flow ``torch.utils.checkpoint``, side by side on the CPU: one
training step (forward, bits/dim, backward) of rosinality/glow-pytorch plain and with per-Flow checkpointing,
fastglow plain and fastglow reversible (eager backend), at one shape and several depths K.

rosinality's ``model.py`` is read at run time from ``--rosinality`` (or ``$ROSINALITY_MODEL``); it is not part
of this repository. Fetch it e.g. with ``git --git-dir <mirror> show HEAD:model.py > /tmp/rosinality/model.py``.

Method (a shared, noisy machine): per K, one fresh process (:mod:`benchmarks.harness`) builds all four
models, initialises ActNorm and warms each up, then times ``--rounds`` rounds of one training step of each, the
order rotating from round to round, so neighbouring steps see the same load; a figure is the median over the
rounds, and every ratio is taken within a round (median over rounds), in wall-clock and in process CPU time.
Peak memory is measured in separate processes with a precise allocator (glibc: one arena, every block its own
mapping) as peak RSS above the RSS before the step, gradients freed before the step
(``zero_grad(set_to_none=True)``, as a training loop does), so it includes allocating them; the timing
processes use the default allocator.

    python -m benchmarks.studies.compare_checkpoint --rosinality /tmp/rosinality/model.py --depths 16 32 --rounds 9
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.harness import ModelShape, in_fresh_process, time_in_fresh_process

# (column, implementation)
IMPLS = (("rosinality plain", "rosinality"), ("rosinality + checkpoint", "rosinality-checkpoint"),
         ("fastglow plain", "fastglow-plain"), ("fastglow reversible", "fastglow-reversible"))
SHAPE = ModelShape("cifar", 3, 32, 16, 3, 512, True, 8)
RATIOS = (("fastglow plain", "rosinality plain"), ("fastglow reversible", "rosinality + checkpoint"),
          ("fastglow reversible", "fastglow plain"))


def measure(depths, rounds: int, threads: int, rosinality: str, impls=IMPLS, log=print) -> list[dict]:
    """-> one row per K: per implementation the step times (s, one per round) and peak MB, and the ratios."""
    rows = []
    for k in depths:
        runs = [dict(name=name, impl=impl, shape=SHAPE.but(n_flow=k),
                     options=dict(backend="eager") if impl.startswith("fastglow") else {}) for name, impl in impls]
        timing = time_in_fresh_process(runs, rounds, threads, rosinality)
        for name in timing["wall_s"]:
            log(f"K={k}: {name} steps " + " ".join(f"{t:.2f}" for t in timing["wall_s"][name]) + " s")
        memory = {}
        for run in runs:
            cfg = dict(run, shape=dataclasses.asdict(run["shape"]), steps=3, threads=threads, rosinality=rosinality)
            result = in_fresh_process(cfg, precise_malloc=True)
            memory[run["name"]] = result["step_mb"]
            log(f"K={k}: {run['name']} peak {result['step_mb']:.1f} MB "
                f"(parameter gradients {result['grad_mb']:.1f} MB)")
        row = dict(n_flow=k, times_s=timing["wall_s"], cpu_s=timing["cpu_s"], peak_mb=memory,
                   grad_mb=result["grad_mb"])
        for key, times in (("ratios", timing["wall_s"]), ("cpu_ratios", timing["cpu_s"])):
            row[key] = {f"{a} / {b}": statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))
                        for a, b in RATIOS if a in times and b in times}
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    names = list(rows[0]["times_s"])
    lines = ["| K | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{statistics.median(row['times_s'][n]):.2f} s / {row['peak_mb'][n]:.0f} MB" for n in names]
        lines.append(f"| {row['n_flow']} | " + " | ".join(cells) + " |")
    lines += ["", "| K | " + " | ".join(rows[0]["ratios"]) + " | memory: fastglow reversible / rosinality + "
              "checkpoint |", "|---|" + "---|" * (len(rows[0]["ratios"]) + 1)]
    for row in rows:
        mem = row["peak_mb"].get("fastglow reversible", float("nan")) / row["peak_mb"].get(
            "rosinality + checkpoint", float("nan"))
        lines.append(f"| {row['n_flow']} | " + " | ".join(
            f"{v:.3f}x (CPU {row['cpu_ratios'][name]:.3f}x)" for name, v in row["ratios"].items())
            + f" | {mem:.3f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rosinality", default=os.environ.get("ROSINALITY_MODEL"),
                        help="path of rosinality/glow-pytorch's model.py (default: $ROSINALITY_MODEL)")
    parser.add_argument("--depths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--rounds", type=int, default=9, help="timed steps per implementation, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args(argv)
    if not args.rosinality or not Path(args.rosinality).is_file():
        parser.error("give rosinality/glow-pytorch's model.py with --rosinality PATH or $ROSINALITY_MODEL")
    rows = measure(args.depths, args.rounds, args.threads, str(Path(args.rosinality).resolve()),
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(format_table(rows))


if __name__ == "__main__":
    main()
