"""The kernels phase of the one-command GPU run (:mod:`benchmarks.gpu_run`): each fused kernel's time at the
squeezed levels of a 256^2 image, its achieved bandwidth against a device-to-device copy of the same size, the
eager op sequence it replaces, and the static cost model's prediction (``benchmarks/studies/cost_model.py``).
"""

from __future__ import annotations

import torch

import fastglow
from benchmarks.gpu_run.measure import attempt, time_kernel
from benchmarks.harness import eager_coupling_mix, kernel_operands, lu_level


def _kernel_cases(shape, device):
    """(name, fn, bytes moved at minimum) of every fused kernel at ``shape``, and the eager sequences the fused
    forward replaces. Bytes: every tensor read once and written once, float32."""
    from fastglow.kernels.channel_mix import channel_mix_backward
    from fastglow.kernels.coupling import coupling_backward
    from fastglow.kernels.flow_step import coupling_mix_forward
    from fastglow.kernels.squeeze import squeeze_forward
    act = shape[0] * shape[1] * shape[2] * shape[3] * 4  # bytes of one activation
    cases = []
    for affine, kind in ((True, "affine"), (False, "additive")):
        t = kernel_operands(shape, device=device, affine=affine)
        h_bytes = act if affine else act // 2
        mix = dict(mix_weight=t["mix_weight"], mix_bias=t["mix_bias"])
        cases += [
            (f"coupling_mix_forward[{kind}]", lambda t=t, a=affine, m=mix: coupling_mix_forward(
                t["x"], t["h_raw"], t["zscale"], **m, affine=a), 2 * act + h_bytes),
            (f"eager coupling+mix[{kind}]", lambda t=t, a=affine: eager_coupling_mix(**t, affine=a),
             2 * act + h_bytes),
            (f"coupling_mix_inverse[{kind}]", lambda t=t, a=affine: coupling_mix_forward(
                t["x"], t["h_raw"], t["zscale"], t["mix_weight_inv"], t["mix_bias_inv"], affine=a, inverse=True),
             2 * act + h_bytes),
            (f"coupling_backward[{kind}]", lambda t=t, a=affine: coupling_backward(
                t["x"], t["grad"], t["h_raw"], t["zscale"], t["grad_logdet"], affine=a), 4 * act + 2 * h_bytes),
        ]
    cases += [("channel_mix_backward[rebuild x]", lambda t=t: channel_mix_backward(
        t["x"], t["grad"], t["mix_weight"], t["mix_weight_inv"], t["mix_bias_inv"]), 4 * act)]
    full = torch.randn(shape[0], shape[1] // 4 or 1, 2 * shape[2], 2 * shape[3], device=device)
    cases += [("squeeze", lambda: squeeze_forward(full), 2 * full.numel() * 4),
              ("eager squeeze", lambda: fastglow.reference.squeeze2d(full).contiguous(), 2 * full.numel() * 4)]
    return cases


def cost_model_ms(kernel: str, shape) -> float | None:
    """The static cost model's predicted milliseconds, where ``benchmarks/studies/cost_model.py`` (another branch)
    offers ``predict_ms(kernel, shape, dtype)``; None otherwise."""
    try:
        from benchmarks.studies import cost_model
        return float(cost_model.predict_ms(kernel, tuple(shape), "float32"))
    except Exception:  # absent, another interface, or no prediction for this kernel: the column says n/a
        return None


def phase_kernels(ctx: PhaseContext) -> None:
    device = ctx.device
    big = torch.empty(2**28 if device.type == "cuda" else 2**18, device=device)
    dst = torch.empty_like(big)
    ctx.rec.set("copy_gbps_large", 2 * big.numel() * 4 / time_kernel(lambda: dst.copy_(big), device) / 1e6)
    ctx.rec.set("copy_bytes_large", 2 * big.numel() * 4)
    del big, dst
    for shape in ctx.scale.kernel_shapes:
        src = torch.randn(shape, device=device)
        dst = torch.empty_like(src)
        copy_gbps = 2 * src.numel() * 4 / time_kernel(lambda: dst.copy_(src), device) / 1e6
        for name, fn, nbytes in _kernel_cases(shape, device):
            if ctx.out_of_time():
                ctx.rec.set("stopped", f"phase budget ran out before {name} at {shape}")
                return
            ctx.rec.append("rows", attempt(lambda: _bandwidth(fn, nbytes, copy_gbps, device), kernel=name,
                                           shape=list(shape), fused=not name.startswith("eager"),
                                           predicted_ms=cost_model_ms(name, shape)))
    _lu_level(ctx)


def _bandwidth(fn, nbytes: int, copy_gbps: float, device) -> dict:
    ms = time_kernel(fn, device)
    return dict(ms=ms, bytes=nbytes, gbps=nbytes / ms / 1e6, copy_gbps=copy_gbps,
                of_copy=nbytes / ms / 1e6 / copy_gbps)


def _lu_level(ctx: PhaseContext) -> None:
    """All K LU weights of one level (W, W^-1, log|det W|): one batched kernel vs the eager loop."""
    k, c = ctx.scale.lu_level
    fused, eager = lu_level(k, c, ctx.device)
    for name, fn in ((f"lu_weight_level[K={k},C={c}]", fused),
                     (f"eager lu_weight_level[K={k},C={c}]", eager)):
        ctx.rec.append("rows", attempt(lambda: dict(ms=time_kernel(fn, ctx.device)), kernel=name,
                                       shape=[k, c, c], fused=not name.startswith("eager"),
                                       predicted_ms=cost_model_ms(name, (k, c))))
