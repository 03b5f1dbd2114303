"""Peak memory of one training step (forward + backward) against depth K and batch size: reversible (whole
batch, and in backward chunks), per-Flow ``torch.utils.checkpoint`` and plain autograd, all in fastglow's eager
maths (the checkpointed one is :class:`fastglow.reference.Glow`, whose Flows are modules to wrap).

On CPU the figure is the peak RSS of a fresh subprocess above its own baseline
(:func:`fastglow.testing.measure_step_memory`), taken after the model is built, ActNorm is initialised and one
identical warm-up step has run (libraries loaded, ``.grad`` allocated; later steps accumulate into it in place, so
the figure is activations and temporaries). Before each measured step the high-water mark is reset
(``/proc/self/clear_refs``); the least of a few steps is reported. The peak is read from ``VmHWM``, not
``ru_maxrss``: Linux folds the pre-exec address space into ``ru_maxrss``, so a child started from a large parent
(a pytest process holding models) reports at least the parent's RSS. The child runs one thread, one malloc arena
and a 4 kB mmap threshold, so freed tensors go back to the OS at once and the allocator's retained memory does not
blur the numbers.

    python -m benchmarks.suites.bench_memory          # depth table, K in (4, 8, 16, 32, 64), width 32
    python -m benchmarks.suites.bench_memory --hidden 512 --depths 16 --batches 8 32     # batch table at width 512
"""

from __future__ import annotations

import argparse

from benchmarks.harness import MEMORY_SHAPE, level_tensor_mb, measure_step_memory

DEPTHS = (4, 8, 16, 32, 64)
CHUNK = 2
# (column, mode, backward_chunk)
VARIANTS = (("reversible", "reversible", None), (f"reversible chunk {CHUNK}", "reversible", CHUNK),
            ("checkpoint per Flow", "checkpoint", None), ("plain", "plain", None))


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
                             level_tensor_mb=level_tensor_mb(**first),
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
    parser.add_argument("--batches", type=int, nargs="+", default=[MEMORY_SHAPE.batch])
    parser.add_argument("--hidden", type=int, default=MEMORY_SHAPE.hidden)
    args = parser.parse_args(argv)
    print(format_table(memory_table(args.depths, args.batches, hidden_channels=args.hidden)))


if __name__ == "__main__":
    main()
