"""Peak memory of one training step (forward + backward) against depth K: reversible vs plain autograd.

On CPU the figure is the peak RSS of a fresh subprocess above its own baseline, taken after the model is built,
ActNorm is initialised and one identical warm-up step has run (libraries loaded, ``.grad`` allocated; later
steps accumulate into it in place). Before each measured step the high-water mark is reset
(``/proc/self/clear_refs``); the least of a few steps is reported. The peak is read from ``VmHWM``, not
``ru_maxrss``: Linux folds the pre-exec address space into ``ru_maxrss``, so a child started from a large
parent (a pytest process holding models) reports at least the parent's RSS. The child runs one thread, one
malloc arena and a 4 kB mmap threshold, so freed tensors go back to the OS at once and the allocator's
retained memory does not blur the numbers.

    python benchmarks/bench_memory.py                # prints the table for K in (4, 8, 16, 32, 64)
    pytest benchmarks/bench_memory.py --benchmark-only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

DEFAULT_CONFIG = dict(in_channel=3, img_size=32, batch=8, n_block=3, hidden_channels=32, affine=True)
DEPTHS = (4, 8, 16, 32, 64)

_CHILD = r"""
import json, resource, sys
import torch, fastglow

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

def peak_mb():
    try:  # VmHWM: this address space's peak, reset by clear_refs
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024
    except OSError:  # no procfs: ru_maxrss (kB on Linux, bytes on macOS)
        scale = 2**20 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the high-water mark to the current RSS
        return True
    except OSError:
        return False

cfg = json.loads(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
model = fastglow.Glow(cfg["in_channel"], cfg["n_flow"], cfg["n_block"], affine=cfg["affine"],
                      hidden_channels=cfg["hidden_channels"], reversible=cfg["reversible"], backend="eager")
x = torch.rand(cfg["batch"], cfg["in_channel"], cfg["img_size"], cfg["img_size"]) - 0.5
with torch.no_grad():
    model(x)  # ActNorm's data-dependent init

def step():
    log_p, logdet, _ = model(x)
    (-(log_p + logdet).mean()).backward()

step()  # warm-up
samples = []
for _ in range(cfg["repeats"]):
    reset = reset_peak()
    baseline = rss_mb()
    step()
    samples.append(peak_mb() - baseline)
print(json.dumps(dict(baseline_mb=baseline, step_mb=min(samples), samples_mb=samples, hwm_reset=reset)))
"""


def measure_step_memory(n_flow: int, reversible: bool, repeats: int = 3, **config) -> dict:
    """Peak RSS (MB) of one training step above the model-only baseline, in a fresh subprocess; the least
    of ``repeats`` steps (each after a high-water-mark reset), so a stray allocation does not count."""
    cfg = dict(DEFAULT_CONFIG, **config, n_flow=n_flow, reversible=reversible, repeats=repeats)
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed for {cfg}:\n{proc.stderr[-2000:]}")
    return dict(cfg, **json.loads(proc.stdout.strip().splitlines()[-1]))


def memory_table(depths=DEPTHS, **config) -> list[dict]:
    """One row per K: step memory (MB above baseline) with reversible=True and with plain autograd."""
    rows = []
    for k in depths:
        rev, plain = measure_step_memory(k, True, **config), measure_step_memory(k, False, **config)
        rows.append(dict(n_flow=k, reversible_mb=rev["step_mb"], plain_mb=plain["step_mb"],
                         baseline_mb=rev["baseline_mb"]))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| K | reversible step MB | plain step MB | model baseline MB |", "|---|---|---|---|"]
    lines += [f"| {r['n_flow']} | {r['reversible_mb']:.1f} | {r['plain_mb']:.1f} | {r['baseline_mb']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def test_step_memory_against_depth(benchmark):
    """Smoke run on CPU: two depths; the table rides along in the benchmark's extra_info."""
    rows = benchmark.pedantic(memory_table, kwargs=dict(depths=(2, 8), img_size=16, batch=4),
                              rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    assert all(r["reversible_mb"] >= 0 and r["plain_mb"] > 0 for r in rows)


if __name__ == "__main__":
    print(format_table(memory_table()))
