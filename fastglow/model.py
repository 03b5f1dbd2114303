"""fastglow.Glow: the reference module tree (same parameters, buffers and state_dict keys), executed
through a backend object (:mod:`fastglow.backends`) so each level can run fused kernels and reversible backprop."""

from __future__ import annotations

import contextlib
import numbers

import torch

from . import reference
from .backends import NetOptions, select_backend
from .checks import (check_class_config, check_config, check_execution_options, check_image, check_img_size,
                     check_labels, check_matches_model, check_sample_args, check_z_list)
from .conditional import DEFAULT_CLASS_WEIGHT
from .likelihood import z_shapes
from .reversible import (LevelHandle, ReconstructionMonitor, ReversibleOptions, check_reversible_options,
                         reversible_steps)


class Glow(reference.Glow):
    """Drop-in for rosinality/glow-pytorch's ``Glow``.

    Args beyond rosinality's: ``hidden_channels`` (coupling width), ``backend`` ("auto", "eager" or
    "triton"), ``reversible`` (constant-memory backprop, :mod:`fastglow.reversible`) and its options:
    ``reversible_tol`` (relative error of a level's rebuilt input above which that level's gradients are
    recomputed exactly from its stored input; "auto": the square root of the dtype's machine epsilon, 3.5e-4
    in float32; None: never checked, no host sync) and ``backward_chunk`` (recompute and backpropagate each
    level N samples at a time: memory flat in the batch size); ``n_classes`` (class-conditional: y-conditioned
    top prior and an auxiliary classifier, see :mod:`fastglow.conditional`) and ``class_weight`` (its loss
    weight). Execution options (same maths, same state): ``autocast_dtype`` (torch.bfloat16 or torch.float16:
    the coupling networks run under autocast, the flow maths - ActNorm, the 1x1 mix, the coupling combine,
    logdet, LU, priors - in the parameters' dtype), ``channels_last`` (the coupling networks' weights and
    inputs in channels_last memory format) and ``validate`` (False: skip the input's NaN/Inf check; with
    ``reversible_tol=None`` too, a training step makes no host sync) and ``mix_precision`` (the Triton 1x1
    mix in float32: "ieee", exact, or "tf32x3", three TF32 tensor-core products, ~float32 accuracy;
    benchmarks/RESULTS.md has its emulated effect); ``permutation`` ("conv", rosinality's learned 1x1 conv;
    "shuffle", RealNVP's fixed random permutation; "reverse", NICE's reversed channels: :mod:`fastglow.permutation`,
    folded into the same fused mix).
    """

    def __init__(self, in_channel: int, n_flow: int, n_block: int, affine: bool = True,
                 conv_lu: bool = True, hidden_channels: int = 512, backend: str = "auto",
                 reversible: bool = True, reversible_tol: float | str | None = "auto",
                 backward_chunk: int | None = None, n_classes: int | None = None,
                 class_weight: float = DEFAULT_CLASS_WEIGHT, autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False, validate: bool = True, mix_precision: str = "ieee",
                 permutation: str = "conv"):
        check_config(in_channel, n_flow, n_block, affine, conv_lu, hidden_channels, backend, reversible)
        check_reversible_options(reversible_tol, backward_chunk)
        check_class_config(n_classes, class_weight)
        check_execution_options(autocast_dtype, channels_last, validate, mix_precision)
        in_channel, n_flow, n_block, hidden_channels = map(int, (in_channel, n_flow, n_block, hidden_channels))
        affine, conv_lu, reversible, channels_last, validate = map(bool, (affine, conv_lu, reversible, channels_last,
                                                                          validate))  # numpy's bools too
        n_classes = None if n_classes is None else int(n_classes)
        backward_chunk = None if backward_chunk is None else int(backward_chunk)
        super().__init__(in_channel, n_flow, n_block, affine=affine, conv_lu=conv_lu,
                         hidden_channels=hidden_channels, n_classes=n_classes, class_weight=class_weight,
                         permutation=permutation)
        self.backend = backend
        self.reversible = reversible
        self.reversible_tol = reversible_tol
        self.backward_chunk = backward_chunk
        self._net_options = NetOptions(autocast_dtype, channels_last)
        self._reconstruction = ReconstructionMonitor(n_block)
        self._level_handles = [LevelHandle(block.flows, None, self._reconstruction, i, self._net_options)
                               for i, block in enumerate(self.blocks)]  # the reversible level ops' keys
        self.validate, self.mix_precision = validate, mix_precision
        if channels_last:
            for block in self.blocks:
                for flow in block.flows:
                    flow.coupling.net.to(memory_format=torch.channels_last)
        self.last_img_size: tuple[int, int] | None = None

    @property
    def net_options(self) -> NetOptions:
        """How the backends run the coupling networks (``autocast_dtype``, ``channels_last``): fixed at
        construction, as every level op's handle holds it too."""
        return self._net_options

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.net_options.autocast_dtype

    @property
    def channels_last(self) -> bool:
        return self.net_options.channels_last

    def actnorm_initialized(self) -> bool:
        return all(flow.actnorm.is_initialized for block in self.blocks for flow in block.flows)

    def flow_precision(self, device_type: str):
        """With ``autocast_dtype`` set, the flow maths run with autocast off (the coupling networks turn it on
        for themselves); else the caller's autocast state stands."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, enabled=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """x (B, C, H, W) -> (log_p [B], logdet [B], z_outs); a class-conditional model takes labels y
        (int64 [B]) and log_p is log p(z | y). The reference's level loop, each level through :meth:`run_level`."""
        check_image(x, self.in_channel, self.n_block, finite=self.validate)
        check_matches_model("input", x, self.blocks[0].prior.scale)
        check_labels(y, self.n_classes, x.shape[0], x.device)
        self.last_img_size = (x.shape[2], x.shape[3])
        with self.flow_precision(x.device.type):
            return super().forward(x, y)

    def run_level(self, block: reference.Block, x: torch.Tensor, reverse: bool = False):
        """A level's squeeze and K flow steps through the backend, x -> (output, logdet [B]) (``reverse``: the
        inverse, then unsqueeze). ``reversible``: activations are rebuilt by inversion in backward (memory flat
        in K), else plain autograd. A level whose ActNorms are not initialised first runs the eager backend's
        steps without grad (their data-dependent init needs each step's input, and keeps no activations); with
        grad, it then runs again like every later batch."""
        backend = select_backend(self.backend, x, self.mix_precision, self.net_options)  # refused before anything runs
        if reverse:
            return backend.unsqueeze(backend.inverse(block.flows, x))
        if not all(flow.actnorm.is_initialized for flow in block.flows):
            eager = select_backend("eager", x, net=self.net_options)
            with torch.no_grad():
                first = eager.forward(block.flows, eager.squeeze(x))
            if not torch.is_grad_enabled():
                return first
        x = backend.squeeze(x)
        if not self.reversible:
            return backend.forward(block.flows, x)
        level = next(i for i, b in enumerate(self.blocks) if b is block)
        options = ReversibleOptions(self.reversible_tol, self.backward_chunk, self._reconstruction, level)
        return reversible_steps(block.flows, x, backend, options, self._level_handles[level])

    def reconstruction_error(self) -> torch.Tensor:
        """Per level [n_block]: max over samples of ||x̂ - x|| / ||x|| between the level input rebuilt by the
        latest reversible backward and the stored one (on the model's device, read without a host sync; NaN
        for a level that has not run a reversible backward)."""
        return self._reconstruction.errors()

    @property
    def reconstruction_fallbacks(self) -> int:
        """How many level backwards were recomputed exactly because their error exceeded ``reversible_tol``."""
        return self._reconstruction.fallbacks

    def reverse(self, z_list, reconstruct: bool = False, y: torch.Tensor | None = None) -> torch.Tensor:
        """Latents -> image. ``reconstruct=True``: z_list are forward's z_outs; else standard noise, which a
        class-conditional model turns into latents under the prior of labels y (int64 [B])."""
        check_z_list(z_list, self.in_channel, self.n_block, finite=self.validate)
        check_matches_model("z_list", z_list[-1], self.blocks[0].prior.scale)
        check_labels(y, self.n_classes, z_list[-1].shape[0], z_list[-1].device, required=not reconstruct)
        with self.flow_precision(z_list[-1].device.type):
            return super().reverse(z_list, reconstruct, y)

    def class_loss(self, z_outs, y: torch.Tensor) -> torch.Tensor:
        """class_weight * mean cross-entropy (bits) of the auxiliary classifier on forward's z_outs and labels y."""
        check_labels(y, self.n_classes, z_outs[-1].shape[0], z_outs[-1].device)
        return super().class_loss(z_outs, y)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.7, img_size=None,
               generator: torch.Generator | None = None, y: int | torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``n`` images at ``temperature`` (latents ~ N(0, temperature^2) before the priors).

        ``img_size`` (int or (H, W)) defaults to the size of the last batch seen by ``forward``. A
        class-conditional model takes the classes ``y``: one int for all n, or int64 labels of shape [n].
        """
        check_sample_args(n, temperature)
        n = int(n)
        img_size = img_size if img_size is not None else self.last_img_size
        if img_size is None:
            raise ValueError("img_size is unknown: pass img_size= (the model has not seen a batch)")
        img_size = check_img_size(img_size, self.n_block)
        ref = next(self.parameters())
        if isinstance(y, numbers.Integral) and not isinstance(y, bool):  # numpy's integers too
            y = torch.full((n,), y, dtype=torch.int64, device=ref.device)
        check_labels(y, self.n_classes, n, ref.device)
        z_list = [temperature * torch.randn(n, *shape, generator=generator, dtype=ref.dtype,
                                            device=ref.device)
                  for shape in z_shapes(self.in_channel, img_size, self.n_block)]
        return self.reverse(z_list, y=y)
