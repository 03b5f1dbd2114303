"""The training loop: maximum likelihood on dequantised images, resumable, single- or multi-process.

Per step, on a global batch of B images x = (level + u) / n_bins - 1/2, u ~ U[0, 1):
    loss = bits/dim = -(log p(z) + log|det J| - D log n_bins) / (D log 2),   D = C H W
(class-conditional runs, ``--conditional``: log p(z | y) with the image's label y, plus the auxiliary classifier's
``model.class_loss`` = class_weight * cross-entropy in bits; the logged train_bpd is that sum)
minimised with Adam at lr_t = lr * min(1, t / warmup) (linear warm-up, t = 1, 2, ...), optionally times
min(1, (T - t + 1) / cooldown) (a linear decay to zero over the last ``cooldown`` of the T steps).

Multi-process (``torchrun --nproc_per_node N``, one process per GPU, or gloo on CPU): DistributedDataParallel;
``--batch`` is the global batch; each rank's DataLoader reads only its contiguous 1/N of every global batch and
draws that share of the global batch's noise (:mod:`fastglow.app.sampler`), so a run's data and results do not
depend on N (up to float rounding), nor on the number of loader workers. Unreadable images met in a batch are
filled in from the same batch, logged ("bad_images") and counted; more than ``max_bad_images`` of the training
split stop the run like a divergence.
ActNorm's data-dependent init uses the whole first global batch (each rank computes the same statistics; DDP's
construction then broadcasts rank 0's parameters and buffers, so all ranks start bit-identical). Only rank 0
writes files. A non-finite loss or gradient skips the optimizer step on every rank (the loss is all-reduced,
the gradients already are); ``max_bad_steps`` consecutive skips stop the run.

A run is a :class:`RunState` built by :func:`start_or_resume`, advanced by :func:`train_step`, with
:func:`evaluate_and_sample` and :func:`save` on schedule; :func:`train` runs the whole of it.

Only sound weights are kept (:mod:`fastglow.app.guard`): a checkpoint is written after a probe (held-out loss
finite, decoding finite and invertible) or an evaluation at the same step passed; a held-out loss, sample grid
or training step that fails, or ``max_bad_steps`` skips in a row, stop the run with one line after writing the
newest state whose training loss was finite (if it is sound and newer than the last checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from .. import CudaGraphStep, Glow
from . import checkpoint as ckpt_io
from . import fingerprint, guard, runfolder
from .config import TrainConfig, resolve_config
from .classes import classification_accuracy, run_labels, sample_grid_latents
from .data import load_split, save_image_grid
from .datasets import Split
from .distributed import (Dist, all_reduce_sum, broadcast_object, parameters_agree, pick_backend,
                          setup_distributed, teardown, wrap_model)
from .errors import CheckpointError, InputError, TrainingError, one_line
from .objective import build_model, evaluate, gradient_norm, learning_rate, training_loss
from .progress import progress
from .sampler import TrainData


# ----------------------------------------------------------------------------------------------
# A run's state, and how it starts or resumes
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunState:
    """Everything a run carries from step to step (a checkpoint holds what a resume needs of it)."""
    cfg: TrainConfig
    dist: Dist
    train_set: Split  # uint8 levels
    test_set: Split
    model: Glow
    optimizer: torch.optim.Optimizer
    data: TrainData  # the data order, the loader, the dequantisation noise, the unreadable images met
    log: ckpt_io.MetricsLog
    net: torch.nn.Module | None = None  # the model, in DistributedDataParallel under torchrun
    z_sample: list[torch.Tensor] = dataclasses.field(default_factory=list)  # latents of every sample grid
    dataset: dict = dataclasses.field(default_factory=dict)  # held-out keys, fingerprint (app/fingerprint.py)
    train_labels: torch.Tensor | None = None  # int64 class ids (class-conditional runs)
    test_labels: torch.Tensor | None = None
    y_sample: torch.Tensor | None = None  # classes of the sample grid's images: one row per class
    step: int = 0
    elapsed: float = 0.0  # training seconds so far, over every resume
    started: float = 0.0  # time.perf_counter() at which this process's elapsed would have been 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    bad_run: int = 0  # of them, consecutive up to now
    window: list[float] = dataclasses.field(default_factory=list)  # train bits/dim since the last log line
    test_bpd: float | None = None
    test_accuracy: float | None = None  # of model.classify on the held-out split (class-conditional runs)
    sample: str | None = None  # the newest sample grid
    checkpoint: str | None = None  # the newest checkpoint this process wrote
    resumed_from: str | None = None
    graph_step: CudaGraphStep | None = None  # --cuda-graph: forward and backward captured at the first step
    run_id: str | None = None  # in every checkpoint: the rotation deletes only this run's checkpoints
    saved_step: int = -1  # the step of the newest checkpoint written or resumed from (every rank)
    checked_step: int = -1  # the newest step whose weights passed an evaluation or a soundness probe
    last_good: guard.LastGood = dataclasses.field(default_factory=guard.LastGood)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def start_or_resume(options: dict, resume: bool, dist: Dist, new_run: bool = False,
                    lock: runfolder.RunLock | None = None) -> RunState:
    """Resume from the newest valid checkpoint in ``options["out"]`` (``resume``), or start a new run there
    (see :mod:`fastglow.app.runfolder`); rank 0 takes ``lock`` on the folder first."""
    out = Path(options.get("out") or TrainConfig.out)
    options["out"] = str(out)
    fingerprint.check_out_outside_data(out, options.get("data"))
    found = runfolder.find_checkpoint(out, resume, new_run, lock, dist)
    cfg = resolve_config(options, found[1]["config"] if found else None, found[0] if found else "")
    cfg.backend = pick_backend(cfg.backend, dist.device)
    if cfg.cuda_graph and dist.world > 1:
        raise InputError("--cuda-graph runs in one process: drop it under torchrun")
    if cfg.cuda_graph and dist.device.type != "cuda" and dist.main:
        print("--cuda-graph: no CUDA device, each step runs eagerly", file=sys.stderr)
    state = _new_state(cfg, dist)
    state.z_sample, state.y_sample = sample_grid_latents(cfg)  # first: a grid too large is refused before a resume
    if found:
        _restore(state, *found)
    else:
        _initialise(state)
    state.net = wrap_model(state.model, dist)
    return state


def _new_state(cfg: TrainConfig, dist: Dist) -> RunState:
    """The data, and a seeded model, optimizer and data order at step 0 (before ActNorm's init or a resume)."""
    train_set, test_set = load_split(cfg, dist.world)
    train_labels, test_labels = run_labels(cfg, len(train_set) + len(test_set))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg).to(dist.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = TrainData(train_set, train_labels, cfg, dist)
    log = ckpt_io.MetricsLog(Path(cfg.out) / "metrics.jsonl", dist.main)
    if dist.main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    dataset = fingerprint.record(cfg.data, train_set, test_set, cfg.n_bins, cfg.test_fraction, cfg.split_seed)
    return RunState(cfg, dist, train_set, test_set, model, optimizer, data, log, dataset=dataset,
                    train_labels=train_labels, test_labels=test_labels)


def _restore(state: RunState, path: str, ckpt: dict) -> None:
    """Load a training checkpoint into ``state``: weights, optimizer, data order, every RNG, counters."""
    fingerprint.check_resume(ckpt.get("dataset"), state.dataset, state.cfg.data, path)
    try:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: does not fit the run's model ({err})") from None
    state.data.load_state_dict(ckpt["data"], path)
    ckpt_io.restore_rng(ckpt["rng"])
    state.step, state.elapsed, state.skipped = ckpt["step"], ckpt.get("elapsed", 0.0), ckpt.get("skipped", 0)
    state.resumed_from, state.run_id, state.saved_step = path, ckpt.get("run_id"), state.step
    state.window = list(ckpt.get("window", []))
    state.test_bpd, state.test_accuracy = ckpt.get("test_bpd"), ckpt.get("test_accuracy")
    if state.step >= state.cfg.steps:  # a finished run: nothing to do, nothing written
        grid = state.out / "samples" / f"step_{state.step:08d}.png"
        state.sample = str(grid) if grid.is_file() else None
        if state.dist.main:
            print(f"the run finished at step {state.step} ({path}): nothing to do (raise --steps to train on)",
                  file=sys.stderr)
        return
    state.log.truncate_after(state.step)
    state.log.write(event="resume", step=state.step, checkpoint=str(path))
    if state.dist.main:
        print(f"resuming from {path} (step {state.step})", file=sys.stderr)


def _initialise(state: RunState) -> None:
    """A new run: ActNorm's data-dependent init on the whole first global batch, a fresh metrics log."""
    state.run_id = broadcast_object(uuid.uuid4().hex, state.dist)
    x, y = state.data.first_batch()
    with torch.no_grad():
        state.model(x, y)
    state.log.write(event="start", step=0, config=dataclasses.asdict(state.cfg), world_size=state.dist.world,
                    n_train=len(state.train_set), n_test=len(state.test_set), run_id=state.run_id,
                    workers=state.data.workers)


# ----------------------------------------------------------------------------------------------
# Steps, evaluations, checkpoints
# ----------------------------------------------------------------------------------------------
def train_step(state: RunState) -> tuple[float, float]:
    """One optimizer step on the next global batch (skipped on every rank if the loss or the gradient is
    non-finite) -> (learning rate, gradient norm)."""
    cfg, dist = state.cfg, state.dist
    before = _resumable_extra(state)  # the state these weights belong to, should their loss prove finite
    x, y, bad = state.data.batch(state.step + 1)
    state.step += 1
    lr = learning_rate(cfg, state.step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    try:
        loss = _loss_and_gradients(state, x, y)
    except torch.linalg.LinAlgError as err:  # the reversible backward inverts the 1x1 convolutions
        _diverge(state, f"the model stopped being invertible at step {state.step} ({one_line(err)})")
    stats = torch.stack([loss.detach().float(), gradient_norm(state.model.parameters()).float().to(loss.device),
                         guard.lu_log_scale_max(state.model).float().to(loss.device),
                         torch.tensor(float(len(bad) * dist.world), device=loss.device)])
    stats = all_reduce_sum(stats, dist) / dist.world  # gradients (hence their norm) already agree across ranks
    train_bpd, grad_norm, log_scale, n_bad = stats.tolist()
    if not log_scale < guard.MAX_LOG_SCALE:
        _diverge(state, f"a 1x1 convolution became singular by step {state.step} (|log scale| {log_scale:.3g})")
    if np.isfinite(train_bpd) and np.isfinite(grad_norm):
        state.last_good.capture(state.model, state.optimizer, before)
        state.optimizer.step()
        state.bad_run = 0
        state.window.append(train_bpd)
    else:
        _skip_step(state, train_bpd, grad_norm)
    if n_bad and (why := state.data.record_bad(bad, state.step, state.log)):
        _diverge(state, why, hint="repair them, then --resume (or resume with a higher --max-bad-images)")
    state.elapsed = time.perf_counter() - state.started
    return lr, grad_norm


def _loss_and_gradients(state: RunState, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Forward and backward of a step: eagerly, or (``cuda_graph``) replayed from a graph captured on the first
    batch (eager on a CPU)."""
    if not state.cfg.cuda_graph:
        loss = training_loss(state.net, x, state.cfg.n_bins, y)
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
        _diverge(state, f"the loss or its gradient was non-finite for {state.bad_run} consecutive steps "
                        f"({state.step - state.bad_run + 1}..{state.step}); stopped without updating the weights "
                        "with them")


def _report(state: RunState, bar, lr: float, grad_norm: float) -> None:
    """Advance the progress bar; every ``log_every`` steps, one "train" line with the mean bits/dim since the last
    (and, with reversible backprop, each level's relative reconstruction error of the step and the fallbacks)."""
    bar.update(1)
    rec = _reconstruction(state)
    if state.window:
        bar.set_postfix_str(f"bpd={state.window[-1]:.3f} lr={lr:.2e}"
                            + (f" rec={max(rec['reconstruction_error'], key=float):.1e}" if rec else "")
                            + (f" test={state.test_bpd:.3f}" if state.test_bpd else "")
                            + (f" bad={len(state.data.bad)}" if state.data.bad else ""), refresh=False)
    if state.step % state.cfg.log_every == 0 and state.window:
        state.log.write(event="train", step=state.step, train_bpd=float(np.mean(state.window)), lr=lr,
                        grad_norm=grad_norm, elapsed_s=round(state.elapsed, 3), skipped_total=state.skipped,
                        bad_images_total=len(state.data.bad), **rec)
        state.window = []


def _reconstruction(state: RunState) -> dict:
    """The latest reversible backward's per-level reconstruction errors (non-finite ones as strings) and
    fallback count; {} without reversible backprop."""
    if not state.cfg.reversible:
        return {}
    errors = [e if np.isfinite(e) else str(e) for e in state.model.reconstruction_error().tolist()]
    return dict(reconstruction_error=errors, reconstruction_fallbacks=state.model.reconstruction_fallbacks)


def evaluate_and_sample(state: RunState) -> None:
    """Held-out bits/dim (every rank), a sample grid (rank 0) and one "eval" line in the log."""
    cfg, dist, model = state.cfg, state.dist, state.model
    test_bpd = evaluate(model, state.test_set, cfg.n_bins, cfg.eval_batch, cfg.seed, dist, state.test_labels)
    if not math.isfinite(test_bpd):
        _diverge(state, f"the held-out bits/dim is {test_bpd} at step {state.step}")
    state.test_bpd = test_bpd
    classes = {}
    if state.test_labels is not None:
        state.test_accuracy = classification_accuracy(model, state.test_set, state.test_labels, cfg.n_bins,
                                                      cfg.eval_batch, dist.device)
        classes = dict(test_accuracy=state.test_accuracy)
    in_sync = parameters_agree(model, dist)
    y = None if state.y_sample is None else state.y_sample.to(dist.device)
    images, why = guard.decode(model, [z.to(dist.device) for z in state.z_sample], y) if dist.main else (None, None)
    why = broadcast_object(why, dist)
    if why:
        _diverge(state, f"sampling at step {state.step}: {why}")
    state.checked_step = state.step
    if dist.main:
        state.sample = str(state.out / "samples" / f"step_{state.step:08d}.png")
        nrow = None if y is None else y.shape[0] // cfg.n_classes  # a row per class
        save_image_grid(images, state.sample, cfg.n_bins, nrow=nrow, zoom=cfg.zoom)
    state.log.write(event="eval", step=state.step, test_bpd=state.test_bpd, **classes, sample=state.sample,
                    ranks_in_sync=in_sync)


def save(state: RunState) -> None:
    """Check the weights are sound (unless an evaluation at this step did), then rank 0 writes a checkpoint of
    the run (atomically, keeping the newest ``keep`` of this run) and logs it."""
    if state.checked_step != state.step:
        why = _unsound(state)
        if why:
            _diverge(state, f"the weights at step {state.step} are unfit to keep: {why}")
        state.checked_step = state.step
    tensors = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}
    _write_checkpoint(state, tensors, _resumable_extra(state))


def _resumable_extra(state: RunState) -> dict:
    """What a checkpoint holds besides the weights and the optimizer: step, counters, RNGs, data order."""
    return {"step": state.step, "elapsed": state.elapsed, "skipped": state.skipped, "test_bpd": state.test_bpd,
            "test_accuracy": state.test_accuracy, "window": list(state.window),
            "rng": ckpt_io.capture_rng(), "data": state.data.state_dict(state.step + 1)}


def _write_checkpoint(state: RunState, tensors: dict, extra: dict) -> None:
    state.saved_step = extra["step"]
    if not state.dist.main:
        return
    payload = {**tensors, **{k: v for k, v in extra.items() if k != "step"},
               "config": dataclasses.asdict(state.cfg), "run_id": state.run_id, "dataset": state.dataset}
    state.checkpoint = str(ckpt_io.save_checkpoint(state.out, extra["step"], payload, state.cfg.keep))
    state.log.write(event="checkpoint", step=extra["step"], path=state.checkpoint)


def _unsound(state: RunState) -> str | None:
    """Why the current weights are unfit to keep (:func:`guard.unsound` on one batch of held-out images and
    a few sample latents), or None; the same answer on every rank."""
    cfg, dist = state.cfg, state.dist
    labels = None if state.test_labels is None else state.test_labels[:cfg.batch]
    bpd = evaluate(state.model, state.test_set.head(cfg.batch), cfg.n_bins, cfg.eval_batch, cfg.seed, dist, labels)
    if not math.isfinite(bpd):
        return f"the held-out bits/dim is {bpd}"
    y = None if state.y_sample is None else state.y_sample[:4].to(dist.device)
    _, why = guard.decode(state.model, [z[:4].to(dist.device) for z in state.z_sample], y)
    return broadcast_object(why, dist)


def _diverge(state: RunState, reason: str, hint: str = "try a lower --lr or a longer --warmup"):
    """Stop the run: keep the newest state whose training loss was finite (if sound and newer than the last
    checkpoint), log it, and raise a one-line TrainingError naming the checkpoint to resume from."""
    state.data.close()
    good = state.last_good
    if good.step is not None and good.step > state.saved_step:
        state.model.load_state_dict(good.tensors["model"])
        state.checked_step = -1
        if _unsound(state) is None:
            _write_checkpoint(state, good.tensors, good.extra)
    kept = state.checkpoint or state.resumed_from
    state.log.write(event="stop", step=state.step, reason=reason, checkpoint=kept)
    raise TrainingError(f"{reason} (last checkpoint: {kept or 'none'}); {hint}")


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def train(options: dict) -> dict:
    """Run (or resume, ``options["resume"]``) a training run; -> summary dict. Options as TrainConfig's fields."""
    options = dict(options)
    resume, new_run = (bool(options.pop(flag, False)) for flag in ("resume", "new_run"))
    dist = setup_distributed(options.get("device"))
    lock = runfolder.RunLock(Path(options.get("out") or TrainConfig.out))
    summary = None
    try:
        summary = run(start_or_resume(options, resume, dist, new_run, lock))
        return summary
    finally:
        lock.release(failed=summary is None)
        teardown(dist, finished=summary is not None)


def run(state: RunState) -> dict:
    """Train from ``state.step`` to ``cfg.steps``, evaluating and saving on schedule and at the end -> summary."""
    cfg = state.cfg
    if state.resumed_from and state.step >= cfg.steps:
        return _summary(state, state.elapsed)
    bar = progress(cfg.steps, min(state.step, cfg.steps), state.dist.main and cfg.progress)
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
    state.data.close()
    if last_eval != state.step or state.test_bpd is None:
        evaluate_and_sample(state)
    if last_ckpt != state.step:
        save(state)
    elapsed = time.perf_counter() - state.started
    state.log.write(event="done", step=state.step, test_bpd=state.test_bpd, elapsed_s=round(elapsed, 3),
                    skipped_total=state.skipped)
    return _summary(state, elapsed)


def _summary(state: RunState, elapsed: float) -> dict:
    return {"test_bpd": state.test_bpd, "sample": state.sample, "checkpoint": state.checkpoint or state.resumed_from,
            "test_accuracy": state.test_accuracy, "skipped": state.skipped, "step": state.step,
            "elapsed_s": elapsed, "config": dataclasses.asdict(state.cfg), "rank": state.dist.rank,
            "world_size": state.dist.world}
