"""fastglow.Glow: the reference module tree (same parameters, buffers and state_dict keys), executed
through a backend object (:mod:`fastglow.backends`) so each level can run fused kernels and reversible backprop."""

from __future__ import annotations

import torch

from . import reference
from .backends import select_backend
from .checks import check_config, check_image, check_img_size, check_matches_model, check_z_list
from .reversible import (ReconstructionMonitor, ReversibleOptions, check_reversible_options,
                         reversible_steps)


class Glow(reference.Glow):
    """Drop-in for rosinality/glow-pytorch's ``Glow``.

    Args beyond rosinality's: ``hidden_channels`` (coupling width), ``backend`` ("auto", "eager" or
    "triton"), ``reversible`` (constant-memory backprop, :mod:`fastglow.reversible`) and its options:
    ``reversible_tol`` (relative error of a level's rebuilt input above which that level's gradients are
    recomputed exactly from its stored input; "auto": the square root of the dtype's machine epsilon, 3.5e-4
    in float32; None: never checked, no host sync) and ``backward_chunk`` (recompute and backpropagate each
    level N samples at a time: memory flat in the batch size).
    """

    def __init__(self, in_channel: int, n_flow: int, n_block: int, affine: bool = True,
                 conv_lu: bool = True, hidden_channels: int = 512, backend: str = "auto",
                 reversible: bool = True, reversible_tol: float | str | None = "auto",
                 backward_chunk: int | None = None):
        check_config(in_channel, n_flow, n_block, affine, conv_lu, hidden_channels, backend, reversible)
        check_reversible_options(reversible_tol, backward_chunk)
        super().__init__(in_channel, n_flow, n_block, affine=affine, conv_lu=conv_lu,
                         hidden_channels=hidden_channels)
        self.backend = backend
        self.reversible = reversible
        self.reversible_tol = reversible_tol
        self.backward_chunk = backward_chunk
        self._reconstruction = ReconstructionMonitor(n_block)
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
        if not self.reversible:
            return backend.forward(block.flows, x)
        level = next(i for i, b in enumerate(self.blocks) if b is block)
        options = ReversibleOptions(self.reversible_tol, self.backward_chunk, self._reconstruction, level)
        return reversible_steps(block.flows, x, backend, options)

    def reconstruction_error(self) -> torch.Tensor:
        """Per level [n_block]: max over samples of ||x̂ - x|| / ||x|| between the level input rebuilt by the
        latest reversible backward and the stored one (on the model's device, read without a host sync; NaN
        for a level that has not run a reversible backward)."""
        return self._reconstruction.errors()

    @property
    def reconstruction_fallbacks(self) -> int:
        """How many level backwards were recomputed exactly because their error exceeded ``reversible_tol``."""
        return self._reconstruction.fallbacks

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
