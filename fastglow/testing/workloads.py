"""What the tests and the benchmarks run and measure, defined once: the flow-step kernels' operands, a model of
every implementation compared, one training step, and peak memory (in this process, or of a training step in a
fresh one).

Implementations (``build_model``; all at the same weights: ActNorm initialised on the batch, then every parameter
perturbed, so no coupling is the identity):

    fastglow-reversible    fastglow.Glow, reversible backprop (``backward_chunk`` etc. as options)
    fastglow-plain         fastglow.Glow, plain autograd
    eager                  fastglow.reference.Glow (rosinality's maths, eager PyTorch)
    compiled               torch.compile(reference)
    compiled-per-flow      the reference with every Flow compiled on its own
    checkpoint             the reference with each Flow under torch.utils.checkpoint (keeps only step inputs)
    rosinality             rosinality/glow-pytorch's Glow from a model.py path (never part of this repository)
    rosinality-checkpoint  the same with each Flow under torch.utils.checkpoint

``python -m fastglow.testing.workloads '<json>'`` is the child of :func:`in_fresh_process`: it prints
:func:`step_memory` of the config as one JSON line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IMPLEMENTATIONS = ("fastglow-reversible", "fastglow-plain", "eager", "compiled", "compiled-per-flow", "checkpoint",
                   "rosinality", "rosinality-checkpoint")
# glibc: one arena, every block >= 4 KiB its own mapping returned on free: RSS follows the live tensors
PRECISE_MALLOC = dict(MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0")
MB = 2**20


def kernel_operands(shape, dtype=torch.float32, affine: bool = True, device="cpu", seed: int = 0) -> dict:
    """Random non-trivial operands of the flow-step kernels at activation shape (B, C, H, W), drawn in float64:
    activation x, h_raw, zscale, a well-conditioned mix (A, c) and its exact inverse (A^-1, -A^-1 c), grad and
    grad_logdet. h_raw and zscale have C channels (affine) or C/2 (additive)."""
    b, c, hh, ww = shape
    gen = torch.Generator().manual_seed(seed + 1000 * c + hh)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    c_h = c if affine else c // 2
    q, _ = torch.linalg.qr(rnd(c, c))
    a = q + 0.1 * rnd(c, c) / c ** 0.5
    bias = 0.5 * rnd(c)
    a_inv = torch.linalg.inv(a)
    out = dict(x=rnd(b, c, hh, ww), h_raw=0.5 * rnd(b, c_h, hh, ww), zscale=0.3 * rnd(c_h), mix_weight=a,
               mix_bias=bias, mix_weight_inv=a_inv, mix_bias_inv=-a_inv @ bias, grad=rnd(b, c, hh, ww),
               grad_logdet=rnd(b))
    return {k: v.to(device, dtype) for k, v in out.items()}


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
    conv_lu: bool = True

    def but(self, **changes) -> "ModelShape":
        return dataclasses.replace(self, **changes)

    def label(self) -> str:
        return (f"{self.in_channel}x{self.img_size}x{self.img_size}, K={self.n_flow}, L={self.n_block}, "
                f"width {self.hidden}, {'affine' if self.affine else 'additive'}, batch {self.batch}")


class CheckpointedFlow(nn.Module):
    """A Flow whose forward keeps only its input for backward (torch.utils.checkpoint, non-reentrant)."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return checkpoint(self.flow, x, use_reentrant=False)

    def reverse(self, y):
        return self.flow.reverse(y)


def load_glow_module(path):
    """A model.py (a folder holding one, or the file), imported as a module: rosinality/glow-pytorch's."""
    path = Path(path)
    path = path / "model.py" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--rosinality: no model.py at {path}")
    spec = importlib.util.spec_from_file_location("rosinality_glow_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _construct(impl: str, shape: ModelShape, rosinality, options: dict) -> nn.Module:
    import fastglow
    c, k, l, kw = shape.in_channel, shape.n_flow, shape.n_block, dict(affine=shape.affine, conv_lu=shape.conv_lu)
    if impl in ("fastglow-reversible", "fastglow-plain"):
        return fastglow.Glow(c, k, l, hidden_channels=shape.hidden, reversible=impl == "fastglow-reversible",
                             **{"backend": "triton", **options}, **kw)
    if impl in ("rosinality", "rosinality-checkpoint"):
        return load_glow_module(rosinality).Glow(c, k, l, **kw)  # width fixed at 512 there
    if impl in ("eager", "compiled", "compiled-per-flow", "checkpoint"):
        return fastglow.reference.Glow(c, k, l, hidden_channels=shape.hidden, **kw)
    raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLEMENTATIONS)}")


def build_model(impl: str, shape: ModelShape, device="cpu", *, rosinality=None, batch: int | None = None,
                dtype: torch.dtype = torch.float32, sigma: float = 0.01, compile_backend: str | None = None,
                **options):
    """-> (model, run, x): the model (its parameters), the callable a step runs (x -> (log_p, logdet, z)) and a
    batch x ~ U(-0.5, 0.5) of the shape, after seeding torch and numpy with 0 (the LU 1x1 convs draw from numpy's
    generator, as rosinality's do: every implementation starts from the same weights). ActNorm is initialised on x and every
    parameter perturbed by ``sigma``. ``options`` go to fastglow.Glow (backend "triton" unless given);
    ``compile_backend``: torch.compile's (default inductor on CUDA, dynamo's tracing only elsewhere)."""
    from .models import initialized_model
    import numpy as np
    device = torch.device(device)
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.rand(batch or shape.batch, shape.in_channel, shape.img_size, shape.img_size, device=device,
                   dtype=dtype) - 0.5
    model = initialized_model(_construct(impl, shape, rosinality, options).to(device, dtype), x, sigma=sigma)
    compile_backend = compile_backend or ("inductor" if device.type == "cuda" else "eager")
    for block in model.blocks:
        if impl.endswith("checkpoint"):
            block.flows = nn.ModuleList(CheckpointedFlow(flow) for flow in block.flows)
        if impl == "compiled-per-flow":
            for flow in block.flows:
                flow.compile(backend=compile_backend)
    run = torch.compile(model, backend=compile_backend) if impl == "compiled" else model
    return model, run, x


def training_step(model: nn.Module, run, x: torch.Tensor, optimizer=None, set_to_none: bool = True):
    """One step as every implementation takes it: gradients set to None (unless ``set_to_none`` is false: they
    accumulate in place), forward, bits/dim, backward, and ``optimizer.step()`` when given -> the loss."""
    import fastglow
    if set_to_none:
        model.zero_grad(set_to_none=True)
    log_p, logdet, _ = run(x)
    loss = fastglow.bits_per_dim(log_p, logdet, x.shape, 256)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss.detach()


class MemoryProbe:
    """Peak memory between ``reset()`` and ``peak()`` (bytes): on CUDA the caching allocator's peak
    (``max_memory_allocated``: weights, optimizer state, activations); on a CPU the process's resident
    high-water mark (``VmHWM`` after ``/proc/self/clear_refs``; ``ru_maxrss`` where there is no procfs)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.start = 0

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated()
        return _proc_status_kb("VmRSS") * 1024

    def reset(self) -> bool:
        """-> whether the high-water mark could be reset (CUDA always; Linux procfs)."""
        reset = True
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # Linux: the high-water mark := current RSS
            except OSError:
                reset = False
        self.start = self.current()
        return reset

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        peak = _proc_status_kb("VmHWM") * 1024
        if not peak:  # no procfs: ru_maxrss (kB on Linux, bytes on macOS)
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return peak


def _proc_status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field + ":")).split()[1])
    except (OSError, StopIteration):
        return 0


def step_memory(cfg: dict) -> dict:
    """In this process: build ``cfg["impl"]`` at ``cfg["shape"]`` (a ModelShape as a dict; ``options``,
    ``rosinality``), take one warm-up step, then ``steps`` steps, each with its own peak RSS above the RSS just
    before it (MB; the least counts). With ``set_to_none`` (default) the gradients are freed before every step,
    as a training loop does, so the figure includes allocating them; without, they accumulate in place and the
    figure is the activations' (and temporaries') alone."""
    torch.set_num_threads(cfg.get("threads", 1))
    model, run, x = build_model(cfg["impl"], ModelShape(**cfg["shape"]), rosinality=cfg.get("rosinality"),
                                **cfg.get("options", {}))
    set_to_none = cfg.get("set_to_none", True)
    training_step(model, run, x, set_to_none=set_to_none)  # warm-up: libraries loaded, .grad allocated
    probe, peaks = MemoryProbe("cpu"), []
    for _ in range(cfg.get("steps", 3)):
        if set_to_none:
            model.zero_grad(set_to_none=True)  # before the baseline, so it is taken without gradients
        reset = probe.reset()
        training_step(model, run, x, set_to_none=set_to_none)
        peaks.append((probe.peak() - probe.start) / MB)
    grad_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
    return dict(baseline_mb=probe.start / MB, step_mb=min(peaks), samples_mb=peaks, grad_mb=grad_mb, hwm_reset=reset)


def in_fresh_process(cfg: dict, module: str = "fastglow.testing.workloads", precise_malloc: bool = True,
                     cwd=None, timeout: float = 1800) -> dict:
    """``python -m MODULE '<cfg as JSON>'`` in a fresh interpreter with ``cfg["threads"]`` threads (1 by default)
    -> the JSON of its last stdout line. ``precise_malloc``: RSS follows the live tensors; off for timing, so
    allocation costs what it costs in a normal process. ``cwd``: where ``-m`` finds MODULE."""
    threads = str(cfg.get("threads", 1))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if precise_malloc:
        env.update(PRECISE_MALLOC)
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(cfg)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed for {cfg}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# the memory tests' and benchmarks' model: 3x32x32, L=3, width 32, affine, LU, batch 8
MEMORY_SHAPE = ModelShape("memory", 3, 32, 4, 3, 32, True, 8)


def measure_step_memory(n_flow: int, mode, repeats: int = 3, hidden_channels: int | None = None,
                        backward_chunk: int | None = None, **shape) -> dict:
    """Peak RSS (MB) of one training step of fastglow's eager maths above the model-only baseline, in a fresh
    process; the least of ``repeats`` steps, gradients accumulating in place. ``mode``: "plain", "reversible"
    (or a bool: reversible or not) or "checkpoint" (the reference Glow, each Flow checkpointed). -> the shape's
    fields and :func:`step_memory`'s."""
    mode = {True: "reversible", False: "plain"}.get(mode, mode)
    impl = "checkpoint" if mode == "checkpoint" else f"fastglow-{mode}"
    hidden = dict(hidden=hidden_channels) if hidden_channels else {}
    spec = MEMORY_SHAPE.but(n_flow=n_flow, **hidden, **shape)
    options = dict(backend="eager", backward_chunk=backward_chunk) if impl.startswith("fastglow") else {}
    cfg = dict(impl=impl, shape=dataclasses.asdict(spec), options=options, steps=repeats, set_to_none=False)
    return dict(dataclasses.asdict(spec), **in_fresh_process(cfg))


def level_tensor_mb(batch: int, in_channel: int, img_size: int, n_block: int, **_) -> float:
    """MB of one float32 tensor the size of every level's input together (a level's x_0, y or gradient)."""
    per_sample = sum(in_channel * 2 ** level * 4 * (img_size // 2 ** (level + 1)) ** 2 for level in range(n_block))
    return batch * per_sample * 4 / MB


if __name__ == "__main__":
    print(json.dumps(step_memory(json.loads(sys.argv[1]))))
