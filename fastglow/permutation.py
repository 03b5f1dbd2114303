"""Fixed channel permutations between flow steps: the variants Glow was compared against (Kingma & Dhariwal,
2018, Sec. 3.2 and Figure 3), behind the interface of the invertible 1x1 convolution.

    permutation="conv"     learned invertible 1x1 conv W (Glow)                   log|det| = H W log|det W|
    permutation="shuffle"  y_i = x_{π(i)}, π a fixed random permutation per step (RealNVP, Dinh et al. 2017)
    permutation="reverse"  y_i = x_{C-1-i}, the channel order reversed (NICE, Dinh et al. 2015)

A permutation is the 1x1 conv with the weight P, P[i, j] = [j = π(i)]: |det P| = 1, P^-1 = P^T, no parameters.
:class:`ChannelPermutation` exposes what the rest of fastglow reads off a 1x1 conv (``calc_weight``,
``log_abs_det``, ``forward`` -> (y, logdet), ``reverse``), so the fused path folds P into the step's per-pixel
affine map with ActNorm, y = P diag(scale) (x + loc): the same kernels, no extra launch, exact inverse.
π is a buffer (``invconv.perm``, int64), so a checkpoint reproduces it; "shuffle" draws each step's π in
construction order from one generator seeded with :data:`SHUFFLE_SEED`, so every model of a shape has the same
permutations, whatever the global RNG says.
"""

from __future__ import annotations

import torch
from torch import nn

PERMUTATIONS = ("conv", "shuffle", "reverse")
SHUFFLE_SEED = 0


def check_permutation(permutation, conv_lu) -> None:
    """``permutation`` must be one of :data:`PERMUTATIONS`; ``conv_lu=False`` only means something for "conv"."""
    if not isinstance(permutation, str) or permutation not in PERMUTATIONS:
        raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
    if permutation != "conv" and conv_lu is False:
        raise ValueError(f"conv_lu=False applies to permutation='conv' only, got permutation={permutation!r}")


def permutation_generator(permutation: str) -> torch.Generator | None:
    """The generator a model's "shuffle" steps draw their permutations from (None for the other variants)."""
    return torch.Generator().manual_seed(SHUFFLE_SEED) if permutation == "shuffle" else None


def fixed_permutation(permutation: str, channels: int, generator: torch.Generator | None = None) -> nn.Module:
    """A step's :class:`ChannelPermutation` for "reverse" or "shuffle" (a draw from ``generator``)."""
    if permutation == "reverse":
        return ChannelPermutation(torch.arange(channels - 1, -1, -1))
    if permutation == "shuffle":
        # drawn by the CPU generator (the same permutation on every device), kept on the default device
        perm = torch.randperm(channels, generator=generator, device="cpu")
        return ChannelPermutation(perm.to(torch.get_default_device()))
    raise ValueError(f"a fixed permutation is 'shuffle' or 'reverse', got {permutation!r}")


class ChannelPermutation(nn.Module):
    """y[:, i] = x[:, perm[i]] per pixel: the 1x1 conv with the permutation matrix P = I[perm], log|det P| = 0.

    ``perm`` is a persistent int64 buffer; ``_eye`` (not saved) carries the model's float dtype and device, so
    ``calc_weight`` returns P in the dtype that ``.to()`` gave the model."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        if not _is_permutation(perm):
            raise ValueError("perm must be a permutation of 0..C-1")
        self.register_buffer("perm", perm.to(torch.int64).clone())
        self.register_buffer("_eye", torch.eye(perm.numel()), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A loaded ``perm`` must be a permutation of 0..C-1 (else the step would not be invertible)."""
        perm = state_dict.get(prefix + "perm")
        if isinstance(perm, torch.Tensor) and perm.shape == self.perm.shape and not _is_permutation(perm):
            error_msgs.append(f"{prefix}perm is not a permutation of 0..{self.perm.numel() - 1}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def calc_weight(self) -> torch.Tensor:
        """P (C, C), P[i, perm[i]] = 1: a row selection of the identity, exact in every dtype."""
        return self._eye[self.perm]

    def log_abs_det(self) -> torch.Tensor:
        return self._eye.new_zeros(())

    def forward(self, x: torch.Tensor):
        return x[:, self.perm], x.new_zeros(())

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        """x[:, perm[i]] = y[:, i], i.e. x = y[:, argsort(perm)] (P^-1 = P^T)."""
        return y[:, torch.argsort(self.perm)]


def state_dict_permutation(state_dict: dict) -> str:
    """The ``permutation`` of a Glow's state_dict: "conv" (no ``invconv.perm`` buffers), "reverse" (every one
    reverses the channels), else "shuffle". A shuffle that happens to reverse every step reads as "reverse":
    the same maths, and the buffers load either way."""
    perms = [v for k, v in state_dict.items() if k.endswith(".invconv.perm")]
    if not perms:
        return "conv"
    reverse = all(isinstance(p, torch.Tensor)
                  and torch.equal(p.cpu(), torch.arange(p.numel() - 1, -1, -1, device="cpu")) for p in perms)
    return "reverse" if reverse else "shuffle"


def _is_permutation(perm: torch.Tensor) -> bool:
    """perm is a 1-d integer tensor holding each of 0..numel-1 once."""
    if perm.dim() != 1 or perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        return False
    return torch.equal(torch.sort(perm.cpu()).values.to(torch.int64), torch.arange(perm.numel(), device="cpu"))


def permutation_weights(perms) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stacked weights of K :class:`ChannelPermutation` modules as a fused level folds them, in three
    operations: (P (K, C, C), P^-1 = P^T (a view), log|det P| = 0 (K))."""
    eye = perms[0]._eye
    w = eye[torch.stack([p.perm for p in perms])]
    return w, w.transpose(1, 2), eye.new_zeros(len(perms))

