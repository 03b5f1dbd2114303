"""The training loop: maximum likelihood on dequantised images, resumable, single- or multi-process.

Per step, on a global batch of B images x = (level + u) / n_bins - 1/2, u ~ U[0, 1):
    loss = bits/dim = -(log p(z) + log|det J| - D log n_bins) / (D log 2),   D = C H W
minimised with Adam at lr_t = lr * min(1, t / warmup) (linear warm-up, t = 1, 2, ...), optionally times
min(1, (T - t + 1) / cooldown) (a linear decay to zero over the last ``cooldown`` of the T steps).

Multi-process (``torchrun --nproc_per_node N``, one process per GPU, or gloo on CPU): DistributedDataParallel;
``--batch`` is the global batch, every rank draws the same global batch and noise from the same generator and
keeps its own contiguous 1/N of it, so a run's data and results do not depend on N (up to float rounding).
ActNorm's data-dependent init uses the whole first global batch (each rank computes the same statistics; DDP's
construction then broadcasts rank 0's parameters and buffers, so all ranks start bit-identical). Only rank 0
writes files. A non-finite loss or gradient skips the optimizer step on every rank (the loss is all-reduced,
the gradients already are); ``max_bad_steps`` consecutive skips stop the run.

A run is a :class:`RunState` built by :func:`start_or_resume`, advanced by :func:`train_step`, with
:func:`evaluate_and_sample` and :func:`save` on schedule; :func:`train` runs the whole of it.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import CudaGraphStep, Glow, bits_per_dim, z_shapes
from . import checkpoint as ckpt_io
from .config import TrainConfig, resolve_config
from .data import ShuffledBatches, dequantize, load_dataset, save_image_grid, split_dataset
from .distributed import (Dist, all_reduce_sum, broadcast_object, parameters_agree, setup_distributed, shard,
                          teardown, wrap_model)
from .errors import CheckpointError, InputError, TrainingError


# ----------------------------------------------------------------------------------------------
# Pieces of a step
# ----------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig) -> Glow:
    return Glow(cfg.channels, cfg.n_flow, cfg.n_block, affine=cfg.affine, conv_lu=cfg.conv_lu,
                hidden_channels=cfg.hidden, backend=cfg.backend, reversible=cfg.reversible)


def training_loss(model, x: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Mean bits/dim of a batch (rosinality's calc_loss)."""
    log_p, logdet, _ = model(x)
    return bits_per_dim(log_p, logdet, x.shape, n_bins)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """lr * min(1, t / warmup) * min(1, (T - t + 1) / cooldown): linear warm-up, optional linear cool-down."""
    up = min(1.0, step / cfg.warmup) if cfg.warmup > 0 else 1.0
    down = min(1.0, (cfg.steps - step + 1) / cfg.cooldown) if cfg.cooldown > 0 else 1.0
    return cfg.lr * up * max(down, 0.0)


@torch.no_grad()
def evaluate(model, levels: torch.Tensor, n_bins: int, batch: int, seed: int, dist: Dist) -> float:
    """Mean bits/dim over ``levels`` with fixed dequantisation noise (seeded), sharded over the ranks."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for start in range(0, levels.shape[0], batch):
        x = dequantize(levels[start:start + batch], n_bins, gen)[dist.rank::dist.world].to(dist.device)
        if x.shape[0]:
            log_p, logdet, _ = model(x)
            bpd = bits_per_dim(log_p, logdet, x.shape, n_bins, reduction="none")
            total += torch.stack([bpd.double().sum(), total.new_tensor(x.shape[0])])
    total = all_reduce_sum(total, dist)
    return (total[0] / total[1]).item()


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


# ----------------------------------------------------------------------------------------------
# A run's state, and how it starts or resumes
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunState:
    """Everything a run carries from step to step (a checkpoint holds what a resume needs of it)."""
    cfg: TrainConfig
    dist: Dist
    train_set: torch.Tensor  # uint8 levels
    test_set: torch.Tensor
    model: Glow
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator  # the data order and the dequantisation noise
    batches: ShuffledBatches
    log: ckpt_io.MetricsLog
    net: torch.nn.Module | None = None  # the model, in DistributedDataParallel under torchrun
    z_sample: list[torch.Tensor] = dataclasses.field(default_factory=list)  # latents of every sample grid
    step: int = 0
    elapsed: float = 0.0  # training seconds so far, over every resume
    started: float = 0.0  # time.perf_counter() at which this process's elapsed would have been 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    bad_run: int = 0  # of them, consecutive up to now
    window: list[float] = dataclasses.field(default_factory=list)  # train bits/dim since the last log line
    test_bpd: float | None = None
    sample: str | None = None  # the newest sample grid
    checkpoint: str | None = None  # the newest checkpoint this process wrote
    resumed_from: str | None = None
    graph_step: CudaGraphStep | None = None  # --cuda-graph: forward and backward captured at the first step

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def next_global_batch(self) -> torch.Tensor:
        return dequantize(self.train_set[self.batches.next()], self.cfg.n_bins, self.data_gen)


def start_or_resume(options: dict, resume: bool, dist: Dist) -> RunState:
    """Resume from the newest valid checkpoint in ``options["out"]`` (``resume``), or start a new run there."""
    out = Path(options.get("out") or TrainConfig.out)
    options["out"] = str(out)
    found = _find_checkpoint(out, resume, dist)
    cfg = resolve_config(options, found[1]["config"] if found else None, found[0] if found else "")
    if cfg.cuda_graph and dist.world > 1:
        raise InputError("--cuda-graph runs in one process: drop it under torchrun")
    if cfg.cuda_graph and dist.device.type != "cuda" and dist.main:
        print("--cuda-graph: no CUDA device, each step runs eagerly", file=sys.stderr)
    state = _new_state(cfg, dist)
    if found:
        _restore(state, *found)
    else:
        _initialise(state, resume)
    state.net = wrap_model(state.model, dist)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    state.z_sample = [cfg.temperature * torch.randn(cfg.n_sample, *s, generator=gen)
                      for s in z_shapes(cfg.channels, cfg.img_size, cfg.n_block)]
    return state


def _find_checkpoint(out: Path, resume: bool, dist: Dist):
    """(path, checkpoint) to resume from, or None; refuses to start over a folder that holds checkpoints."""
    if not resume:
        if ckpt_io.list_checkpoints(out):
            raise InputError(f"{out}: already holds checkpoints; pass --resume to continue that run, or choose "
                             "another --out")
        return None
    path = None
    if dist.main:  # rank 0 picks, so every rank loads the same file
        ckpt_io.remove_temp_files(out)
        newest = ckpt_io.newest_valid_checkpoint(out)
        path = str(newest[0]) if newest else None
    path = broadcast_object(path, dist)
    return (path, ckpt_io.load_training_checkpoint(path)) if path else None


def _load_data(cfg: TrainConfig, dist: Dist):
    """Load and split the data set, filling in cfg's data-derived fields: -> (train, test) uint8 levels."""
    levels, n_bins = load_dataset(cfg.data, cfg.img_size, cfg.channels, cfg.n_bits, cfg.npz_key)
    cfg.channels, cfg.img_size, cfg.n_bins = levels.shape[1], levels.shape[2], n_bins
    if cfg.data != "digits":
        cfg.n_bits = n_bins.bit_length() - 1
    if levels.shape[2] != levels.shape[3]:
        raise InputError(f"{cfg.data}: images are {levels.shape[3]}x{levels.shape[2]}; pass --img-size to "
                         "centre-crop them square")
    if cfg.img_size % 2 ** cfg.n_block:
        raise InputError(f"{cfg.data}: image size {cfg.img_size} is not a multiple of 2**n_block = "
                         f"{2 ** cfg.n_block}: use a smaller --n-block or another --img-size")
    if cfg.test_fraction is None:
        cfg.test_fraction = 0.2 if cfg.data == "digits" else 0.1
    train_set, test_set = split_dataset(levels, cfg.test_fraction, torch.Generator().manual_seed(cfg.split_seed))
    if test_set.shape[0] == 0 or train_set.shape[0] == 0:
        raise InputError(f"{cfg.data}: {levels.shape[0]} images split by --test-fraction {cfg.test_fraction} "
                         "leave an empty training or held-out set")
    if cfg.batch % dist.world:
        raise InputError(f"--batch {cfg.batch} (the global batch) must be divisible by the {dist.world} processes")
    return train_set, test_set


def _new_state(cfg: TrainConfig, dist: Dist) -> RunState:
    """The data, and a seeded model, optimizer and data order at step 0 (before ActNorm's init or a resume)."""
    train_set, test_set = _load_data(cfg, dist)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg).to(dist.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    batches = ShuffledBatches(train_set.shape[0], cfg.batch, data_gen)
    log = ckpt_io.MetricsLog(Path(cfg.out) / "metrics.jsonl", dist.main)
    if dist.main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return RunState(cfg, dist, train_set, test_set, model, optimizer, data_gen, batches, log)


def _restore(state: RunState, path: str, ckpt: dict) -> None:
    """Load a training checkpoint into ``state``: weights, optimizer, data order, every RNG, counters."""
    try:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: does not fit the run's model ({err})") from None
    state.batches.load_state_dict(ckpt["data"])
    ckpt_io.restore_rng(ckpt["rng"], state.data_gen)
    state.step, state.elapsed, state.skipped = ckpt["step"], ckpt.get("elapsed", 0.0), ckpt.get("skipped", 0)
    state.resumed_from = path
    state.log.truncate_after(state.step)
    state.log.write(event="resume", step=state.step, checkpoint=str(path))
    if state.dist.main:
        print(f"resuming from {path} (step {state.step})", file=sys.stderr)


def _initialise(state: RunState, resume: bool) -> None:
    """A new run: ActNorm's data-dependent init on the whole first global batch, a fresh metrics log."""
    if resume and state.dist.main:
        print(f"no checkpoint in {state.out}: starting a new run", file=sys.stderr)
    if state.dist.main:
        state.log.path.unlink(missing_ok=True)  # left by a run killed before its first checkpoint
    with torch.no_grad():
        state.model(state.next_global_batch().to(state.dist.device))
    state.log.write(event="start", step=0, config=dataclasses.asdict(state.cfg), world_size=state.dist.world,
                    n_train=state.train_set.shape[0], n_test=state.test_set.shape[0])


# ----------------------------------------------------------------------------------------------
# Steps, evaluations, checkpoints
# ----------------------------------------------------------------------------------------------
def train_step(state: RunState) -> tuple[float, float]:
    """One optimizer step on the next global batch (skipped on every rank if the loss or the gradient is
    non-finite) -> (learning rate, gradient norm)."""
    cfg, dist = state.cfg, state.dist
    x = shard(state.next_global_batch(), dist).to(dist.device, non_blocking=True)
    state.step += 1
    lr = learning_rate(cfg, state.step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    loss = _loss_and_gradients(state, x)
    stats = torch.stack([loss.detach().float(), _grad_norm(state.model.parameters()).float().to(loss.device)])
    stats = all_reduce_sum(stats, dist) / dist.world  # gradients (hence their norm) already agree across ranks
    train_bpd, grad_norm = stats.tolist()
    if np.isfinite(train_bpd) and np.isfinite(grad_norm):
        state.optimizer.step()
        state.bad_run = 0
        state.window.append(train_bpd)
    else:
        _skip_step(state, train_bpd, grad_norm)
    state.elapsed = time.perf_counter() - state.started
    return lr, grad_norm


def _loss_and_gradients(state: RunState, x: torch.Tensor) -> torch.Tensor:
    """Forward and backward of a step: eagerly, or (``cuda_graph``) replayed from a graph captured on the first
    batch (eager on a CPU)."""
    if not state.cfg.cuda_graph:
        loss = training_loss(state.net, x, state.cfg.n_bins)
        loss.backward()
        return loss
    if state.graph_step is None:
        state.graph_step = CudaGraphStep(state.model, None, x, n_bins=state.cfg.n_bins)
    return state.graph_step(x)


def _skip_step(state: RunState, train_bpd: float, grad_norm: float) -> None:
    """Drop a non-finite step's gradients; stop the run after ``max_bad_steps`` such steps in a row."""
    state.optimizer.zero_grad(set_to_none=True)
    state.bad_run += 1
    state.skipped += 1
    state.log.write(event="skip", step=state.step, train_bpd=str(train_bpd), grad_norm=str(grad_norm),
                    consecutive=state.bad_run, skipped_total=state.skipped)
    if state.bad_run >= state.cfg.max_bad_steps:
        raise TrainingError(
            f"the loss or its gradient was non-finite for {state.bad_run} consecutive steps "
            f"({state.step - state.bad_run + 1}..{state.step}); stopped without updating the weights with them "
            f"(last checkpoint: {state.checkpoint or 'none'}); try a lower --lr or a longer --warmup")


def _report(state: RunState, bar, lr: float, grad_norm: float) -> None:
    """Advance the progress bar; every ``log_every`` steps, one "train" line with the mean bits/dim since the last."""
    bar.update(1)
    if state.window:
        bar.set_postfix_str(f"bpd={state.window[-1]:.3f} lr={lr:.2e}"
                            + (f" test={state.test_bpd:.3f}" if state.test_bpd else ""), refresh=False)
    if state.step % state.cfg.log_every == 0 and state.window:
        state.log.write(event="train", step=state.step, train_bpd=float(np.mean(state.window)), lr=lr,
                        grad_norm=grad_norm, elapsed_s=round(state.elapsed, 3), skipped_total=state.skipped)
        state.window = []


def evaluate_and_sample(state: RunState) -> None:
    """Held-out bits/dim (every rank), a sample grid (rank 0) and one "eval" line in the log."""
    cfg, dist, model = state.cfg, state.dist, state.model
    state.test_bpd = evaluate(model, state.test_set, cfg.n_bins, cfg.eval_batch, cfg.seed, dist)
    in_sync = parameters_agree(model, dist)
    if dist.main:
        with torch.no_grad():
            images = model.reverse([z.to(dist.device) for z in state.z_sample])
        state.sample = str(state.out / "samples" / f"step_{state.step:08d}.png")
        save_image_grid(images, state.sample, cfg.n_bins, zoom=cfg.zoom)
    state.log.write(event="eval", step=state.step, test_bpd=state.test_bpd, sample=state.sample,
                    ranks_in_sync=in_sync)


def save(state: RunState) -> None:
    """Rank 0 writes a checkpoint of the run (atomically, keeping the newest ``keep``) and logs it."""
    if not state.dist.main:
        return
    payload = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
               "rng": ckpt_io.capture_rng(state.data_gen), "data": state.batches.state_dict(),
               "config": dataclasses.asdict(state.cfg), "elapsed": state.elapsed, "skipped": state.skipped,
               "test_bpd": state.test_bpd}
    state.checkpoint = str(ckpt_io.save_checkpoint(state.out, state.step, payload, state.cfg.keep))
    state.log.write(event="checkpoint", step=state.step, path=state.checkpoint)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def train(options: dict) -> dict:
    """Run (or resume, ``options["resume"]``) a training run; -> summary dict. Options as TrainConfig's fields."""
    options = dict(options)
    resume = bool(options.pop("resume", False))
    dist = setup_distributed(options.get("device"))
    try:
        return run(start_or_resume(options, resume, dist))
    finally:
        teardown(dist)


def run(state: RunState) -> dict:
    """Train from ``state.step`` to ``cfg.steps``, evaluating and saving on schedule and at the end -> summary."""
    from tqdm import tqdm

    cfg = state.cfg
    bar = tqdm(total=cfg.steps, initial=min(state.step, cfg.steps), desc="train", unit="step", dynamic_ncols=True,
               disable=not (state.dist.main and cfg.progress), mininterval=0.5, file=sys.stderr)
    state.started = time.perf_counter() - state.elapsed
    last_eval = last_ckpt = state.step
    while state.step < cfg.steps:
        lr, grad_norm = train_step(state)
        _report(state, bar, lr, grad_norm)
        if cfg.eval_every and state.step % cfg.eval_every == 0:
            evaluate_and_sample(state)
            last_eval = state.step
        if cfg.ckpt_every and state.step % cfg.ckpt_every == 0:
            save(state)
            last_ckpt = state.step
    bar.close()
    if last_eval != state.step or state.test_bpd is None:
        evaluate_and_sample(state)
    if last_ckpt != state.step:
        save(state)
    elapsed = time.perf_counter() - state.started
    state.log.write(event="done", step=state.step, test_bpd=state.test_bpd, elapsed_s=round(elapsed, 3),
                    skipped_total=state.skipped)
    return {"test_bpd": state.test_bpd, "sample": state.sample, "checkpoint": state.checkpoint or state.resumed_from,
            "skipped": state.skipped, "step": state.step, "elapsed_s": elapsed, "config": dataclasses.asdict(state.cfg),
            "rank": state.dist.rank, "world_size": state.dist.world}
