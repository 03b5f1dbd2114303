"""The one harness every suite, the GPU run and the studies feed: the model builder, the training step and the
memory probes of :mod:`fastglow.testing.workloads` (the tests use them too), the one timer (interleaved rounds,
wall and CPU), and the kernels' eager counterparts.

``python -m benchmarks.harness '<json>'`` (run by :func:`time_in_fresh_process`) builds every run of the config
(``runs``: name, impl, shape, options; ``rosinality``; ``threads``), warms each up once and times ``rounds``
rounds of one training step each: -> wall_s and cpu_s per run name, one per round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Callable

import torch

from benchmarks import ROOT
from fastglow.testing.workloads import (IMPLEMENTATIONS, MEMORY_SHAPE, MemoryProbe, ModelShape,
                                        build_model, in_fresh_process, kernel_operands, level_tensor_mb,
                                        load_glow_module, measure_step_memory, step_memory, training_step)

__all__ = ["IMPLEMENTATIONS", "MEMORY_SHAPE", "MemoryProbe", "ModelShape", "build_model", "in_fresh_process",
           "kernel_operands", "level_tensor_mb", "load_glow_module", "measure_step_memory", "step_memory",
           "training_step", "sync", "synchronized", "time_rounds", "time_in_fresh_process", "eager_coupling_mix",
           "lu_level"]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synchronized(fn, device):
    """fn, such that a timed call includes the GPU work it queued on ``device``."""
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        sync(device)
        return out
    return run


def time_rounds(steps: dict[str, Callable], rounds: int, *, device="cpu", warmup: int = 0, min_rounds: int = 2,
                seconds: float = math.inf, before_timing: Callable | None = None) -> dict[str, dict]:
    """The one timer. ``warmup`` untimed calls of each step (the first's time kept as first_s), then
    ``before_timing()``, then rounds of one call of each step, the order rotating by one from round to round so
    neighbouring calls of different steps see the same load: at most ``rounds``, at least ``min_rounds``, no more
    once ``seconds`` of wall time per step are spent. Each call is synchronised with ``device``.
    -> per step: wall_s and cpu_s (process CPU time), one per round; first_s; first and last (outputs)."""
    names = list(steps)
    result = {n: dict(wall_s=[], cpu_s=[], first_s=None, first=None, last=None) for n in names}
    for name in names:
        for i in range(warmup):
            t0 = time.perf_counter()
            out = steps[name]()
            sync(device)
            if i == 0:
                result[name].update(first_s=time.perf_counter() - t0, first=out)
    if before_timing is not None:
        before_timing()
    spent, r = 0.0, 0
    while r < rounds and (r < min(min_rounds, rounds) or spent < seconds * len(names)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0, cpu0 = time.perf_counter(), time.process_time()
            out = steps[name]()
            sync(device)
            wall = time.perf_counter() - t0
            rec = result[name]
            rec["wall_s"].append(wall)
            rec["cpu_s"].append(time.process_time() - cpu0)
            rec["last"] = out
            if rec["first"] is None:
                rec.update(first=out, first_s=wall)
            spent += wall
        r += 1
    return result


def time_in_fresh_process(runs: list[dict], rounds: int, threads: int = 1, rosinality=None) -> dict:
    """Interleaved training steps of several implementations in one fresh process (default allocator): ``runs``
    as dicts with name, impl, shape (a ModelShape) and options -> wall_s and cpu_s per name."""
    runs = [dict(run, shape=dataclasses.asdict(run["shape"])) for run in runs]
    cfg = dict(runs=runs, rounds=rounds, threads=threads, rosinality=rosinality)
    return in_fresh_process(cfg, module="benchmarks.harness", precise_malloc=False, cwd=ROOT)


def _time_here(cfg: dict) -> dict:
    torch.set_num_threads(cfg.get("threads", 1))
    steps = {}
    for run in cfg["runs"]:
        model, forward, x = build_model(run["impl"], ModelShape(**run["shape"]), rosinality=cfg.get("rosinality"),
                                        **run.get("options", {}))
        steps[run["name"]] = lambda model=model, forward=forward, x=x: training_step(model, forward, x)
    timed = time_rounds(steps, cfg["rounds"], device="cpu", warmup=1, min_rounds=cfg["rounds"])
    return dict(wall_s={n: t["wall_s"] for n, t in timed.items()}, cpu_s={n: t["cpu_s"] for n, t in timed.items()})


# ----------------------------------------------------------------------------------------------
# The kernels' eager counterparts (what each fused kernel replaces)
# ----------------------------------------------------------------------------------------------
def eager_coupling_mix(x, h_raw, zscale, mix_weight, mix_bias, affine: bool = True, **_):
    """Coupling combine of step k (h = h_raw exp(3 zscale)), then the folded ActNorm + 1x1 mix of step k+1, in
    eager ops -> (mixed, logdet)."""
    from torch.nn import functional as F

    from fastglow.reference import coupling_combine
    x_a, x_b = x.chunk(2, 1)
    x_b, logdet = coupling_combine(x_b, h_raw * torch.exp(3 * zscale.view(1, -1, 1, 1)), affine)
    return F.conv2d(torch.cat([x_a, x_b], 1), mix_weight[:, :, None, None], mix_bias), logdet


def lu_level(k: int, c: int, device):
    """K reference Flows at C channels -> (fused, eager): every step's W, W^-1 and log|det W| in one batched
    kernel each way, or the eager loop over the steps."""
    from fastglow import reference
    from fastglow.backends.triton import fold_level  # after TRITON_INTERPRET is decided
    torch.manual_seed(0)
    flows = torch.nn.ModuleList(reference.Flow(c, hidden_channels=4) for _ in range(k)).to(device)

    def eager():
        ws = [f.invconv.calc_weight() for f in flows]
        return [torch.linalg.inv(w) for w in ws], [f.invconv.log_abs_det() for f in flows]

    return lambda: fold_level(flows), eager


if __name__ == "__main__":
    print(json.dumps(_time_here(json.loads(sys.argv[1]))))
