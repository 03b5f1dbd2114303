"""The pieces of a training step: the model a config builds, its loss, the learning-rate schedule, the step
itself (:func:`gradient_step`: a batch -> loss, gradients and the numbers the guard checks; no I/O), evaluation on
held-out images and the gradient norm (see :mod:`fastglow.app.loop` for the maths of a step)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from .. import Glow, bits_per_dim
from .config import TrainConfig
from .data import dequantize
from .datasets import take
from .distributed import Dist, all_reduce_sum
from .guard import lu_log_scale_max


def build_model(cfg: TrainConfig) -> Glow:
    return Glow(cfg.channels, cfg.n_flow, cfg.n_block, affine=cfg.affine, conv_lu=cfg.conv_lu,
                permutation=cfg.permutation,
                hidden_channels=cfg.hidden, backend=cfg.backend, reversible=cfg.reversible,
                n_classes=cfg.n_classes if cfg.conditional else None, class_weight=cfg.class_weight,
                **(dict(validate=False, reversible_tol=None) if cfg.cuda_graph else {}))  # no host syncs


def training_loss(model, x: torch.Tensor, n_bins: int, y: torch.Tensor | None = None) -> torch.Tensor:
    """Mean bits/dim of a batch (rosinality's calc_loss); with labels y, of log p(x | y), plus the class loss."""
    log_p, logdet, z_outs = model(x) if y is None else model(x, y)
    loss = bits_per_dim(log_p, logdet, x.shape, n_bins)
    if y is None:
        return loss
    glow = getattr(model, "module", model)  # under DDP, the Glow inside the wrapper
    return loss + glow.class_loss(z_outs, y)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """lr * min(1, t / warmup) * min(1, (T - t + 1) / cooldown): linear warm-up, optional linear cool-down
    (cooldown None: T // 2, the last half of the run)."""
    cooldown = cfg.steps // 2 if cfg.cooldown is None else cfg.cooldown
    up = min(1.0, step / cfg.warmup) if cfg.warmup > 0 else 1.0
    down = min(1.0, (cfg.steps - step + 1) / cooldown) if cooldown > 0 else 1.0
    return cfg.lr * up * max(down, 0.0)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step measured, averaged over the ranks: the training loss (bits/dim, plus the class loss of a
    class-conditional model), ||grad||_2 over every parameter, max |w_s| of the LU 1x1 convolutions
    (:func:`fastglow.app.guard.lu_log_scale_max`) and the caller's ``counts``, summed over the ranks."""
    loss: float
    grad_norm: float
    log_scale: float
    counts: tuple[float, ...] = ()

    @property
    def finite(self) -> bool:
        """Whether the loss and the gradient are finite (else the step must not update the weights)."""
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def gradient_step(net, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor | None, *, lr: float,
                  n_bins: int, dist: Dist | None = None, loss_fn: Callable = training_loss,
                  graph: Callable | None = None, counts: Sequence[float] = ()) -> StepResult:
    """Set the learning rate to ``lr``, zero the gradients, then the loss of the batch ``x`` (labels ``y``) and
    its gradients: ``loss_fn(net, x, n_bins, y).backward()``, or ``graph(x)`` (a :class:`fastglow.CudaGraphStep`
    that does both) -> :class:`StepResult`. ``net``: the model, or the model in DistributedDataParallel (whose
    backward averages the gradients over the ranks of ``dist``); the loss and ``counts`` are reduced over them
    in one all-reduce (one host sync). The update itself (``optimizer.step()``) is the caller's, once the step
    is accepted (:class:`fastglow.app.guard.Guard`); nothing here writes, logs or draws random numbers other
    than the model's own."""
    world = 1 if dist is None else dist.world
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    if graph is None:
        loss = loss_fn(net, x, n_bins, y)
        loss.backward()
    else:
        loss = graph(x)
    model = getattr(net, "module", net)  # under DDP, the Glow inside the wrapper
    stats = torch.stack([loss.detach().float(), gradient_norm(model.parameters()).float().to(loss.device),
                         lu_log_scale_max(model).float().to(loss.device),
                         *(torch.tensor(float(c * world), device=loss.device) for c in counts)])
    if dist is not None:
        stats = all_reduce_sum(stats, dist)
    mean_loss, grad_norm, log_scale, *summed = (stats / world).tolist()  # gradients agree over the ranks already
    return StepResult(mean_loss, grad_norm, log_scale, tuple(summed))


@torch.no_grad()
def evaluate(model, levels: torch.Tensor, n_bins: int, batch: int, seed: int, dist: Dist,
             labels: torch.Tensor | None = None) -> float:
    """Mean bits/dim over ``levels`` (a tensor or a data set split: its unreadable images left out) with fixed
    dequantisation noise (seeded), sharded over the ranks; with ``labels`` (a class-conditional model), of
    log p(x | label)."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for start in range(0, levels.shape[0], batch):
        chunk, chunk_labels = take(levels, labels, start, start + batch)
        x = dequantize(chunk, n_bins, gen)[dist.rank::dist.world].to(dist.device)
        if x.shape[0]:
            y = None if labels is None else chunk_labels[dist.rank::dist.world].to(dist.device)
            log_p, logdet, _ = model(x) if y is None else model(x, y)
            bpd = bits_per_dim(log_p, logdet, x.shape, n_bins, reduction="none")
            total += torch.stack([bpd.double().sum(), total.new_tensor(x.shape[0])])
    total = all_reduce_sum(total, dist)
    return (total[0] / total[1]).item()


def gradient_norm(params) -> torch.Tensor:
    """||(grad p for p in params)||_2 over the parameters that have a gradient (0 if none)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
