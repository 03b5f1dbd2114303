"""The eager oracle: a plain PyTorch Glow (Kingma & Dhariwal, 2018).

Same module tree, parameter/buffer names and maths as rosinality/glow-pytorch ``model.py``, so its
checkpoints load unchanged. Every fast path in fastglow is checked against this file; keep it plain.

Notation for one flow step on x of shape (B, C, H, W):
    ActNorm      y = scale * (x + loc)                      logdet = H*W * sum log|scale|
    1x1 conv     y = W y                                     logdet = H*W * log|det W|
    coupling     (y_a, y_b) = split(y); h = NN(y_a)
                 affine:   log_s, t = h.chunk(2); s = sigmoid(log_s + 2); y_b' = (y_b + t) * s
                           logdet = sum log s
                 additive: y_b' = y_b + h                    logdet = 0
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torch import nn
from torch.nn import functional as F

from .conditional import DEFAULT_CLASS_WEIGHT, ClassConditional
from .likelihood import gaussian_log_p, gaussian_sample
from .permutation import check_permutation, fixed_permutation, permutation_generator

# ---- The maths, as small functions (the fast paths' eager backend calls these) ------------------------------------
def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """2x2 space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2), output channel c*4 + 2*dy + dx."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze2d`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def lu_weight(w_p, w_l, w_u, w_s, l_mask, u_mask, l_eye, s_sign) -> torch.Tensor:
    """W = P · (L ⊙ mask_l + I) · (U ⊙ mask_u + diag(sign · exp(w_s))); log|det W| = Σ w_s."""
    lower = w_l * l_mask + l_eye
    upper = w_u * u_mask + torch.diag(s_sign * torch.exp(w_s))
    return w_p @ lower @ upper


def matrix_inverse(w: torch.Tensor) -> torch.Tensor:
    """W^-1 in W's dtype; bfloat16/float16 weights are inverted in float32 (linalg.inv has no low-precision
    kernels, and the inverse of a rounded W is best taken in full precision)."""
    if w.dtype in (torch.float32, torch.float64):
        return torch.linalg.inv(w)
    return torch.linalg.inv(w.float()).to(w.dtype)


def coupling_combine(x_b: torch.Tensor, h: torch.Tensor, affine: bool):
    """y_b = (x_b + t) * sigmoid(log_s + 2) with (log_s, t) = h.chunk(2), or x_b + h; per-sample logdet."""
    if not affine:
        return x_b + h, x_b.new_zeros(x_b.shape[0])
    log_s, t = h.chunk(2, 1)
    y_b = (x_b + t) * torch.sigmoid(log_s + 2)
    return y_b, F.logsigmoid(log_s + 2).flatten(1).sum(1)


def coupling_uncombine(y_b: torch.Tensor, h: torch.Tensor, affine: bool) -> torch.Tensor:
    """Inverse of :func:`coupling_combine`: x_b = y_b / s - t, or y_b - h."""
    if not affine:
        return y_b - h
    log_s, t = h.chunk(2, 1)
    return y_b / torch.sigmoid(log_s + 2) - t


# ---- Modules (they own the parameters, buffers and their initialisation) ------------------------------------------
class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)``, initialised from the first batch to zero mean, unit std.

    ``initialized`` is the persistent (checkpointed) flag; ``_ready`` caches it as a Python bool so a
    training step reads the buffer (a host sync) only once.
    """

    def __init__(self, in_channel: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, in_channel, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, in_channel, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._ready = False
        self.register_load_state_dict_pre_hook(_forget_ready)

    @property
    def is_initialized(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized.item())
        return self._ready

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean = flat.mean(1)
        std = flat.std(1) if flat.shape[1] > 1 else torch.ones_like(mean)  # one value: no spread to see
        self.loc.copy_(-mean.view_as(self.loc))
        self.scale.copy_((1 / (std + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1)
        self._ready = True

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return height * width * torch.log(torch.abs(self.scale)).sum()

    def forward(self, x):
        if not self.is_initialized:
            self.initialize(x)
        return self.scale * (x + self.loc), self.logdet(x.shape[2], x.shape[3])

    def reverse(self, y):
        return y / self.scale - self.loc


def _forget_ready(module, *_args):
    module._ready = False  # a loaded state_dict may carry either value of `initialized`


class _InvConv1x1(nn.Module):
    """y = W x per pixel, logdet = H W log|det W|; subclasses say how W is parameterised."""

    def calc_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def log_abs_det(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        w = self.calc_weight()
        return F.conv2d(x, w[:, :, None, None]), x.shape[2] * x.shape[3] * self.log_abs_det()

    def reverse(self, y):
        return F.conv2d(y, matrix_inverse(self.calc_weight())[:, :, None, None])


class InvConv2d(_InvConv1x1):
    """Invertible 1x1 convolution with a dense weight, initialised to a random rotation."""

    def __init__(self, in_channel: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(in_channel, in_channel))
        self.weight = nn.Parameter(q[:, :, None, None])

    def calc_weight(self) -> torch.Tensor:
        return self.weight[:, :, 0, 0]

    def log_abs_det(self) -> torch.Tensor:
        w = self.calc_weight()
        return torch.linalg.slogdet(w.double())[1].to(w.dtype)



class InvConv2dLU(_InvConv1x1):
    """Invertible 1x1 convolution parameterised as W = P L U (a random rotation at init)."""

    def __init__(self, in_channel: int):
        super().__init__()
        # numpy's generator, QR in float64, LU of the float32 rotation: rosinality's draws, so a seeded run
        # (torch.manual_seed and np.random.seed) starts from its weights
        q, _ = linalg.qr(np.random.randn(in_channel, in_channel))
        w_p, w_l, w_u = linalg.lu(q.astype(np.float32))
        w_s = torch.from_numpy(np.diag(w_u).copy())
        u_mask = np.triu(np.ones_like(w_u), 1)
        self.register_buffer("w_p", torch.from_numpy(w_p))
        self.register_buffer("u_mask", torch.from_numpy(u_mask))
        self.register_buffer("l_mask", torch.from_numpy(u_mask.T.copy()))
        self.register_buffer("s_sign", torch.sign(w_s))
        self.register_buffer("l_eye", torch.eye(in_channel))
        self.w_l = nn.Parameter(torch.from_numpy(w_l))
        self.w_s = nn.Parameter(torch.log(torch.abs(w_s)))
        self.w_u = nn.Parameter(torch.from_numpy(np.triu(w_u, 1)))

    def calc_weight(self) -> torch.Tensor:
        return lu_weight(self.w_p, self.w_l, self.w_u, self.w_s,
                         self.l_mask, self.u_mask, self.l_eye, self.s_sign)

    def log_abs_det(self) -> torch.Tensor:
        return self.w_s.sum()


class ZeroConv2d(nn.Module):
    """3x3 conv on the input padded with ones, zero-initialised, output times exp(3 * scale)."""

    def __init__(self, in_channel: int, out_channel: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channel, out_channel, 3, padding=0)
        self.conv.weight.data.zero_()
        self.conv.bias.data.zero_()
        self.scale = nn.Parameter(torch.zeros(1, out_channel, 1, 1))

    def forward(self, x):
        return self.conv(F.pad(x, [1, 1, 1, 1], value=1)) * torch.exp(self.scale * 3)


class AffineCoupling(nn.Module):
    """Coupling layer: the first half of the channels conditions an affine (or additive) map of the second."""

    def __init__(self, in_channel: int, hidden_channels: int = 512, affine: bool = True):
        super().__init__()
        self.affine = affine
        self.net = nn.Sequential(
            nn.Conv2d(in_channel // 2, hidden_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(inplace=True),
            ZeroConv2d(hidden_channels, in_channel if affine else in_channel // 2),
        )
        for i in (0, 2):
            self.net[i].weight.data.normal_(0, 0.05)
            self.net[i].bias.data.zero_()

    def forward(self, x):
        x_a, x_b = x.chunk(2, 1)
        y_b, logdet = coupling_combine(x_b, self.net(x_a), self.affine)
        return torch.cat([x_a, y_b], 1), logdet

    def reverse(self, y):
        y_a, y_b = y.chunk(2, 1)
        return torch.cat([y_a, coupling_uncombine(y_b, self.net(y_a), self.affine)], 1)


class Flow(nn.Module):
    """One flow step: ActNorm -> invertible 1x1 conv -> coupling. Returns (y, logdet of shape [B]).

    ``permutation`` "shuffle"/"reverse" puts a fixed channel permutation (:mod:`fastglow.permutation`, drawn
    from ``generator``) where the 1x1 conv is; "conv" is rosinality's step."""

    def __init__(self, in_channel, affine=True, conv_lu=True, hidden_channels=512, permutation="conv",
                 generator=None):
        super().__init__()
        self.actnorm = ActNorm(in_channel)
        if permutation != "conv":
            self.invconv = fixed_permutation(permutation, in_channel, generator)
        else:
            self.invconv = InvConv2dLU(in_channel) if conv_lu else InvConv2d(in_channel)
        self.coupling = AffineCoupling(in_channel, hidden_channels, affine=affine)

    def forward(self, x):
        y, det_actnorm = self.actnorm(x)
        y, det_invconv = self.invconv(y)
        y, det_coupling = self.coupling(y)
        return y, det_coupling + (det_actnorm + det_invconv)

    def reverse(self, y):
        return self.actnorm.reverse(self.invconv.reverse(self.coupling.reverse(y)))


class Block(nn.Module):
    """One level: squeeze, K flow steps, then split half off as a latent under a learned Gaussian prior.

    The last level (``split=False``) keeps every channel; its prior is conditioned on zeros. ``shift`` (B, 2C),
    a class-conditional model's class term (:mod:`fastglow.conditional`), is added to the prior's output.
    """

    def __init__(self, in_channel, n_flow, split=True, affine=True, conv_lu=True, hidden_channels=512,
                 permutation="conv", generator=None):
        super().__init__()
        squeeze_dim = in_channel * 4
        self.flows = nn.ModuleList(
            Flow(squeeze_dim, affine=affine, conv_lu=conv_lu, hidden_channels=hidden_channels,
                 permutation=permutation, generator=generator)
            for _ in range(n_flow)
        )
        self.split = split
        if split:
            self.prior = ZeroConv2d(in_channel * 2, in_channel * 4)
        else:
            self.prior = ZeroConv2d(in_channel * 4, in_channel * 8)

    def prior_params(self, kept: torch.Tensor, shift: torch.Tensor | None = None):
        """(mean, log_sd) of the latent given the kept half (split) or zeros shaped like it (last level)."""
        cond = kept if self.split else torch.zeros_like(kept)
        h = self.prior(cond)
        if shift is not None:
            h = h + shift[:, :, None, None]
        return h.chunk(2, 1)

    def split_off(self, out, shift=None):
        """Flow output -> (kept half, per-sample log p of the latent, latent)."""
        kept, z = out.chunk(2, 1) if self.split else (out, out)
        mean, log_sd = self.prior_params(kept, shift)
        return kept, gaussian_log_p(z, mean, log_sd).flatten(1).sum(1), z

    def merge(self, kept, eps, reconstruct=False, shift=None):
        """Inverse of :meth:`split_off`; ``eps`` is the latent itself (reconstruct) or standard noise."""
        if not reconstruct:
            eps = gaussian_sample(eps, *self.prior_params(kept, shift))
        return torch.cat([kept, eps], 1) if self.split else eps

    def run_flows(self, x, reverse=False):
        """The level's squeeze and K flow steps, x -> (out, logdet [B]); ``reverse``: out -> x, the inverse."""
        if reverse:
            for flow in self.flows[::-1]:
                x = flow.reverse(x)
            return unsqueeze2d(x)
        out = squeeze2d(x)
        logdet = x.new_zeros(x.shape[0])
        for flow in self.flows:
            out, det = flow(out)
            logdet = logdet + det
        return out, logdet

    def forward(self, x, shift=None):
        out, logdet = self.run_flows(x)
        kept, log_p, z = self.split_off(out, shift)
        return kept, logdet, log_p, z

    def reverse(self, kept, eps, reconstruct=False, shift=None):
        return self.run_flows(self.merge(kept, eps, reconstruct, shift), reverse=True)


class Glow(ClassConditional, nn.Module):
    """Multi-scale Glow: ``forward(x) -> (log_p [B], logdet [B], z_outs)``; ``reverse(z_list, reconstruct)``.

    As in rosinality/glow-pytorch, the last level always uses the LU 1x1 conv (permutation "conv"), whatever
    ``conv_lu`` says.
    ``n_classes=N`` builds the class-conditional model (:class:`fastglow.conditional.ClassConditional`):
    ``forward(x, y)``, ``reverse(z_list, reconstruct, y)``, ``class_prior`` and ``classifier`` modules;
    ``None`` keeps rosinality's module tree exactly. ``permutation`` ("conv", "shuffle" or "reverse", see
    :mod:`fastglow.permutation`): what mixes the channels between couplings; "conv" is rosinality's model.
    """

    def __init__(self, in_channel, n_flow, n_block, affine=True, conv_lu=True, hidden_channels=512,
                 n_classes=None, class_weight=DEFAULT_CLASS_WEIGHT, permutation="conv"):
        super().__init__()
        check_permutation(permutation, conv_lu)
        self.in_channel, self.n_flow, self.n_block = in_channel, n_flow, n_block
        self.affine, self.conv_lu, self.hidden_channels = affine, conv_lu, hidden_channels
        self.permutation = permutation
        steps = dict(affine=affine, hidden_channels=hidden_channels, permutation=permutation,
                     generator=permutation_generator(permutation))
        self.blocks = nn.ModuleList()
        n_channel = in_channel
        for _ in range(n_block - 1):
            self.blocks.append(Block(n_channel, n_flow, conv_lu=conv_lu, **steps))
            n_channel *= 2
        self.blocks.append(Block(n_channel, n_flow, split=False, **steps))
        self.add_class_modules(n_classes, class_weight, top_channels=n_channel * 4)
        self.register_load_state_dict_pre_hook(_strip_data_parallel_prefix)

    def forward(self, x, y=None):
        log_p_sum = x.new_zeros(x.shape[0])
        logdet = x.new_zeros(x.shape[0])
        z_outs = []
        out = x
        for block, shift in zip(self.blocks, self.prior_shifts(y, required=True)):
            out, det = self.run_level(block, out)
            out, log_p, z = block.split_off(out, shift)
            z_outs.append(z)
            logdet = logdet + det
            log_p_sum = log_p_sum + log_p
        return log_p_sum, logdet, z_outs

    def reverse(self, z_list, reconstruct=False, y=None):
        x = z_list[-1]
        shifts = self.prior_shifts(y, required=not reconstruct)
        for block, z, shift in zip(self.blocks[::-1], z_list[::-1], shifts[::-1]):
            x = self.run_level(block, block.merge(x, z, reconstruct, shift), reverse=True)
        return x

    def run_level(self, block, x, reverse=False):
        """The one hook of the level loop (:meth:`Block.run_flows` here; fastglow.Glow runs levels fast)."""
        return block.run_flows(x, reverse)


def _strip_data_parallel_prefix(module, state_dict, prefix, *_args):
    """Accept checkpoints saved from ``nn.DataParallel``/DDP, whose keys start with ``module.``."""
    wrapped = prefix + "module."
    for key in [k for k in state_dict if k.startswith(wrapped)]:
        state_dict[prefix + key[len(wrapped):]] = state_dict.pop(key)
