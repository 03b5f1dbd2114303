"""Building blocks of the one-command GPU run (:mod:`benchmarks.gpu_run`): the shapes at each scale, the
implementations compared, a timed training step, peak memory, kernel timing.

Implementations (all train with Adam on bits/dim, at the same weights: ActNorm initialised on the batch, then
every parameter perturbed, so no coupling is the identity):

    fastglow-reversible   fastglow.Glow, Triton backend, reversible backprop (the default)
    fastglow-plain        fastglow.Glow, Triton backend, plain autograd
    eager                 fastglow.reference.Glow in float32 (rosinality's maths, eager PyTorch)
    compiled              torch.compile(reference)  (CPU smoke: the "eager" backend; inductor takes minutes)
    compiled-per-flow     the reference with every Flow compiled on its own (the fallback when compiling the
                          whole model does not finish in its budget)
    checkpoint            the reference with each Flow under torch.utils.checkpoint (keeps only step inputs)
    rosinality            rosinality/glow-pytorch's model.py from --rosinality PATH (width fixed at 512)
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import statistics
import time
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastglow
from fastglow import reference
from fastglow.testing import initialized_model

GB = 1e9


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    in_channel: int
    img_size: int
    n_flow: int
    n_block: int
    hidden: int
    affine: bool
    batch: int

    def but(self, **changes) -> "ModelShape":
        return dataclasses.replace(self, **changes)

    def label(self) -> str:
        return (f"{self.in_channel}x{self.img_size}x{self.img_size}, K={self.n_flow}, L={self.n_block}, "
                f"width {self.hidden}, {'affine' if self.affine else 'additive'}, batch {self.batch}")


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
        tests=("tests/test_kernels_flow_step.py", "tests/test_kernels_lu_squeeze.py", "tests/test_cuda_graph.py",
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    """Give the memory of dropped models back before the next measurement (GPU: cycles collected, cache emptied;
    a CPU smoke run skips it: a full collection costs a third of a second there)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The implementations
# ----------------------------------------------------------------------------------------------
class CheckpointedFlow(nn.Module):
    """A reference Flow whose forward keeps only its input for backward (torch.utils.checkpoint)."""

    def __init__(self, flow: reference.Flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return checkpoint(self.flow, x, use_reentrant=False)

    def reverse(self, y):
        return self.flow.reverse(y)


def load_rosinality(path: str | Path):
    """rosinality/glow-pytorch's ``model.py`` from a folder (or the file itself), imported as a module."""
    path = Path(path)
    path = path / "model.py" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--rosinality: no model.py at {path}")
    spec = importlib.util.spec_from_file_location("rosinality_glow_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _construct(impl: str, shape: ModelShape, rosinality, options: dict) -> nn.Module:
    c, k, l, affine = shape.in_channel, shape.n_flow, shape.n_block, shape.affine
    if impl.startswith("fastglow"):
        return fastglow.Glow(c, k, l, affine=affine, hidden_channels=shape.hidden, backend="triton",
                             reversible=impl != "fastglow-plain", **options)
    if impl == "rosinality":
        return load_rosinality(rosinality).Glow(c, k, l, affine=affine, conv_lu=True)
    if impl in ("eager", "compiled", "compiled-per-flow", "checkpoint"):
        return reference.Glow(c, k, l, affine=affine, hidden_channels=shape.hidden)
    raise ValueError(f"unknown implementation {impl!r}")


def build(impl: str, shape: ModelShape, device: torch.device, *, rosinality=None, batch: int | None = None,
          dtype: torch.dtype = torch.float32, **options):
    """-> (model, run, x): the model (its parameters), the callable a step runs (x -> (log_p, logdet, z)), and a
    batch x ~ U(-0.5, 0.5) of the shape. ActNorm is initialised on x and every parameter perturbed."""
    torch.manual_seed(0)
    size = (batch or shape.batch, shape.in_channel, shape.img_size, shape.img_size)
    x = torch.rand(*size, device=device, dtype=dtype) - 0.5
    model = _construct(impl, shape, rosinality, options).to(device, dtype)
    initialized_model(model, x, sigma=0.01)
    if impl == "checkpoint":
        for block in model.blocks:
            block.flows = nn.ModuleList(CheckpointedFlow(flow) for flow in block.flows)
    if impl == "compiled-per-flow":
        for block in model.blocks:
            for flow in block.flows:
                flow.compile(backend=compile_backend(device))
    run = torch.compile(model, backend=compile_backend(device)) if impl == "compiled" else model
    return model, run, x


def compile_backend(device: torch.device) -> str:
    return "inductor" if device.type == "cuda" else "eager"  # CPU smoke: dynamo's tracing only


def training_step(model: nn.Module, run, x: torch.Tensor, optimizer) -> torch.Tensor:
    """zero_grad, forward, bits/dim, backward, Adam: one step, as every implementation takes it."""
    optimizer.zero_grad(set_to_none=True)
    log_p, logdet, _ = run(x)
    loss = fastglow.bits_per_dim(log_p, logdet, x.shape, 256)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
class MemoryProbe:
    """Peak memory between ``reset()`` and ``peak()``: the CUDA caching allocator's peak
    (``max_memory_allocated``, every live tensor: weights, optimizer state, activations); on a CPU the process's
    resident high-water mark (``VmHWM`` after ``/proc/self/clear_refs``), whole process."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated()
        return _proc_status_kb("VmRSS") * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        self.start = self.current()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_status_kb("VmHWM") * 1024


def _proc_status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field + ":")).split()[1])
    except (OSError, StopIteration):
        return 0


def time_steps(step, device: torch.device, scale: Scale) -> dict:
    """Run ``scale.warmup`` untimed calls (the first also compiles), then time up to ``scale.reps`` calls of
    ``step`` (at least 2 unless reps is 1; no more once ``scale.seconds_per_impl`` s are spent).
    -> ms (median), ms_all, first_s (the first call), peak_gb (peak memory over the timed calls), start_gb
    (allocated before them); for a step returning a scalar loss, first_loss and loss (the last)."""
    first = out = first_s = None
    times: list[float] = []
    if scale.warmup:
        t0 = time.perf_counter()
        first = step()
        sync(device)
        first_s = time.perf_counter() - t0
        for _ in range(scale.warmup - 1):
            step()
    probe = MemoryProbe(device)
    probe.reset()
    while len(times) < scale.reps and (len(times) < min(2, scale.reps) or sum(times) < scale.seconds_per_impl):
        t0 = time.perf_counter()
        out = step()
        first = out if first is None else first
        sync(device)
        times.append(time.perf_counter() - t0)
    result = dict(ms=1e3 * statistics.median(times), ms_all=[1e3 * t for t in times], first_s=first_s or times[0],
                  peak_gb=probe.peak() / GB, start_gb=probe.start / GB)
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
        model, run, x = build(impl, shape, device, rosinality=rosinality, batch=batch, **options)
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
    fn()
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)
