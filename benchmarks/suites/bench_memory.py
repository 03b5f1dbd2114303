"""Peak memory of one training step (forward + backward) against depth K and batch size: reversible (whole
batch, and in backward chunks), per-Flow ``torch.utils.checkpoint`` and plain autograd, all in fastglow's eager
maths (the checkpointed one is :class:`fastglow.reference.Glow`, whose Flows are modules to wrap).

On CPU the figure is the peak RSS of a fresh subprocess above its own baseline (:mod:`benchmarks.harness`),
taken after the model is built, ActNorm is initialised and one identical warm-up step has run (libraries
loaded, ``.grad`` allocated; later steps accumulate into it in place, so the figure is activations and
temporaries). Before each measured step the high-water mark is reset (``/proc/self/clear_refs``); the least of
a few steps is reported. The peak is read from ``VmHWM``, not ``ru_maxrss``: Linux folds the pre-exec address
space into ``ru_maxrss``, so a child started from a large parent (a pytest process holding models) reports at
least the parent's RSS. The child runs one thread, one malloc arena and a 4 kB mmap threshold, so freed tensors
go back to the OS at once and the allocator's retained memory does not blur the numbers.

    python -m benchmarks.suites.bench_memory                          # depth table, K in (4, 8, 16, 32, 64), width 32
    python -m benchmarks.suites.bench_memory --hidden 512 --depths 16 --batches 8 32   # batch table at width 512
"""

from __future__ import annotations

import argparse

from benchmarks.harness import run_step_child

DEFAULT_CONFIG = dict(in_channel=3, img_size=32, batch=8, n_block=3, hidden_channels=32, affine=True, conv_lu=True)
DEPTHS = (4, 8, 16, 32, 64)
CHUNK = 2
# (column, mode, backward_chunk)
VARIANTS = (("reversible", "reversible", None), (f"reversible chunk {CHUNK}", "reversible", CHUNK),
            ("checkpoint per Flow", "checkpoint", None), ("plain", "plain", None))


def measure_step_memory(n_flow: int, mode, repeats: int = 3, **config) -> dict:
    """Peak RSS (MB) of one training step above the model-only baseline, in a fresh subprocess; the least
    of ``repeats`` steps (each after a high-water-mark reset), so a stray allocation does not count.
    ``mode``: "plain", "reversible" (or a bool: reversible or not) or "checkpoint"."""
    mode = {True: "reversible", False: "plain"}.get(mode, mode)
    cfg = dict(DEFAULT_CONFIG, **config, impl="fastglow", n_flow=n_flow, mode=mode, steps=repeats,
               set_to_none=False, threads=1)
    return run_step_child(cfg, precise_malloc=True)


def level_tensor_mb(batch: int, in_channel: int, img_size: int, n_block: int, **_) -> float:
    """MB of one float32 tensor the size of every level's input together (a level's x_0, y or gradient)."""
    per_sample = sum(in_channel * 2 ** level * 4 * (img_size // 2 ** (level + 1)) ** 2 for level in range(n_block))
    return batch * per_sample * 4 / 2**20


def memory_table(depths=DEPTHS, batches=(None,), variants=VARIANTS, **config) -> list[dict]:
    """One row per (K, batch): step memory (MB above baseline) of every variant."""
    rows = []
    for k in depths:
        for batch in batches:
            cfg = dict(config, **({} if batch is None else dict(batch=batch)))
            results = {name: measure_step_memory(k, mode, backward_chunk=chunk, **cfg)
                       for name, mode, chunk in variants}
            first = next(iter(results.values()))
            rows.append(dict(n_flow=k, batch=first["batch"], baseline_mb=first["baseline_mb"],
                             level_tensor_mb=level_tensor_mb(**dict(DEFAULT_CONFIG, **cfg)),
                             **{name: r["step_mb"] for name, r in results.items()}))
    return rows


def format_table(rows: list[dict], variants=VARIANTS) -> str:
    names = [name for name, _, _ in variants]
    lines = ["| K | batch | " + " | ".join(f"{n} MB" for n in names)
             + " | one level-tensor set MB | model baseline MB |",
             "|---|---|" + "---:|" * (len(names) + 2)]
    lines += [f"| {r['n_flow']} | {r['batch']} | " + " | ".join(f"{r[n]:.1f}" for n in names)
              + f" | {r['level_tensor_mb']:.2f} | {r['baseline_mb']:.1f} |" for r in rows]
    return "\n".join(lines)


def test_step_memory_against_depth(benchmark):
    """Smoke run on CPU: two depths; the table rides along in the benchmark's extra_info."""
    rows = benchmark.pedantic(memory_table, kwargs=dict(depths=(2, 8), img_size=16, batch=4),
                              rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    # every variant measured; at this tiny size a step's RSS growth above the baseline can round to 0 MB (the
    # allocator reuses the warm-up's pages), so only plain autograd, which keeps every activation, must show some
    assert all(r[name] >= 0 for r in rows for name, _, _ in VARIANTS) and all(r["plain"] > 0 for r in rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument("--batches", type=int, nargs="+", default=[DEFAULT_CONFIG["batch"]])
    parser.add_argument("--hidden", type=int, default=DEFAULT_CONFIG["hidden_channels"])
    args = parser.parse_args(argv)
    print(format_table(memory_table(args.depths, args.batches, hidden_channels=args.hidden)))


if __name__ == "__main__":
    main()
