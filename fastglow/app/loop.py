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
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .errors import CheckpointError, InputError, TrainingError
from .distributed import Dist, all_reduce_sum, broadcast_object, parameters_agree, setup_distributed
from .data import ShuffledBatches, dequantize, load_dataset, save_image_grid, split_dataset
from ..reference import bits_per_dim, z_shapes


@dataclasses.dataclass
class TrainConfig:
    """A run's settings; the fields resolved from the data (img_size, channels, test_fraction, n_bins)
    are filled in by :func:`train` and stored in every checkpoint."""
    out: str = "runs/glow"
    data: str = "digits"
    img_size: int | None = None
    channels: int | None = None
    n_bits: int | None = None
    npz_key: str | None = None
    test_fraction: float | None = None
    split_seed: int = 0
    n_flow: int = 16
    n_block: int = 2
    hidden: int = 16
    affine: bool = True
    conv_lu: bool = True
    reversible: bool = True
    backend: str = "auto"
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    cooldown: int = 1000
    steps: int = 2000
    seed: int = 0
    device: str = "auto"
    eval_every: int = 500
    ckpt_every: int = 500
    keep: int = 3
    log_every: int = 10
    temperature: float = 0.7
    n_sample: int = 64
    zoom: int = 1
    max_bad_steps: int = 10
    eval_batch: int = 512
    progress: bool = True
    threads: int | None = None
    n_bins: int | None = None


# Settings that define the run (data, model, data order); a resume must not change them.
FIXED_ON_RESUME = ("data", "img_size", "channels", "n_bits", "npz_key", "test_fraction", "split_seed",
                   "n_flow", "n_block", "hidden", "affine", "conv_lu", "batch", "seed")


# ----------------------------------------------------------------------------------------------
# Pieces of a step
# ----------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig):
    from ..model import Glow
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


def _shard(x: torch.Tensor, ctx: Dist) -> torch.Tensor:
    per = x.shape[0] // ctx.world
    return x[ctx.rank * per:(ctx.rank + 1) * per]


@torch.no_grad()
def evaluate(model, levels: torch.Tensor, n_bins: int, batch: int, seed: int, ctx: Dist) -> float:
    """Mean bits/dim over ``levels`` with fixed dequantisation noise (seeded), sharded over the ranks."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for start in range(0, levels.shape[0], batch):
        x = dequantize(levels[start:start + batch], n_bins, gen)[ctx.rank::ctx.world].to(ctx.device)
        if x.shape[0]:
            log_p, logdet, _ = model(x)
            bpd = bits_per_dim(log_p, logdet, x.shape, n_bins, reduction="none")
            total += torch.stack([bpd.double().sum(), total.new_tensor(x.shape[0])])
    total = all_reduce_sum(total, ctx)
    return (total[0] / total[1]).item()


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def resolve_config(options: dict, saved: dict | None, where: str = "") -> TrainConfig:
    """Options given (None = not given) over the defaults; when resuming, over the checkpoint's config,
    refusing a change to anything in FIXED_ON_RESUME."""
    given = {k: v for k, v in options.items() if v is not None}
    if given.get("data") not in (None, "digits"):
        given["data"] = str(Path(given["data"]).resolve())
    if saved is None:
        return TrainConfig(**given)
    for key in FIXED_ON_RESUME:
        if key in given and given[key] != saved.get(key):
            raise InputError(f"{where}: the run was started with {key}={saved.get(key)!r}; cannot resume it "
                             f"with {key}={given[key]!r} (use another --out for a new run)")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **given})


def train(options: dict) -> dict:
    """Run (or resume, ``options["resume"]``) a training run; -> summary dict. Options as TrainConfig's fields."""
    options = dict(options)
    resume = bool(options.pop("resume", False))
    ctx = setup_distributed(options.get("device") or "auto")
    try:
        return _train(options, resume, ctx)
    finally:
        if ctx.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _find_checkpoint(out: Path, resume: bool, ctx: Dist):
    """(path, checkpoint) to resume from, or None; refuses to start over a folder that holds checkpoints."""
    if not resume:
        if ckpt_io.list_checkpoints(out):
            raise InputError(f"{out}: already holds checkpoints; pass --resume to continue that run, or choose "
                             "another --out")
        return None
    path = None
    if ctx.main:  # rank 0 picks, so every rank loads the same file
        ckpt_io.remove_temp_files(out)
        newest = ckpt_io.newest_valid_checkpoint(out)
        path = str(newest[0]) if newest else None
    path = broadcast_object(path, ctx)
    return (path, ckpt_io.load_training_checkpoint(path)) if path else None


def _load_data(cfg: TrainConfig, ctx: Dist):
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
    if cfg.batch % ctx.world:
        raise InputError(f"--batch {cfg.batch} (the global batch) must be divisible by the {ctx.world} processes")
    return train_set, test_set


def _train(options: dict, resume: bool, ctx: Dist) -> dict:
    out = Path(options.get("out") or TrainConfig.out)
    options["out"] = str(out)
    found = _find_checkpoint(out, resume, ctx)
    cfg = resolve_config(options, found[1]["config"] if found else None, found[0] if found else "")
    train_set, test_set = _load_data(cfg, ctx)
    n_bins = cfg.n_bins

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    batches = ShuffledBatches(train_set.shape[0], cfg.batch, data_gen)
    log = ckpt_io.MetricsLog(out / "metrics.jsonl", ctx.main)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)

    def next_global_batch() -> torch.Tensor:
        return dequantize(train_set[batches.next()], n_bins, data_gen)

    if found:
        path, state = found
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: does not fit the run's model ({err})") from None
        batches.load_state_dict(state["data"])
        ckpt_io.restore_rng(state["rng"], data_gen)
        step, elapsed, skipped = state["step"], state.get("elapsed", 0.0), state.get("skipped", 0)
        log.truncate_after(step)
        log.write(event="resume", step=step, checkpoint=str(path))
        if ctx.main:
            print(f"resuming from {path} (step {step})", file=sys.stderr)
    else:
        if resume and ctx.main:
            print(f"no checkpoint in {out}: starting a new run", file=sys.stderr)
        if ctx.main:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # left by a run killed before its first checkpoint
        step, elapsed, skipped = 0, 0.0, 0
        with torch.no_grad():
            model(next_global_batch().to(ctx.device))  # ActNorm's data-dependent init: the whole first batch
        log.write(event="start", step=0, config=dataclasses.asdict(cfg), world_size=ctx.world,
                  n_train=train_set.shape[0], n_test=test_set.shape[0])

    net = model
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                      broadcast_buffers=False)

    sample_gen = torch.Generator().manual_seed(cfg.seed + 1)
    z_sample = [cfg.temperature * torch.randn(cfg.n_sample, *s, generator=sample_gen)
                for s in z_shapes(cfg.channels, cfg.img_size, cfg.n_block)]
    params = list(model.parameters())
    result = {"test_bpd": None, "sample": None, "checkpoint": None, "skipped": skipped}

    def evaluate_and_sample():
        result["test_bpd"] = evaluate(model, test_set, n_bins, cfg.eval_batch, cfg.seed, ctx)
        in_sync = parameters_agree(model, ctx)
        if ctx.main:
            with torch.no_grad():
                images = model.reverse([z.to(ctx.device) for z in z_sample])
            result["sample"] = str(out / "samples" / f"step_{step:08d}.png")
            save_image_grid(images, result["sample"], n_bins, zoom=cfg.zoom)
        log.write(event="eval", step=step, test_bpd=result["test_bpd"], sample=result["sample"],
                  ranks_in_sync=in_sync)
        return result["test_bpd"]

    def save():
        if ctx.main:
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "rng": ckpt_io.capture_rng(data_gen), "data": batches.state_dict(),
                       "config": dataclasses.asdict(cfg), "elapsed": elapsed, "skipped": skipped,
                       "test_bpd": result["test_bpd"]}
            result["checkpoint"] = str(ckpt_io.save_checkpoint(out, step, payload, cfg.keep))
            log.write(event="checkpoint", step=step, path=result["checkpoint"])

    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=min(step, cfg.steps), desc="train", unit="step", dynamic_ncols=True,
               disable=not (ctx.main and cfg.progress), mininterval=0.5, file=sys.stderr)
    bad_run, window, started = 0, [], time.perf_counter() - elapsed
    last_eval = last_ckpt = step
    while step < cfg.steps:
        x = _shard(next_global_batch(), ctx).to(ctx.device, non_blocking=True)
        step += 1
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss = training_loss(net, x, n_bins)
        loss.backward()
        stats = torch.stack([loss.detach().float(), _grad_norm(params).float().to(loss.device)])
        stats = all_reduce_sum(stats, ctx) / ctx.world  # gradients (hence their norm) already agree across ranks
        train_bpd, grad_norm = stats.tolist()
        if np.isfinite(train_bpd) and np.isfinite(grad_norm):
            optimizer.step()
            bad_run = 0
            window.append(train_bpd)
        else:
            optimizer.zero_grad(set_to_none=True)
            bad_run, skipped = bad_run + 1, skipped + 1
            result["skipped"] = skipped
            log.write(event="skip", step=step, train_bpd=str(train_bpd), grad_norm=str(grad_norm),
                      consecutive=bad_run, skipped_total=skipped)
            if bad_run >= cfg.max_bad_steps:
                raise TrainingError(
                    f"the loss or its gradient was non-finite for {bad_run} consecutive steps "
                    f"({step - bad_run + 1}..{step}); stopped without updating the weights with them "
                    f"(last checkpoint: {result['checkpoint'] or 'none'}); try a lower --lr or a longer --warmup")
        elapsed = time.perf_counter() - started
        bar.update(1)
        if window:
            bar.set_postfix_str(f"bpd={window[-1]:.3f} lr={lr:.2e}"
                                + (f" test={result['test_bpd']:.3f}" if result["test_bpd"] else ""), refresh=False)
        if step % cfg.log_every == 0 and window:
            log.write(event="train", step=step, train_bpd=float(np.mean(window)), lr=lr, grad_norm=grad_norm,
                      elapsed_s=round(elapsed, 3), skipped_total=skipped)
            window = []
        if cfg.eval_every and step % cfg.eval_every == 0:
            evaluate_and_sample()
            last_eval = step
        if cfg.ckpt_every and step % cfg.ckpt_every == 0:
            save()
            last_ckpt = step
    bar.close()
    if last_eval != step or result["test_bpd"] is None:
        evaluate_and_sample()
    if last_ckpt != step:
        save()
    result["checkpoint"] = result["checkpoint"] or (found[0] if found else None)
    elapsed = time.perf_counter() - started
    log.write(event="done", step=step, test_bpd=result["test_bpd"], elapsed_s=round(elapsed, 3),
              skipped_total=skipped)
    return {**result, "step": step, "elapsed_s": elapsed, "config": dataclasses.asdict(cfg),
            "rank": ctx.rank, "world_size": ctx.world}
