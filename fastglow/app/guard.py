"""The non-finite guard: decoding latents without a traceback, the last good state of a run, and the
:class:`Guard` that judges each training step.

A run keeps only weights that are *sound*: their loss is finite and they invert (every 1x1 convolution is
non-singular and decoding gives finite images). Training checks the loss and the LU scales every step
(:class:`Guard`); evaluation, sampling and each checkpoint check the rest (:mod:`fastglow.app.loop`).
:class:`LastGood` holds a copy of the newest state whose training loss was finite, so a run that diverges can
still checkpoint it.
"""

from __future__ import annotations

import copy

import torch

from .errors import one_line


def decode(model, z_list, y=None, reconstruct: bool = False,
           batch: int | None = None) -> tuple[torch.Tensor | None, str | None]:
    """``model.reverse(z_list, y=y)`` -> (images, None), or (None, why) when the latents or the images are
    not finite or a 1x1 convolution is singular (``y``: the classes of a class-conditional model);
    ``batch``: decode that many images at a time (None: all at once)."""
    if not all(bool(torch.isfinite(z).all()) for z in z_list):
        return None, "the latents are non-finite"
    n = z_list[0].shape[0]
    parts = []
    for start in range(0, n, batch or n):
        chunk = slice(start, start + (batch or n))
        try:
            with torch.no_grad():
                part = model.reverse([z[chunk] for z in z_list], reconstruct=reconstruct,
                                     y=None if y is None else y[chunk])
        except torch.linalg.LinAlgError as err:
            return None, f"the model does not invert: {one_line(err)}"
        if not bool(torch.isfinite(part).all()):
            return None, "decoding gives non-finite images"
        parts.append(part)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), None


MAX_LOG_SCALE = 80.0  # exp(+-80) stays inside float32's normal range (1.2e-38 .. 3.4e38)


def lu_log_scale_max(model) -> torch.Tensor:
    """max |w_s| over the model's LU 1x1 convolutions W = P L (U + diag(sign exp(w_s))), a 0-dim tensor (no
    host sync). Past MAX_LOG_SCALE, exp(w_s) under- or overflows: W is singular in floating point although
    the loss (which holds log|det W| = sum w_s, not W^-1) can stay finite. 0 for a model without LU convs
    (fixed permutations, :mod:`fastglow.permutation`)."""
    w_s = [flow.invconv.w_s.detach() for block in model.blocks for flow in block.flows
           if hasattr(flow.invconv, "w_s")]
    if not w_s:
        return next(model.parameters()).detach().new_zeros(())
    return torch.stack(torch._foreach_norm(w_s, float("inf"))).max()


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors of a nested dict/list, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in tree for t in _tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {key: _clone(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(item) for item in tree)
    return copy.deepcopy(tree)


class LastGood:
    """A copy of the model's and optimizer's state (on their device) and of the run's counters, RNGs and data
    order at the newest step whose weights gave a finite training loss. Refreshed in place each step by one
    fused copy from the live tensors (which the optimizer updates in place); costs one more copy of the
    weights and the optimizer's moments in memory."""

    def __init__(self):
        self.step: int | None = None
        self.tensors: dict | None = None  # {"model": state_dict, "optimizer": state_dict}
        self.extra: dict = {}  # step, elapsed, skipped, test_bpd, rng, data at that step
        self._live: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        self._n_optimizer_states = -1

    def capture(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> None:
        if self._n_optimizer_states != len(optimizer.state):  # first capture, or Adam just made its moments
            live = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            self.tensors, self._live = _clone(live), _tensors(live)
            self._copies, self._n_optimizer_states = _tensors(self.tensors), len(optimizer.state)
        else:
            torch._foreach_copy_(self._copies, self._live)
            for kept, live in zip(self.tensors["optimizer"]["param_groups"], optimizer.param_groups):
                kept["lr"] = live["lr"]  # the only hyper-parameter the loop changes
        self.step, self.extra = extra["step"], extra


class Guard:
    """The judge of a run's training steps: a step whose loss or gradient is non-finite is skipped (``skipped``
    in all, ``bad_run`` of them in a row; ``max_bad_steps`` in a row stop the run), one with finite ones is
    accepted after the state before its update is kept (:class:`LastGood`), and LU scales past
    ``MAX_LOG_SCALE`` mean a singular 1x1 convolution. When the run stops, :meth:`rollback` gives back the
    last good weights."""

    def __init__(self, max_bad_steps: int, skipped: int = 0):
        self.max_bad_steps = max_bad_steps
        self.skipped = skipped  # over every resume (a checkpoint holds it)
        self.bad_run = 0
        self.last_good = LastGood()

    @staticmethod
    def singular(log_scale: float) -> str | None:
        """Why the weights are singular, given max |w_s| of the LU 1x1 convolutions (NaN included), or None."""
        return None if log_scale < MAX_LOG_SCALE else f"|log scale| {log_scale:.3g}"

    def accept(self, finite: bool, model: torch.nn.Module, optimizer: torch.optim.Optimizer, before: dict) -> bool:
        """Judge a step whose loss and gradient are ``finite`` or not, before its update -> whether to apply it.
        Accepted: the weights, the optimizer and ``before`` (the run's counters, RNGs and data order these
        weights belong to) become the last good state, and the run of bad steps ends. Skipped: counted."""
        if finite:
            self.last_good.capture(model, optimizer, before)
            self.bad_run = 0
            return True
        self.bad_run += 1
        self.skipped += 1
        return False

    @property
    def exhausted(self) -> bool:
        """Whether ``max_bad_steps`` steps in a row were skipped (the run must stop)."""
        return self.bad_run >= self.max_bad_steps

    def rollback(self, model: torch.nn.Module, newer_than: int) -> LastGood | None:
        """Load the last good weights into ``model`` if that state is newer than step ``newer_than`` (the newest
        checkpoint) -> the state (its tensors and counters, for a checkpoint), else None (``model`` untouched)."""
        good = self.last_good
        if good.step is None or good.step <= newer_than:
            return None
        model.load_state_dict(good.tensors["model"])
        return good
