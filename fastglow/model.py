"""fastglow.Glow: the reference module tree (same parameters, buffers and state_dict keys), executed
through a backend object (:mod:`fastglow.backends`) so each level can run fused kernels and reversible backprop."""

from __future__ import annotations

import contextlib

import torch

from . import reference
from .backends import select_backend
from .checks import (check_config, check_execution_options, check_image, check_img_size, check_matches_model,
                     check_z_list)
from .reversible import reversible_steps


class Glow(reference.Glow):
    """Drop-in for rosinality/glow-pytorch's ``Glow``.

    Args beyond rosinality's: ``hidden_channels`` (coupling width), ``backend`` ("auto", "eager" or
    "triton") and ``reversible`` (constant-memory backprop). Execution options (same maths, same state):
    ``autocast_dtype`` (torch.bfloat16 or torch.float16: the coupling networks run under autocast, the flow
    maths - ActNorm, the 1x1 mix, the coupling combine, logdet, LU, priors - in the parameters' dtype),
    ``channels_last`` (the coupling networks' weights and inputs in channels_last memory format) and
    ``validate`` (False: skip the input's NaN/Inf check, the one host sync of a training step) and
    ``mix_precision`` (the Triton 1x1 mix in float32: "ieee", exact, or "tf32x3", three TF32 tensor-core
    products, ~float32 accuracy; benchmarks/RESULTS.md has its emulated effect).
    """

    def __init__(self, in_channel: int, n_flow: int, n_block: int, affine: bool = True,
                 conv_lu: bool = True, hidden_channels: int = 512, backend: str = "auto",
                 reversible: bool = True, autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False, validate: bool = True, mix_precision: str = "ieee"):
        check_config(in_channel, n_flow, n_block, affine, conv_lu, hidden_channels, backend, reversible)
        check_execution_options(autocast_dtype, channels_last, validate, mix_precision)
        super().__init__(in_channel, n_flow, n_block, affine=affine, conv_lu=conv_lu,
                         hidden_channels=hidden_channels)
        self.backend = backend
        self.reversible = reversible
        self.autocast_dtype, self.channels_last, self.validate = autocast_dtype, channels_last, validate
        self.mix_precision = mix_precision
        for coupling in (flow.coupling for block in self.blocks for flow in block.flows):
            coupling.net_autocast, coupling.net_channels_last = autocast_dtype, channels_last
            if channels_last:
                coupling.net.to(memory_format=torch.channels_last)
        self.last_img_size: tuple[int, int] | None = None

    def actnorm_initialized(self) -> bool:
        return all(flow.actnorm.is_initialized for block in self.blocks for flow in block.flows)

    def flow_precision(self, device_type: str):
        """With ``autocast_dtype`` set, the flow maths run with autocast off (the coupling networks turn it on
        for themselves); else the caller's autocast state stands."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, enabled=False)

    def forward(self, x: torch.Tensor):
        """x (B, C, H, W) -> (log_p [B], logdet [B], z_outs)."""
        check_image(x, self.in_channel, self.n_block, finite=self.validate)
        check_matches_model("input", x, self.blocks[0].prior.scale)
        self.last_img_size = (x.shape[2], x.shape[3])
        with self.flow_precision(x.device.type):
            return self._forward(x)

    def _forward(self, x: torch.Tensor):
        if not self.actnorm_initialized():
            # ActNorm's data-dependent init needs each step's input: run the first batch eagerly.
            return super().forward(x)
        backend = select_backend(self.backend, x, self.mix_precision)
        log_p_sum = x.new_zeros(x.shape[0])
        logdet = x.new_zeros(x.shape[0])
        z_outs = []
        out = x
        for block in self.blocks:
            out, det = self._run_flows(block, backend.squeeze(out), backend)
            logdet = logdet + det
            out, log_p, z = block.split_off(out)
            log_p_sum = log_p_sum + log_p
            z_outs.append(z)
        return log_p_sum, logdet, z_outs

    def _run_flows(self, block: reference.Block, x: torch.Tensor, backend):
        """A level's K flow steps on its squeezed input: -> (output, logdet [B]). ``reversible``: activations
        are rebuilt by inversion in backward (memory flat in K), else plain autograd."""
        return reversible_steps(block.flows, x, backend) if self.reversible else backend.forward(block.flows, x)

    def reverse(self, z_list, reconstruct: bool = False) -> torch.Tensor:
        """Latents -> image. ``reconstruct=True``: z_list are forward's z_outs; else standard noise."""
        check_z_list(z_list, self.in_channel, self.n_block)
        check_matches_model("z_list", z_list[-1], self.blocks[0].prior.scale)
        with self.flow_precision(z_list[-1].device.type):
            return self._reverse(z_list, reconstruct)

    def _reverse(self, z_list, reconstruct: bool) -> torch.Tensor:
        backend = select_backend(self.backend, z_list[-1], self.mix_precision)
        x = z_list[-1]
        for block, z in zip(self.blocks[::-1], z_list[::-1]):
            x = block.merge(x, z, reconstruct=reconstruct)
            x = backend.unsqueeze(backend.inverse(block.flows, x))
        return x

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.7, img_size=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` images at ``temperature`` (latents ~ N(0, temperature^2) before the priors).

        ``img_size`` (int or (H, W)) defaults to the size of the last batch seen by ``forward``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a non-negative number, got {temperature!r}")
        img_size = img_size if img_size is not None else self.last_img_size
        if img_size is None:
            raise ValueError("img_size is unknown: pass img_size= (the model has not seen a batch)")
        img_size = check_img_size(img_size, self.n_block)
        ref = next(self.parameters())
        z_list = [temperature * torch.randn(n, *shape, generator=generator, dtype=ref.dtype,
                                            device=ref.device)
                  for shape in reference.z_shapes(self.in_channel, img_size, self.n_block)]
        return self.reverse(z_list)
