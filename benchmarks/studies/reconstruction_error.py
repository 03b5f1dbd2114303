"""How well reversible backprop rebuilds each level's input in float32, and what that does to the gradients: the
measurements behind ``reversible_tol="auto"`` (fastglow.reversible).

For each model (eager backend, L=3, 16x16 images, batch 4, perturbed weights at ``sigma``), the log-scale outputs
of every coupling are shifted by ``shift`` (s = sigmoid(log_s + 2) shrinks as the shift goes negative: the
ill-conditioning of Behrmann et al. 2021). Reported: each level's relative reconstruction error (what
``model.reconstruction_error()`` records), and the gradients of reversible backprop without the check
(``reversible_tol=None``) against plain autograd: the input's, and the worst and median parameter's relative
error.

    python -m benchmarks.studies.reconstruction_error                      # K in (8, 32), hidden 32
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

import fastglow
from fastglow.testing import models_on_one_state, rel_error


def shift_log_scales_(model, shift: float) -> None:
    """Add ``shift`` to every coupling's log-scale outputs (through the bias of its last conv)."""
    with torch.no_grad():
        for block in model.blocks:
            for flow in block.flows:
                zero_conv = flow.coupling.net[4]
                half = zero_conv.conv.bias.shape[0] // 2
                zero_conv.conv.bias[:half] += shift / torch.exp(3 * zero_conv.scale.reshape(-1)[:half])


def measure(n_flow: int, hidden: int, sigma: float, shift: float, size: int = 16, batch: int = 4) -> dict:
    kwargs = dict(hidden_channels=hidden, backend="eager")
    x, models = models_on_one_state([partial(fastglow.Glow, 3, n_flow, 3, reversible=False, **kwargs),
                                     partial(fastglow.Glow, 3, n_flow, 3, reversible_tol=None, **kwargs)],
                                    (batch, 3, size, size), sigma=sigma, dtype=torch.float32)
    grads = []
    for model in models:
        shift_log_scales_(model, shift)
        xi = x.clone().requires_grad_()
        log_p, logdet, z_outs = model(xi)
        gen = torch.Generator().manual_seed(1)
        loss = -(log_p + logdet).mean() / 100 + sum((torch.randn(z.shape, generator=gen) * z).sum() for z in z_outs)
        loss.backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    errors = [rel_error(a, b) for a, b in zip(grads[1], grads[0])]
    return dict(n_flow=n_flow, hidden=hidden, sigma=sigma, shift=shift,
                reconstruction=models[1].reconstruction_error().tolist(), grad_x=errors[0],
                grad_param_max=max(errors[1:]), grad_param_median=statistics.median(errors[1:]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--shifts", type=float, nargs="+", default=[0, -1, -2, -3, -4, -6])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| K | sigma | log-scale shift | reconstruction error per level | grad error: input | "
          "params, worst | params, median |\n|---|---|---|---|---|---|---|")
    for k in args.depths:
        for sigma in args.sigmas:
            for shift in args.shifts:
                r = measure(k, args.hidden, sigma, shift)
                print(f"| {k} | {sigma} | {shift:g} | " + ", ".join(f"{e:.1e}" for e in r["reconstruction"])
                      + f" | {r['grad_x']:.1e} | {r['grad_param_max']:.1e} | {r['grad_param_median']:.1e} |",
                      flush=True)


if __name__ == "__main__":
    main()
