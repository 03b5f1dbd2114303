"""Building blocks of the one-command GPU run (:mod:`benchmarks.gpu_run`): the shapes at each scale, the
implementations compared (built by :func:`benchmarks.harness.build_model`, which lists them), a timed training
step with its peak memory, kernel timing.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import traceback

import torch

from benchmarks.harness import MemoryProbe, ModelShape, build_model, time_rounds, training_step

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Scale:
    """Everything that differs between the real GPU run and the CPU smoke run."""
    name: str
    cifar: ModelShape
    celeba: ModelShape
    depths: tuple[int, ...]  # memory vs K, at the CIFAR shape, in the order measured (the target's K first)
    kernel_shapes: tuple[tuple[int, int, int, int], ...]  # (B, C, H, W): the squeezed levels of a 256^2 image
    lu_level: tuple[int, int]  # (K, C) of the batched LU weight benchmark
    limits_gb: tuple[float, ...]  # memory limits of the largest-batch search
    batch_cap: int  # the largest batch the search tries
    warmup: int  # untimed steps before timing (the first also compiles; CPU smoke: none)
    reps: int  # timed steps, at most
    seconds_per_impl: float  # stop timing an implementation after this long (at least 2 steps)
    margin_s: float  # a phase starts no measurement with less time than this left
    tests: tuple[str, ...]  # the test files of the native test run
    tests_filter: str = ""  # their pytest -k expression ("": all)


SCALES = {
    "gpu": Scale(
        name="gpu",
        cifar=ModelShape("cifar", 3, 32, 32, 3, 512, True, 64),
        celeba=ModelShape("celeba256", 3, 256, 32, 6, 512, False, 16),
        depths=(32, 8, 16, 64),
        kernel_shapes=((16, 12, 128, 128), (16, 24, 64, 64), (16, 48, 32, 32)),
        lu_level=(32, 48), limits_gb=(40.0, 80.0), batch_cap=1024,
        warmup=2, reps=8, seconds_per_impl=2.5, margin_s=8.0,
        tests=("tests/test_kernels_flow_step.py", "tests/test_kernels_lu_squeeze.py", "tests/test_kernel_ops.py",
               "tests/test_cuda_graph.py",
               "tests/test_gpu_options.py", "tests/test_triton_backend.py", "tests/test_reversible.py",
               "tests/test_reversible_trust.py", "tests/test_conditional.py", "tests/test_checks.py")),
    "cpu": Scale(
        name="cpu",
        cifar=ModelShape("cifar-tiny", 1, 8, 1, 2, 4, True, 2),
        celeba=ModelShape("celeba-tiny", 1, 8, 1, 2, 4, False, 2),
        depths=(1, 2),
        kernel_shapes=((2, 4, 4, 4),),
        lu_level=(2, 4), limits_gb=(0.02, 0.04), batch_cap=4,
        warmup=0, reps=1, seconds_per_impl=0.0, margin_s=1.5,
        tests=("tests/test_cuda_graph.py",), tests_filter="bad_use"),
}


def quick(scale: Scale) -> Scale:
    """The ``--quick`` form of a scale (a retry within ~150 s): fewer timed steps, the first and the target's
    depth only, the float32 tests only."""
    no_f64 = "not float64 and not gradcheck"
    return dataclasses.replace(scale, warmup=min(scale.warmup, 1), reps=min(scale.reps, 3),
                               seconds_per_impl=min(scale.seconds_per_impl, 1.0), depths=scale.depths[:2],
                               tests_filter=f"({scale.tests_filter}) and {no_f64}" if scale.tests_filter else no_f64)

TRAIN_IMPLS = ("fastglow-reversible", "fastglow-plain", "eager", "checkpoint")


def device_of(scale: Scale) -> torch.device:
    return torch.device("cuda" if scale.name == "gpu" else "cpu")


def free_memory() -> None:
    """Give the memory of dropped models back before the next measurement (GPU: cycles collected, cache emptied;
    a CPU smoke run skips it: a full collection costs a third of a second there)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
def time_steps(step, device: torch.device, scale: Scale) -> dict:
    """Run ``scale.warmup`` untimed calls (the first also compiles), then time up to ``scale.reps`` calls of
    ``step`` (at least 2 unless reps is 1; no more once ``scale.seconds_per_impl`` s are spent).
    -> ms (median), ms_all, first_s (the first call), peak_gb (peak memory over the timed calls), start_gb
    (allocated before them); for a step returning a scalar loss, first_loss and loss (the last)."""
    probe = MemoryProbe(device)
    timed = time_rounds({"step": step}, scale.reps, device=device, warmup=scale.warmup,
                        seconds=scale.seconds_per_impl, before_timing=probe.reset)["step"]
    result = dict(ms=1e3 * statistics.median(timed["wall_s"]), ms_all=[1e3 * t for t in timed["wall_s"]],
                  first_s=timed["first_s"], peak_gb=probe.peak() / GB, start_gb=probe.start / GB)
    first, out = timed["first"], timed["last"]
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        result.update(first_loss=float(first), loss=float(out))
    return result


def attempt(fn, **label) -> dict:
    """fn() -> a record, or the error as one (traceback to the phase's log): a failure costs one row, not the
    phase."""
    try:
        return dict(label, **fn())
    except Exception as err:
        traceback.print_exc()
        free_memory()
        return dict(label, status=f"error: {type(err).__name__}: {err}"[:300])


def measure_training(impl: str, shape: ModelShape, device: torch.device, scale: Scale, *, rosinality=None,
                     batch: int | None = None, **options) -> dict:
    """One implementation's training step: time and peak memory, ``status`` "ok", or "oom" when it does not
    fit (any other error is raised: wrap in :func:`attempt`)."""
    model = run = x = optimizer = None
    try:
        model, run, x = build_model(impl, shape, device, rosinality=rosinality, batch=batch, **options)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
        result = time_steps(lambda: training_step(model, run, x, optimizer), device, scale)
        return dict(result, status="ok", batch=x.shape[0])
    except torch.OutOfMemoryError:
        return dict(status="oom", batch=batch or shape.batch)
    finally:
        del model, run, x, optimizer
        free_memory()


def time_kernel(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn()``: on CUDA triton's do_bench (L2 flushed before every call, CUDA events);
    on a CPU the second of two calls (a smoke figure)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    return 1e3 * time_rounds({"kernel": fn}, 1, device=device, warmup=1)["kernel"]["wall_s"][0]
