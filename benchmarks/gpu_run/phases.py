"""The phases of the one-command GPU run (:mod:`benchmarks.gpu_run`). Each runs in its own process, records
into ``DIR/phase_<name>.json`` after every measurement (a phase stopped by its budget keeps what it measured),
and watches its own deadline (``ctx.time_left()``) so it stops between measurements rather than being killed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastglow
from benchmarks import ROOT
from benchmarks.gpu_run.kernels import phase_kernels  # noqa: F401  (a phase, found by name)
from benchmarks.gpu_run.measure import (GB, TRAIN_IMPLS, Scale, attempt, device_of, free_memory, measure_training,
                                        time_steps)
from benchmarks.harness import MemoryProbe, build_model, sync, training_step
from fastglow.testing import max_rel_error, models_on_one_state, rel_error




class Recorder:
    """A phase's results, rewritten atomically to its JSON file after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def put(self, key: str, sub: str, value) -> None:
        self.data.setdefault(key, {})[sub] = value
        self.flush()

    def append(self, key: str, value) -> None:
        self.data.setdefault(key, []).append(value)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


@dataclasses.dataclass
class PhaseContext:
    scale: Scale
    rec: Recorder
    deadline: float  # time.monotonic() by which the phase should have returned
    out: Path
    rosinality: str | None = None

    @property
    def device(self) -> torch.device:
        return device_of(self.scale)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self) -> bool:
        """Too little time left for another measurement: stop, keeping what is recorded."""
        return self.time_left() < self.scale.margin_s


# ----------------------------------------------------------------------------------------------
# env, tests
# ----------------------------------------------------------------------------------------------
def phase_env(ctx: PhaseContext) -> None:
    import numpy
    import triton
    info = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                numpy=numpy.__version__, fastglow=fastglow.__version__, platform=platform.platform(),
                cpu_count=os.cpu_count(), cuda=torch.cuda.is_available(), scale=ctx.scale.name,
                git_commit=_git_commit(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=props.total_memory / GB, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", cuda_runtime=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        info["device"] = (f"{props.name}, {props.total_memory / GB:.1f} GB, {props.multi_processor_count} SMs, "
                          f"sm_{props.major}{props.minor}, CUDA {torch.version.cuda}")
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no CUDA"
    ctx.rec.data.update(info)
    ctx.rec.flush()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown (no git)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def phase_tests(ctx: PhaseContext) -> None:
    """The kernel and model tests, natively, every float32 test before any float64 one, every failure reported
    (no -x), stopped at the phase budget with the counts so far."""
    select = ("-k", ctx.scale.tests_filter) if ctx.scale.tests_filter else ()
    cmd = [sys.executable, "-m", "pytest", "-v", "--float64-last", "-p", "no:cacheprovider", *select,
           *ctx.scale.tests]
    ctx.rec.set("command", " ".join(["python", *cmd[1:]]))
    log = ctx.out / "logs" / "pytest.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)  # in the phase's group
        print(f"pytest pid {proc.pid}: {' '.join(cmd)}", flush=True)
        try:
            ctx.rec.set("exit_code", proc.wait(timeout=max(1.0, ctx.time_left() - ctx.scale.margin_s)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ctx.rec.set("stopped", "the phase budget ran out: counts so far")
    text = log.read_text(errors="replace")
    counts = {k: len(re.findall(rf" {k.upper()}(?:\s|$)", text)) for k in ("passed", "failed", "error", "skipped")}
    ctx.rec.data.update(counts, duration_s=time.monotonic() - t0,
                        failures=re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)[:30])
    ctx.rec.flush()


# ----------------------------------------------------------------------------------------------
# Training steps, memory, largest batch
# ----------------------------------------------------------------------------------------------
def _train_impls(ctx: PhaseContext, shape, impls) -> None:
    ctx.rec.set("shape", dataclasses.asdict(shape))
    for impl in impls:
        if ctx.out_of_time():
            ctx.rec.put("impls", impl, dict(status="skipped: the phase budget ran out"))
            continue
        ctx.rec.put("impls", impl, attempt(lambda: measure_training(impl, shape, ctx.device, ctx.scale,
                                                                   rosinality=ctx.rosinality)))


def phase_train_cifar(ctx):
    _train_impls(ctx, ctx.scale.cifar, TRAIN_IMPLS + (("rosinality",) if ctx.rosinality else ()))


def phase_train_cifar_compiled(ctx):
    _train_impls(ctx, ctx.scale.cifar, ("compiled",))


def phase_train_cifar_compiled_per_flow(ctx):
    _train_impls(ctx, ctx.scale.cifar, ("compiled-per-flow",))


def phase_train_celeba(ctx):
    _train_impls(ctx, ctx.scale.celeba, TRAIN_IMPLS)


def phase_memory_vs_k(ctx: PhaseContext) -> None:
    """Peak memory of a training step at the CIFAR shape for K in scale.depths, per implementation."""
    quick = dataclasses.replace(ctx.scale, warmup=min(1, ctx.scale.warmup), reps=1, seconds_per_impl=0.0)
    for k in ctx.scale.depths:  # the target's K first
        for impl in TRAIN_IMPLS:
            if ctx.out_of_time():
                ctx.rec.set("stopped", f"phase budget ran out before {impl} at K={k}")
                return
            r = attempt(lambda: measure_training(impl, ctx.scale.cifar.but(n_flow=k), ctx.device, quick))
            ctx.rec.append("rows", dict(impl=impl, n_flow=k, **{key: r.get(key) for key in
                                                                  ("status", "peak_gb", "start_gb", "ms")}))


def phase_max_batch(ctx: PhaseContext) -> None:
    """Largest batch of a training step at the CelebA-HQ shape under each memory limit: the allocator capped at
    the limit (CUDA), no OOM and a peak within it. One model and optimizer per implementation (their state made
    by a first step at batch 2); per trial one step. Doubling from 16 (from the smaller limit's answer for the
    next limit), then bisection to 1/8."""
    shape = ctx.scale.celeba
    ctx.rec.set("shape", dataclasses.asdict(shape))
    for impl in ("fastglow-reversible", "eager"):
        model, _, x = build_model(impl, shape, ctx.device, batch=2)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
        training_step(model, model, x, optimizer)
        known = 0
        for limit in ctx.scale.limits_gb:
            start = min(max(16, 2 * known), ctx.scale.batch_cap)
            lo, hi, trials = largest_batch(_fits_under(ctx, model, optimizer, shape, limit), start,
                                           ctx.scale.batch_cap, ctx.out_of_time, known_ok=known)
            ctx.rec.append("rows", dict(impl=impl, limit_gb=limit, largest_ok=lo, smallest_failed=hi,
                                        capped=hi is None and lo >= ctx.scale.batch_cap, trials=trials))
            known = lo
        del model, optimizer, x
        free_memory()
    if ctx.device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)


def _fits_under(ctx, model, optimizer, shape, limit_gb: float):
    """-> fits(batch) -> trial record, ``ok`` when one training step at that batch stays within the limit."""
    device = ctx.device
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gb * GB / total))

    def fits(batch: int) -> dict:
        x = None
        probe = MemoryProbe(device)
        try:
            x = torch.rand(batch, shape.in_channel, shape.img_size, shape.img_size, device=device) - 0.5
            probe.reset()
            t0 = time.perf_counter()
            training_step(model, model, x, optimizer)
            sync(device)
            # CUDA: everything allocated must fit; CPU smoke: the step's own resident memory (RSS counts all)
            peak = (probe.peak() - (0 if device.type == "cuda" else probe.start)) / GB
            return dict(batch=batch, ok=peak <= limit_gb, peak_gb=peak, s=time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            return dict(batch=batch, ok=False, oom=True)
        finally:
            del x
            optimizer.zero_grad(set_to_none=True)
            free_memory()
    return fits


def largest_batch(fits, start: int, cap: int, out_of_time, known_ok: int = 0):
    """Largest b <= cap with fits(b)["ok"] (assumed monotone; ``known_ok`` is known to fit): double from
    ``start``, then bisect until the gap is at most 1/8 of the answer. -> (largest ok or 0, smallest failed
    or None, trials)."""
    trials: list[dict] = []

    def ok(b: int) -> bool:
        trials.append(fits(b))
        return trials[-1]["ok"]

    lo, hi, b = known_ok, None, max(min(start, cap), known_ok + 1)
    while b <= cap and not out_of_time():
        if not ok(b):
            hi = b
            break
        lo = b
        if b >= cap:
            break
        b = min(2 * b, cap)
    while hi is not None and hi - lo > max(1, lo // 8) and not out_of_time():
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, hi, trials


# ----------------------------------------------------------------------------------------------
# Sampling, accuracy, GPU-side options
# ----------------------------------------------------------------------------------------------
def phase_sampling(ctx: PhaseContext, temperature: float = 0.7) -> None:
    """Images per second of reverse() from N(0, T^2) latents, T = 0.7, fastglow (Triton) vs the eager reference."""
    ctx.rec.set("temperature", temperature)
    for shape in (ctx.scale.cifar, ctx.scale.celeba):
        for impl in ("fastglow-reversible", "eager"):
            if ctx.out_of_time():
                ctx.rec.set("stopped", f"phase budget ran out before {impl} at {shape.name}")
                return
            ctx.rec.put(shape.name, impl, attempt(lambda: _sampling(ctx, impl, shape, temperature)))


def _sampling(ctx: PhaseContext, impl: str, shape, temperature: float) -> dict:
    model, _, _ = build_model(impl, shape, ctx.device)
    zs = fastglow.z_shapes(shape.in_channel, shape.img_size, shape.n_block)

    @torch.no_grad()
    def draw():
        return model.reverse([temperature * torch.randn(shape.batch, *s, device=ctx.device) for s in zs])

    r = time_steps(draw, ctx.device, ctx.scale)
    result = dict(ms=r["ms"], images_per_s=shape.batch / r["ms"] * 1e3, batch=shape.batch,
                  finite=bool(torch.isfinite(draw()).all()))
    del model
    free_memory()
    return result


def phase_accuracy(ctx: PhaseContext) -> None:
    """reverse(forward(x)) on the device, and fastglow (Triton, reversible) against the reference on the same
    weights: outputs and gradients, float32 and float64."""
    cases = [(shape, dtype, impl) for shape, dtype in ((ctx.scale.cifar, torch.float32),
                                                       (ctx.scale.cifar, torch.float64),
                                                       (ctx.scale.celeba, torch.float32))
             for impl in ("fastglow-reversible", "eager")]
    for shape, dtype, impl in cases:
        if not ctx.out_of_time():
            ctx.rec.append("roundtrip", attempt(lambda: _roundtrip(ctx, impl, shape, dtype), impl=impl,
                                                shape=shape.name, dtype=str(dtype)[6:]))
    for dtype in (torch.float64, torch.float32):
        if not ctx.out_of_time():
            ctx.rec.append("vs_reference", attempt(lambda: _agreement(ctx, dtype), dtype=str(dtype)[6:]))


def _roundtrip(ctx: PhaseContext, impl: str, shape, dtype) -> dict:
    model, _, x = build_model(impl, shape.but(batch=min(shape.batch, 8)), ctx.device, dtype=dtype)
    with torch.no_grad():
        _, _, z = model(x)
        rec = model.reverse(z, reconstruct=True)
    result = dict(rel_error=rel_error(rec, x), max_rel_error=max_rel_error(rec, x))
    del model, x, z, rec
    free_memory()
    return result


def _agreement(ctx: PhaseContext, dtype) -> dict:
    shape = ctx.scale.cifar.but(n_flow=min(4, ctx.scale.cifar.n_flow), batch=4)
    make = [lambda: fastglow.reference.Glow(shape.in_channel, shape.n_flow, shape.n_block, affine=shape.affine,
                                            hidden_channels=shape.hidden),
            lambda: fastglow.Glow(shape.in_channel, shape.n_flow, shape.n_block, affine=shape.affine,
                                  hidden_channels=shape.hidden, backend="triton")]
    x, models = models_on_one_state(make, (shape.batch, shape.in_channel, shape.img_size, shape.img_size),
                                    sigma=0.01, dtype=dtype)
    x = x.to(ctx.device)
    outs = []
    for model in models:
        model.to(ctx.device)
        log_p, logdet, _ = model(x)
        fastglow.bits_per_dim(log_p, logdet, x.shape, 256).backward()
        outs.append((log_p.detach(), logdet.detach(), [p.grad for p in model.parameters()]))
    (lp_r, ld_r, g_r), (lp_f, ld_f, g_f) = outs
    return dict(shape=dataclasses.asdict(shape), log_p=rel_error(lp_f, lp_r), logdet=rel_error(ld_f, ld_r),
                grads_max=max(rel_error(a, b) for a, b in zip(g_f, g_r)))


def phase_gpu_options(ctx: PhaseContext) -> None:
    """fastglow-reversible at the CIFAR shape with the GPU-side options: bf16 autocast networks, channels_last,
    and the whole step replayed from a CUDA graph (on a CPU: run eagerly, ``captured`` false)."""
    shape, device = ctx.scale.cifar, ctx.device
    variants = {"float32": {}, "bf16 autocast": dict(autocast_dtype=torch.bfloat16),
                "channels_last": dict(channels_last=True),
                "bf16 autocast + channels_last": dict(autocast_dtype=torch.bfloat16, channels_last=True),
                "cuda graph": dict(graph=True), "cuda graph + bf16 autocast": dict(graph=True,
                                                                                   autocast_dtype=torch.bfloat16)}
    for name, options in variants.items():
        if ctx.out_of_time():
            ctx.rec.put("variants", name, dict(status="skipped: the phase budget ran out"))
        else:
            ctx.rec.put("variants", name, attempt(lambda: _option_step(shape, device, ctx.scale, **options)))


def phase_profile(ctx: PhaseContext) -> None:
    """Where a CIFAR training step's time goes, for explaining a missed target: torch.profiler over two steps
    (after two untimed ones) of fastglow-reversible and eager; the full table to ``profile_<impl>.txt``, the top
    rows by self device time (CPU smoke: self CPU time) to the JSON."""
    for impl in ("fastglow-reversible", "eager"):
        if ctx.out_of_time():
            ctx.rec.set("stopped", f"phase budget ran out before {impl}")
            return
        ctx.rec.put("impls", impl, attempt(lambda: _profile(ctx, impl)))


def _profile(ctx: PhaseContext, impl: str, rows: int = 30) -> dict:
    from torch.profiler import ProfilerActivity, profile
    cuda = ctx.device.type == "cuda"
    model, run, x = build_model(impl, ctx.scale.cifar, ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    for _ in range(2):
        training_step(model, run, x, optimizer)
    sync(ctx.device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(2):
            training_step(model, run, x, optimizer)
        sync(ctx.device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    path = ctx.out / f"profile_{impl}.txt"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=rows))
    del model, run, x, optimizer
    free_memory()
    return dict(file=path.name, sorted_by=key, steps=2,
                top=[dict(name=e.key[:80], ms=getattr(e, key) / 1e3, calls=e.count) for e in events[:8]])


def _option_step(shape, device, scale, graph=False, **options) -> dict:
    no_sync = dict(validate=False, reversible_tol=None) if graph else {}  # a captured step syncs nothing
    model, _, x = build_model("fastglow-reversible", shape, device, **no_sync, **options)
    capture = graph and device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, capturable=capture)
    if graph:
        step = fastglow.CudaGraphStep(model, optimizer, x, capture=capture)
        result = time_steps(lambda: step(x), device, scale)
    else:
        result = time_steps(lambda: training_step(model, model, x, optimizer), device, scale)
    del model, optimizer
    free_memory()
    return dict(result, status="ok", captured=capture)
