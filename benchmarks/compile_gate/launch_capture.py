"""Record every Triton launch of ``fastglow.Glow(backend="triton")`` at the real model shapes.

A launch is reduced to what the JIT compiles for it (its *specialisation*: kernel, argument types with
Triton's divisibility-by-16 attributes, constexprs, num_warps, num_stages) and its grid. Each phase runs:
forward and backward with reversible backprop, forward and backward with plain autograd, reverse of
given latents, and sampling.

Two ways to run, both under ``TRITON_INTERPRET=1`` (the CPU backend refuses Triton otherwise):
``execute=False`` (the gate's) runs the model at the real batch, K and width on the ``meta`` device and
records each launch without running it: shapes only, so seconds; ``execute=True`` interprets every
kernel on CPU tensors with real values (slow at 256x256: batch 1 and K=2 by default).
``python -m benchmarks.compile_report --verify`` checks that both give the same set of specialisations:
they depend on each level's shape, not on the values, the batch or K (K >= 2 has a first, a middle and a
last step of every kind). The coupling network's width never reaches a kernel.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
from dataclasses import dataclass, field

import torch

from fastglow.testing.workloads import ModelShape

PHASES = ("forward", "backward_reversible", "forward_plain", "backward_plain", "reverse", "sample")
SHAPES = (  # the real training configurations (DESIGN section 6): K=32, width 512
    ModelShape("cifar32-affine", 3, 32, 32, 3, 512, True, 64),
    ModelShape("celeba256-additive", 3, 256, 32, 6, 512, False, 16),
    ModelShape("celeba256-affine", 3, 256, 32, 6, 512, True, 16),
)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MIX_PRECISIONS = {"float32": ("ieee", "tf32x3"), "float64": ("ieee",)}  # fastglow.Glow(mix_precision=...)


@dataclass(frozen=True)
class Spec:
    """What the JIT compiles: ``signature`` maps every argument to its type ("constexpr" for constexprs),
    ``constexprs`` and ``attrs`` ((argument index, "D" = divisible by 16)) as sorted tuples."""
    kernel: str  # "module:function"
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    attrs: tuple[tuple[int, str], ...]
    num_warps: int = 4
    num_stages: int = 3

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]

    @property
    def dtype(self) -> str:
        """The floating dtype of its pointers ("float64" if any pointer is fp64)."""
        types = {t for _, t in self.signature}
        return "float64" if "*fp64" in types else "float32"

    def label(self) -> str:
        """Constexprs, the integer arguments divisible by 16 and the options in one short string,
        e.g. ``AFFINE=1 BLOCK_C=16 D:C,P w4 s3``."""
        cs = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        names = [name for name, _ in self.signature]
        ints = [names[i] for i, _ in self.attrs if not dict(self.signature)[names[i]].startswith("*")]
        return f"{cs} D:{','.join(ints) or '-'} w{self.num_warps} s{self.num_stages}"

    def to_json(self) -> dict:
        return dict(kernel=self.kernel, signature=dict(self.signature), constexprs=dict(self.constexprs),
                    attrs={str(i): a for i, a in self.attrs}, num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass
class Launch:
    spec: Spec
    shape: str  # ModelShape.name
    dtype: str
    phase: str
    where: str  # the first tensor argument's shape without its batch dimension, e.g. "12x128x128"
    grid: tuple[int, int, int]

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@functools.lru_cache(maxsize=None)
def _params(fn):
    from triton.runtime.jit import KernelParam
    return [KernelParam(i, p, False, False) for i, p in enumerate(inspect.signature(fn).parameters.values())]


def _specialise(fn, args, kwargs) -> Spec:
    """The JIT's specialisation of one call: constexprs from annotations, the rest through Triton's own
    ``native_specialize_impl`` for the CUDA backend (so ints equal to 1 become constexprs, pointers and
    ints divisible by 16 get the "D" attribute, exactly as on a GPU)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    params = _params(fn)
    names = [p.name for p in params]
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = [], [], []
    for p in params:
        value = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr:
            signature.append((p.name, "constexpr"))
            constexprs.append((p.name, value))
            continue
        ty, attr = native_specialize_impl(CUDABackend, value, p.is_const, True, True)
        signature.append((p.name, ty))
        if ty == "constexpr":
            constexprs.append((p.name, attr))
        elif isinstance(attr, str) and attr:
            attrs.append((p.num, attr))
    return Spec(f"{fn.__module__}:{fn.__qualname__}", tuple(signature), tuple(constexprs), tuple(attrs),
                int(kwargs.get("num_warps", 4)), int(kwargs.get("num_stages", 3)))


def _where(args) -> str:
    t = next(a for a in args if isinstance(a, torch.Tensor))
    return "x".join(map(str, t.shape[1:] if t.dim() == 4 else t.shape))


@dataclass
class Recorder:
    """Patches the interpreter's launch entry point; ``phase`` labels the launches that follow."""
    execute: bool
    shape: str = ""
    dtype: str = ""
    phase: str = ""
    launches: list[Launch] = field(default_factory=list)

    @contextlib.contextmanager
    def patched(self):
        from triton.runtime.interpreter import InterpretedFunction
        original = InterpretedFunction.run
        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                g = tuple(grid(kwargs) if callable(grid) else grid) + (1, 1)
                recorder.launches.append(Launch(_specialise(self.fn, args, kwargs), recorder.shape,
                                                recorder.dtype, recorder.phase, _where(args), g[:3]))
            return original(self, *args, grid=grid, warmup=warmup, **kwargs) if recorder.execute else None

        InterpretedFunction.run = run
        try:
            yield self
        finally:
            InterpretedFunction.run = original


@functools.lru_cache(maxsize=None)
def _meta_model(shape: ModelShape):
    """The shape's model at its real K and width on the meta device, marked initialised (as after the
    first batch, or a loaded checkpoint) so every phase takes the fused path."""
    import fastglow
    from threadpoolctl import threadpool_limits
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    with threadpool_limits(1):  # hundreds of small QR/LU inits: threads only contend on a busy machine
        torch.set_num_threads(1)
        try:
            model = fastglow.Glow(shape.in_channel, shape.n_flow, shape.n_block, affine=shape.affine,
                                  hidden_channels=shape.hidden, backend="triton", reversible=True,
                                  reversible_tol=None)  # the trust check reads a value: meta has none
        finally:
            torch.set_num_threads(threads)
    for name, buf in model.named_buffers():
        if name.endswith("actnorm.initialized"):
            buf.fill_(1)
    assert model.actnorm_initialized()  # read once on CPU: the flag is cached before values go away
    return model.to("meta")


def _model(shape: ModelShape, dtype, execute: bool, n_flow: int, hidden: int):
    if not execute:
        return copy.deepcopy(_meta_model(shape)).to(dtype)
    import fastglow
    from fastglow.testing import initialized_model
    torch.manual_seed(0)
    model = fastglow.Glow(shape.in_channel, n_flow, shape.n_block, affine=shape.affine, hidden_channels=hidden,
                          backend="triton", reversible=True).to(dtype)
    x0 = torch.rand(1, shape.in_channel, shape.img_size, shape.img_size, dtype=dtype) - 0.5
    return initialized_model(model, x0)  # ActNorm's init runs eagerly on a real first batch


def _run_phases(model, rec: Recorder, x: torch.Tensor) -> None:
    for reversible, tag in ((True, "reversible"), (False, "plain")):
        model.reversible = reversible
        model.zero_grad(set_to_none=True)
        rec.phase = "forward" if reversible else "forward_plain"
        log_p, logdet, z_outs = model(x)
        rec.phase = f"backward_{tag}"
        (log_p + logdet).sum().backward()
    with torch.no_grad():
        rec.phase = "reverse"
        model.reverse([torch.randn_like(z) for z in z_outs], reconstruct=True)
        rec.phase = "sample"
        model.sample(x.shape[0], img_size=x.shape[2])


def capture(shape: ModelShape, dtype: str, *, execute: bool = False, batch: int | None = None,
            n_flow: int | None = None, hidden: int | None = None, mix_precision: str = "ieee") -> list[Launch]:
    """All launches of every phase of ``shape`` in ``dtype`` with the 1x1 mix in ``mix_precision``.
    Shape-only (``execute=False``): the real batch, K and width. Executed: batch 1, K=2 and the real width
    unless given."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("capture() needs TRITON_INTERPRET=1 set before triton is first imported")
    torch_dtype = DTYPES[dtype]
    if not execute and (batch, n_flow, hidden) != (None, None, None):
        raise ValueError("the shape-only capture runs the real batch, K and width")
    model = _model(shape, torch_dtype, execute, n_flow or 2, hidden or shape.hidden)
    model.mix_precision = mix_precision
    b = batch or (1 if execute else shape.batch)
    device = "cpu" if execute else "meta"
    x = torch.rand(b, shape.in_channel, shape.img_size, shape.img_size, dtype=torch_dtype, device=device) - 0.5
    rec = Recorder(execute, shape.name, dtype)
    with rec.patched():
        _run_phases(model, rec, x)
    return rec.launches


def capture_all(*, execute: bool = False, batch: int | None = None, n_flow: int | None = None,
                hidden: int | None = None, shapes=SHAPES, dtypes=tuple(DTYPES)) -> list[Launch]:
    """Every shape, dtype and mix precision."""
    return [launch for s in shapes for d in dtypes for prec in MIX_PRECISIONS[d]
            for launch in capture(s, d, execute=execute, batch=batch, n_flow=n_flow, hidden=hidden,
                                  mix_precision=prec)]
