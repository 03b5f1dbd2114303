"""fastglow.Glow: the reference module tree (same parameters, buffers and state_dict keys), executed
through a backend object (:mod:`fastglow.backends`) so each level can run fused kernels and reversible backprop."""

from __future__ import annotations

import torch

from . import reference
from .backends import select_backend
from .checks import (check_config, check_image, check_img_size, check_matches_model, check_sample_args,
                     check_z_list)
from .reversible import reversible_steps


class Glow(reference.Glow):
    """Drop-in for rosinality/glow-pytorch's ``Glow``.

    Args beyond rosinality's: ``hidden_channels`` (coupling width), ``backend`` ("auto", "eager" or
    "triton") and ``reversible`` (constant-memory backprop).
    """

    def __init__(self, in_channel: int, n_flow: int, n_block: int, affine: bool = True,
                 conv_lu: bool = True, hidden_channels: int = 512, backend: str = "auto",
                 reversible: bool = True):
        check_config(in_channel, n_flow, n_block, affine, conv_lu, hidden_channels, backend, reversible)
        in_channel, n_flow, n_block, hidden_channels = map(int, (in_channel, n_flow, n_block, hidden_channels))
        super().__init__(in_channel, n_flow, n_block, affine=affine, conv_lu=conv_lu,
                         hidden_channels=hidden_channels)
        self.backend = backend
        self.reversible = reversible
        self.last_img_size: tuple[int, int] | None = None

    def actnorm_initialized(self) -> bool:
        return all(flow.actnorm.is_initialized for block in self.blocks for flow in block.flows)

    def forward(self, x: torch.Tensor):
        """x (B, C, H, W) -> (log_p [B], logdet [B], z_outs)."""
        check_image(x, self.in_channel, self.n_block)
        check_matches_model("input", x, self.blocks[0].prior.scale)
        self.last_img_size = (x.shape[2], x.shape[3])
        if not self.actnorm_initialized():
            # ActNorm's data-dependent init needs each step's input: run the first batch eagerly.
            return super().forward(x)
        backend = select_backend(self.backend, x)
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
        backend = select_backend(self.backend, z_list[-1])
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
        check_sample_args(n, temperature)
        n = int(n)
        img_size = img_size if img_size is not None else self.last_img_size
        if img_size is None:
            raise ValueError("img_size is unknown: pass img_size= (the model has not seen a batch)")
        img_size = check_img_size(img_size, self.n_block)
        ref = next(self.parameters())
        z_list = [temperature * torch.randn(n, *shape, generator=generator, dtype=ref.dtype,
                                            device=ref.device)
                  for shape in reference.z_shapes(self.in_channel, img_size, self.n_block)]
        return self.reverse(z_list)
