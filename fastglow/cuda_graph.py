"""A training step captured once in a CUDA graph and then replayed: per step one input copy and one graph launch,
no Python, no kernel-launch overhead, no host syncs.

    model = fastglow.Glow(3, 32, 3, validate=False).cuda()
    with torch.no_grad():
        model(first_batch)                                   # ActNorm's data-dependent init (reads values)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
    step = fastglow.CudaGraphStep(model, opt, first_batch)   # warm-up on a side stream, then capture
    for x in batches:
        loss = step(x)                                       # a tensor; reading it is the caller's sync

What a capture needs, and what is checked here: ActNorm initialised (its init reads data); an optimizer that can
be captured (``capturable=True`` where it has that option) or none (then the graph holds forward and backward
only, each replay writes the same gradient tensors and sets them as ``.grad`` again, and ``optimizer.step()``,
a NaN check or a learning-rate schedule run outside);
every batch of the example's shape, dtype and device. The learning rate is baked into the graph unless it is a
tensor that a schedule changes in place. The warm-up's steps are undone: after construction the weights and the
optimizer state are as they were.

On a CPU (or with ``capture=False``) the same step runs eagerly on the same static buffers, so everything but the
capture itself can be tested without a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .likelihood import bits_per_dim


def bits_per_dim_loss(n_bins: int) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """loss_fn(model, x) = mean bits/dim of x under model (rosinality's calc_loss)."""
    def loss_fn(model, x):
        log_p, logdet, _ = model(x)
        return bits_per_dim(log_p, logdet, x.shape, n_bins)
    return loss_fn


class CudaGraphStep:
    """``step(x) -> loss``: zero the gradients, loss = loss_fn(model, x), backward, ``optimizer.step()``
    (if one is given), replayed from a CUDA graph captured at construction (``capture``: default on CUDA).

    ``loss_fn(model, x)`` defaults to bits/dim with ``n_bins``; ``warmup`` steps (default 3 when capturing,
    else 0) run before the capture and are then undone.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, example: torch.Tensor, *,
                 n_bins: int = 256, loss_fn=None, warmup: int | None = None, capture: bool | None = None):
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn if loss_fn is not None else bits_per_dim_loss(n_bins)
        capture = example.is_cuda if capture is None else bool(capture)
        warmup = (3 if capture else 0) if warmup is None else warmup
        _check(model, optimizer, example, capture, warmup)
        self.static_x = example.detach().clone()
        self.graph = None
        self.static_loss = None
        self.static_grads: list = []  # (parameter, the gradient tensor the graph writes)
        if warmup:
            self._warm_up(warmup)
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels without running them
                self.static_loss = self._step()
            self.static_grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_x.shape or x.dtype != self.static_x.dtype or x.device != self.static_x.device:
            raise ValueError(f"CudaGraphStep was built for {tuple(self.static_x.shape)} {self.static_x.dtype} on "
                             f"{self.static_x.device}; got {tuple(x.shape)} {x.dtype} on {x.device}")
        self.static_x.copy_(x)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        for p, grad in self.static_grads:  # the replay wrote these: p.grad may have been set to None since
            p.grad = grad
        return self.static_loss

    def _step(self) -> torch.Tensor:
        """The step itself (what the graph holds). Gradients are set to None first, so the backward writes
        fresh ``.grad`` tensors (allocated once, in the graph's pool, when captured) instead of adding."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        loss = self.loss_fn(self.model, self.static_x)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        return loss.detach()

    def _warm_up(self, steps: int) -> None:
        """Run ``steps`` steps (on a side stream on CUDA, as a capture needs: Triton compiles, cuDNN picks its
        algorithms, the optimizer makes its state), then undo their updates."""
        saved = _snapshot(self.model, self.optimizer)
        cuda = self.static_x.is_cuda
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            for _ in range(steps):
                self._step()
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
        _restore(self.model, self.optimizer, saved)


def _check(model, optimizer, example, capture: bool, warmup: int) -> None:
    if not isinstance(example, torch.Tensor) or not example.is_floating_point():
        raise TypeError("example must be a floating torch.Tensor (a batch of the shape every step will get)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if hasattr(model, "actnorm_initialized") and not model.actnorm_initialized():
        raise ValueError("ActNorm is not initialised: run one batch through the model first "
                         "(with torch.no_grad(): model(x)); its data-dependent init reads values")
    if getattr(model, "validate", False) or (getattr(model, "reversible", False)
                                             and getattr(model, "reversible_tol", None) is not None):
        raise ValueError("the model syncs with the host in a training step: build it with validate=False and "
                         "reversible_tol=None (the input NaN check and the reversible reconstruction check)")
    if capture:
        if not example.is_cuda:
            raise ValueError(f"capture needs CUDA tensors, the example is on {example.device}")
        if warmup < 1:
            raise ValueError(f"capture needs at least one warm-up step, got warmup={warmup}")
        if optimizer is not None and optimizer.defaults.get("capturable") is False:
            raise ValueError(f"{type(optimizer).__name__} must be built with capturable=True to be captured "
                             "(or pass optimizer=None and call optimizer.step() after each replay)")


def _snapshot(model: nn.Module, optimizer):
    """Copies of the weights, buffers and optimizer state (None for state a fresh optimizer does not have)."""
    weights = [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]
    state = {} if optimizer is None else {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                                           for p, s in optimizer.state.items()}
    return weights, state


@torch.no_grad()
def _restore(model: nn.Module, optimizer, saved) -> None:
    """Copy the snapshot back in place (the graph holds these very tensors); optimizer state created since
    the snapshot is zeroed (a fresh Adam's state: step 0, zero moments)."""
    weights, state = saved
    for t, old in zip([*model.parameters(), *model.buffers()], weights):
        t.copy_(old)
    if optimizer is None:
        return
    for p, s in optimizer.state.items():
        for k, v in s.items():
            if torch.is_tensor(v):
                v.copy_(state[p][k]) if k in state.get(p, {}) else v.zero_()
