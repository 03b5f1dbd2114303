"""Training steps measured in a fresh process: one implementation's peak RSS above a baseline, or several
implementations' step times, interleaved step by step.

Run by :func:`run_step_child` (``python -m benchmarks.harness '<json config>'``), it builds the model, runs
ActNorm's data-dependent init (one no-grad forward) and one warm-up step, then ``steps`` training steps
(forward, bits/dim, backward), each timed and each with its own peak RSS above the RSS just before it (the
high-water mark reset by ``/proc/self/clear_refs``). With ``set_to_none`` (default) the parameter gradients
are freed before every step, as a training loop's ``zero_grad()`` does, so every figure includes allocating
them (the same for every implementation); without it the steps accumulate into ``.grad`` in place and the
figure is the activations' (and temporaries') alone.

With a list of configs under ``"interleave"`` it builds every implementation instead and times ``rounds``
rounds of one step each, the implementations' order rotating from round to round (wall clock and process CPU
time): neighbouring steps of different implementations see the same load on a shared machine.

Config keys: ``impl`` "fastglow" or "rosinality" (then ``rosinality_path``: rosinality/glow-pytorch's model.py,
read at run time, never part of this repository); ``mode`` "plain", "reversible" or "checkpoint" (per-Flow
``torch.utils.checkpoint``, what a user adds in three lines); ``backward_chunk``; the shape (``in_channel``,
``img_size``, ``batch``, ``n_flow``, ``n_block``, ``hidden_channels``, ``affine``, ``conv_lu``); ``threads``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

# glibc: one arena, every block >= 4 KiB its own mapping returned on free: RSS follows the live tensors
PRECISE_MALLOC = dict(MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    try:  # VmHWM: this address space's peak, reset by clear_refs
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024
    except OSError:  # no procfs: ru_maxrss (kB on Linux, bytes on macOS)
        scale = 2**20 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the high-water mark to the current RSS
        return True
    except OSError:
        return False


def checkpoint_each_flow(model) -> None:
    """Wrap every Flow's forward in ``torch.utils.checkpoint`` (non-reentrant): only each step's input is kept."""
    from torch.utils.checkpoint import checkpoint
    for block in model.blocks:
        for flow in block.flows:
            flow.forward = lambda x, run=flow.forward: checkpoint(run, x, use_reentrant=False)


def build(cfg):
    if cfg["impl"] == "rosinality":
        import importlib.util
        spec = importlib.util.spec_from_file_location("rosinality_model", cfg["rosinality_path"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if cfg["hidden_channels"] != 512 or cfg["mode"] == "reversible":
            raise ValueError("rosinality's Glow has width 512 and no reversible mode")
        return module.Glow(cfg["in_channel"], cfg["n_flow"], cfg["n_block"], affine=cfg["affine"],
                           conv_lu=cfg["conv_lu"])
    import fastglow
    if cfg["mode"] == "checkpoint":  # fastglow's eager maths with a Flow forward to wrap: the reference Glow
        return fastglow.reference.Glow(cfg["in_channel"], cfg["n_flow"], cfg["n_block"], affine=cfg["affine"],
                                       conv_lu=cfg["conv_lu"], hidden_channels=cfg["hidden_channels"])
    return fastglow.Glow(cfg["in_channel"], cfg["n_flow"], cfg["n_block"], affine=cfg["affine"],
                         conv_lu=cfg["conv_lu"], hidden_channels=cfg["hidden_channels"], backend="eager",
                         reversible=cfg["mode"] == "reversible", backward_chunk=cfg.get("backward_chunk"))


def training_step(cfg):
    """-> (model, step): the model built and ActNorm-initialised, and one training step of it (gradients set
    to None first unless ``set_to_none`` is false), warmed up once."""
    import torch
    from fastglow import bits_per_dim
    torch.manual_seed(0)
    model = build(cfg)
    x = torch.rand(cfg["batch"], cfg["in_channel"], cfg["img_size"], cfg["img_size"]) - 0.5
    with torch.no_grad():
        model(x)  # ActNorm's data-dependent init
    if cfg["mode"] == "checkpoint":
        checkpoint_each_flow(model)
    set_to_none = cfg.get("set_to_none", True)

    def step():
        if set_to_none:
            model.zero_grad(set_to_none=True)
        log_p, logdet, _ = model(x)
        bits_per_dim(log_p, logdet, x.shape, 256).backward()

    step()  # warm-up
    return model, step


def measure_memory(cfg) -> dict:
    """Peak RSS above the RSS just before the step, for ``steps`` steps (the least counts)."""
    model, step = training_step(cfg)
    peaks = []
    for _ in range(cfg.get("steps", 3)):
        if cfg.get("set_to_none", True):
            model.zero_grad(set_to_none=True)  # before the baseline, so it is taken without gradients
        reset = reset_peak()
        baseline = rss_mb()
        step()
        peaks.append(peak_mb() - baseline)
    grad_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return dict(baseline_mb=baseline, step_mb=min(peaks), samples_mb=peaks, grad_mb=grad_mb, hwm_reset=reset)


def measure_interleaved(cfgs: list[dict], rounds: int) -> dict:
    """Per implementation (by its ``name``): wall-clock and CPU seconds of one step per round."""
    steps = {cfg["name"]: training_step(cfg)[1] for cfg in cfgs}
    names = list(steps)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return dict(wall_s=wall, cpu_s=cpu)


def main(cfg) -> dict:
    import torch
    torch.set_num_threads(cfg.get("threads", 1))
    if "interleave" in cfg:
        return measure_interleaved(cfg["interleave"], cfg["rounds"])
    return measure_memory(cfg)


def run_step_child(cfg: dict, precise_malloc: bool = True, timeout: float = 1800) -> dict:
    """Run :func:`main` on ``cfg`` in a fresh interpreter (``precise_malloc``: RSS follows live memory; off for
    timing, so allocation costs what it costs in a normal process) -> cfg plus the measurements."""
    threads = str(cfg.get("threads", 1))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if precise_malloc:
        env.update(PRECISE_MALLOC)
    from benchmarks import ROOT
    proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", json.dumps(cfg)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"step measurement failed for {cfg}:\n{proc.stderr[-2000:]}")
    return dict(cfg, **json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
