"""Host-side helpers every kernel file shares: operand checks, the dtypes the kernels run, the mix precisions.
Imports neither triton nor anything above :mod:`fastglow.kernels` (the API layer imports these, not the reverse)."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.float64)
MIX_PRECISIONS = ("ieee", "tf32x3")  # tl.dot input precision of the 1x1 mix (float32; float64 is always ieee)


def dot_precision(input_precision: str, dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision of the mix: one of MIX_PRECISIONS; float64 runs "ieee" whatever is asked."""
    if input_precision not in MIX_PRECISIONS:
        raise ValueError(f"input_precision must be one of {MIX_PRECISIONS}, got {input_precision!r}")
    return input_precision if dtype == torch.float32 else "ieee"


def check_tensor(name, t, dtype=None, device=None, dim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} like the activation")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t.contiguous()


def check_mix(mix_weight, mix_bias, c_in, x):
    mix_weight = check_tensor("mix_weight", mix_weight, x.dtype, x.device, 2)
    if mix_weight.shape[1] != c_in:
        raise ValueError(f"mix_weight must have shape (C_out, {c_in}), got {tuple(mix_weight.shape)}")
    if mix_bias is None:
        return mix_weight, mix_weight.new_zeros(mix_weight.shape[0])
    mix_bias = check_tensor("mix_bias", mix_bias, x.dtype, x.device).reshape(-1)
    if mix_bias.numel() != mix_weight.shape[0]:
        raise ValueError(f"mix_bias must have {mix_weight.shape[0]} elements, got {mix_bias.numel()}")
    return mix_weight, mix_bias


def check_coupling(y, h_raw, zscale, affine):
    b, c, hh, ww = y.shape
    if c % 2:
        raise ValueError(f"coupling needs an even channel count, got C={c}")
    c_h = c if affine else c // 2
    h_raw = check_tensor("h_raw", h_raw, y.dtype, y.device, 4)
    if tuple(h_raw.shape) != (b, c_h, hh, ww):
        raise ValueError(f"h_raw must have shape {(b, c_h, hh, ww)} (affine={affine}), got {tuple(h_raw.shape)}")
    zscale = check_tensor("zscale", zscale, y.dtype, y.device)
    if zscale.numel() != c_h:
        raise ValueError(f"zscale must have {c_h} elements (affine={affine}), got {zscale.numel()}")
    return h_raw, zscale.reshape(-1)


def fake_or_meta(launcher, shapes):
    """An op's fake implementation: ``shapes`` (empty outputs of the right shapes, dtypes and devices) under
    FakeTensorMode (torch.compile, torch.export, opcheck); on real meta tensors the ``launcher`` itself, whose
    launches a launch capture records without running (benchmarks/launch_capture.py)."""
    def fake(*args):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        return launcher(*args) if first.device.type == "meta" else shapes(*args)
    return fake


def register_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd(backward, setup_context)``, and the same formula as an autograd.Function with a
    setup_context staticmethod, which torch.func transforms (grad, vjp) need and a registered formula lacks
    (pytorch/pytorch#168393); :func:`call` picks it inside a transform."""
    op.register_autograd(backward, setup_context=setup_context)

    def function_backward(ctx, *grads):
        with torch.no_grad():  # the backward ops have no autograd formula of their own
            return backward(ctx, *grads)

    op.functorch_function = type(f"{op._name}_functorch", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(function_backward)})


def under_functorch(*tensors) -> bool:
    """Inside a torch.func transform (one of ``tensors`` is wrapped by it); never asked while dynamo traces."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not torch.compiler.is_compiling() and any(wrapped(t) for t in tensors if isinstance(t, torch.Tensor))


def call(op, *args):
    """``op(*args)``; inside a torch.func transform, through its autograd.Function (:func:`register_autograd`)."""
    if under_functorch(*args):
        return op.functorch_function.apply(*args)
    return op(*args)


_FUNCTORCH_KEYS = ("FuncTorchDynamicLayerFrontMode", "FuncTorchDynamicLayerBackMode", "FuncTorchGradWrapper",
                   "FuncTorchBatched", "FuncTorchVmapMode")


def functorch_dispatch():
    """A context in which torch.func transforms run even inside an op's implementation reached through a
    TorchDispatchMode (which excludes functorch's dispatch keys there): the op's own vjps need them."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in _FUNCTORCH_KEYS:
        exclude = exclude.remove(getattr(torch._C.DispatchKey, name))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
