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

A run is a :class:`fastglow.app.runstate.RunState` (setup, progress, guard) built by :func:`start_or_resume`;
:func:`run` holds the schedule: :func:`train_step` every step (the pure step
:func:`fastglow.app.objective.gradient_step`, judged by the run's :class:`fastglow.app.guard.Guard`), a log line
every ``log_every`` steps, :func:`evaluate_and_sample` and :func:`save` every ``eval_every`` / ``ckpt_every``
steps and at the end; :func:`train` runs the whole of it.

Only sound weights are kept (:mod:`fastglow.app.guard`): a checkpoint is written after a probe (held-out loss
finite, decoding finite and invertible) or an evaluation at the same step passed; a held-out loss, sample grid
or training step that fails, or ``max_bad_steps`` skips in a row, stop the run with one line after writing the
newest state whose training loss was finite (if it is sound and newer than the last checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import CudaGraphStep
from . import checkpoint as ckpt_io
from . import runfolder
from .classes import classification_accuracy
from .config import TrainConfig
from .data import save_image_grid
from .distributed import broadcast_object, parameters_agree, setup_distributed, teardown
from .errors import TrainingError, one_line
from .guard import decode
from .objective import StepResult, evaluate, gradient_step, learning_rate, training_loss
from .progress import progress as progress_bar
from .runstate import RunState, start_or_resume


# ----------------------------------------------------------------------------------------------
# A step and what it tells the log
# ----------------------------------------------------------------------------------------------
def train_step(state: RunState) -> tuple[float, float]:
    """One step on the next global batch: the pure step (:func:`gradient_step`), then the guard's judgement
    (the optimizer's update applied, or skipped on every rank if the loss or the gradient is non-finite) ->
    (learning rate, gradient norm); the run stops on singular weights, too many skipped steps in a row or too
    many unreadable images."""
    setup, progress, guard = state.setup, state.progress, state.guard
    before = _resumable_extra(state)  # the state these weights belong to, should their loss prove finite
    x, y, bad = setup.data.batch(progress.step + 1)
    progress.step += 1
    lr = learning_rate(setup.cfg, progress.step)
    try:
        graph = _graph(state, x)  # --cuda-graph: captured here at the first step (its own warm-up, grads None)
        result = gradient_step(setup.net, setup.optimizer, x, y, lr=lr, n_bins=setup.cfg.n_bins, dist=setup.dist,
                               loss_fn=training_loss, graph=graph, counts=(len(bad),))
    except torch.linalg.LinAlgError as err:  # the reversible backward inverts the 1x1 convolutions
        _diverge(state, f"the model stopped being invertible at step {progress.step} ({one_line(err)})")
    if why := guard.singular(result.log_scale):
        _diverge(state, f"a 1x1 convolution became singular by step {progress.step} ({why})")
    if guard.accept(result.finite, setup.model, setup.optimizer, before):
        setup.optimizer.step()
        progress.window.append(result.loss)
    else:
        _skip_step(state, result)
    if result.counts[0] and (why := setup.data.record_bad(bad, progress.step, setup.log)):
        _diverge(state, why, hint="repair them, then --resume (or resume with a higher --max-bad-images)")
    progress.elapsed = time.perf_counter() - progress.started
    return lr, result.grad_norm


def _graph(state: RunState, x: torch.Tensor) -> CudaGraphStep | None:
    """``--cuda-graph``: the step's forward and backward, captured on the first batch it sees (eager on a
    CPU); else None."""
    setup = state.setup
    if setup.cfg.cuda_graph and setup.graph_step is None:
        setup.graph_step = CudaGraphStep(setup.model, None, x, n_bins=setup.cfg.n_bins)
    return setup.graph_step


def _skip_step(state: RunState, result: StepResult) -> None:
    """Drop a non-finite step's gradients and log it; stop the run after ``max_bad_steps`` such steps in a row."""
    guard, step = state.guard, state.progress.step
    state.setup.optimizer.zero_grad(set_to_none=True)
    state.setup.log.write(event="skip", step=step, train_bpd=str(result.loss), grad_norm=str(result.grad_norm),
                          consecutive=guard.bad_run, skipped_total=guard.skipped)
    if guard.exhausted:
        _diverge(state, f"the loss or its gradient was non-finite for {guard.bad_run} consecutive steps "
                        f"({step - guard.bad_run + 1}..{step}); stopped without updating the weights with them")


def _show(state: RunState, bar, lr: float) -> None:
    """Advance the progress bar by a step: the newest training loss, the learning rate, ... on its line."""
    setup, progress = state.setup, state.progress
    bar.update(1)
    if progress.window:
        rec = _reconstruction(state)
        bar.set_postfix_str(f"bpd={progress.window[-1]:.3f} lr={lr:.2e}"
                            + (f" rec={max(rec['reconstruction_error'], key=float):.1e}" if rec else "")
                            + (f" test={progress.test_bpd:.3f}" if progress.test_bpd else "")
                            + (f" bad={len(setup.data.bad)}" if setup.data.bad else ""), refresh=False)


def _log_train(state: RunState, lr: float, grad_norm: float) -> None:
    """One "train" line: the mean bits/dim since the last (and, with reversible backprop, each level's relative
    reconstruction error of the step and the fallbacks)."""
    setup, progress = state.setup, state.progress
    setup.log.write(event="train", step=progress.step, train_bpd=float(np.mean(progress.window)), lr=lr,
                    grad_norm=grad_norm, elapsed_s=round(progress.elapsed, 3), skipped_total=state.guard.skipped,
                    bad_images_total=len(setup.data.bad), **_reconstruction(state))
    progress.window = []


def _reconstruction(state: RunState) -> dict:
    """The latest reversible backward's per-level reconstruction errors (non-finite ones as strings) and
    fallback count; {} without reversible backprop."""
    setup = state.setup
    if not setup.cfg.reversible:
        return {}
    errors = [e if np.isfinite(e) else str(e) for e in setup.model.reconstruction_error().tolist()]
    return dict(reconstruction_error=errors, reconstruction_fallbacks=setup.model.reconstruction_fallbacks)


# ----------------------------------------------------------------------------------------------
# Evaluations, checkpoints, divergence
# ----------------------------------------------------------------------------------------------
def evaluate_and_sample(state: RunState) -> None:
    """Held-out bits/dim (every rank), a sample grid (rank 0) and one "eval" line in the log."""
    setup, progress = state.setup, state.progress
    cfg, dist, model = setup.cfg, setup.dist, setup.model
    test_bpd = evaluate(model, setup.test_set, cfg.n_bins, cfg.eval_batch, cfg.seed, dist, setup.test_labels)
    if not math.isfinite(test_bpd):
        _diverge(state, f"the held-out bits/dim is {test_bpd} at step {progress.step}")
    progress.test_bpd = test_bpd
    classes = {}
    if setup.test_labels is not None:
        progress.test_accuracy = classification_accuracy(model, setup.test_set, setup.test_labels, cfg.n_bins,
                                                          cfg.eval_batch, dist.device)
        classes = dict(test_accuracy=progress.test_accuracy)
    in_sync = parameters_agree(model, dist)
    y = None if setup.y_sample is None else setup.y_sample.to(dist.device)
    images, why = decode(model, [z.to(dist.device) for z in setup.z_sample], y) if dist.main else (None, None)
    why = broadcast_object(why, dist)
    if why:
        _diverge(state, f"sampling at step {progress.step}: {why}")
    progress.checked_step = progress.step
    if dist.main:
        progress.sample = str(setup.out / "samples" / f"step_{progress.step:08d}.png")
        nrow = None if y is None else y.shape[0] // cfg.n_classes  # a row per class
        save_image_grid(images, progress.sample, cfg.n_bins, nrow=nrow, zoom=cfg.zoom)
    setup.log.write(event="eval", step=progress.step, test_bpd=progress.test_bpd, **classes,
                    sample=progress.sample, ranks_in_sync=in_sync)


def save(state: RunState) -> None:
    """Check the weights are sound (unless an evaluation at this step did), then rank 0 writes a checkpoint of
    the run (atomically, keeping the newest ``keep`` of this run) and logs it."""
    progress = state.progress
    if progress.checked_step != progress.step:
        why = _unsound(state)
        if why:
            _diverge(state, f"the weights at step {progress.step} are unfit to keep: {why}")
        progress.checked_step = progress.step
    tensors = {"model": state.setup.model.state_dict(), "optimizer": state.setup.optimizer.state_dict()}
    _write_checkpoint(state, tensors, _resumable_extra(state))


def _resumable_extra(state: RunState) -> dict:
    """What a checkpoint holds besides the weights and the optimizer: step, counters, RNGs, data order."""
    p = state.progress
    return {"step": p.step, "elapsed": p.elapsed, "skipped": state.guard.skipped, "test_bpd": p.test_bpd,
            "test_accuracy": p.test_accuracy, "window": list(p.window),
            "rng": ckpt_io.capture_rng(), "data": state.setup.data.state_dict(p.step + 1)}


def _write_checkpoint(state: RunState, tensors: dict, extra: dict) -> None:
    setup, progress = state.setup, state.progress
    progress.saved_step = extra["step"]
    if not setup.dist.main:
        return
    payload = {**tensors, **{k: v for k, v in extra.items() if k != "step"},
               "config": dataclasses.asdict(setup.cfg), "run_id": setup.run_id, "dataset": setup.dataset}
    progress.checkpoint = str(ckpt_io.save_checkpoint(setup.out, extra["step"], payload, setup.cfg.keep))
    setup.log.write(event="checkpoint", step=extra["step"], path=progress.checkpoint)


def _unsound(state: RunState) -> str | None:
    """Why the current weights are unfit to keep (a non-finite loss on one batch of held-out images, or a few
    sample latents that do not decode), or None; the same answer on every rank."""
    setup = state.setup
    cfg, dist = setup.cfg, setup.dist
    labels = None if setup.test_labels is None else setup.test_labels[:cfg.batch]
    bpd = evaluate(setup.model, setup.test_set.head(cfg.batch), cfg.n_bins, cfg.eval_batch, cfg.seed, dist, labels)
    if not math.isfinite(bpd):
        return f"the held-out bits/dim is {bpd}"
    y = None if setup.y_sample is None else setup.y_sample[:4].to(dist.device)
    _, why = decode(setup.model, [z[:4].to(dist.device) for z in setup.z_sample], y)
    return broadcast_object(why, dist)


def _diverge(state: RunState, reason: str, hint: str = "try a lower --lr or a longer --warmup"):
    """Stop the run: keep the newest state whose training loss was finite (if sound and newer than the last
    checkpoint), log it, and raise a one-line TrainingError naming the checkpoint to resume from."""
    setup, progress = state.setup, state.progress
    setup.data.close()
    good = state.guard.rollback(setup.model, progress.saved_step)
    if good is not None:
        progress.checked_step = -1
        if _unsound(state) is None:
            _write_checkpoint(state, good.tensors, good.extra)
    kept = progress.checkpoint or setup.resumed_from
    setup.log.write(event="stop", step=progress.step, reason=reason, checkpoint=kept)
    raise TrainingError(f"{reason} (last checkpoint: {kept or 'none'}); {hint}")


# ----------------------------------------------------------------------------------------------
# The run and its schedule
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
    """Train from the state's step to ``cfg.steps``: a log line every ``log_every`` steps, an evaluation and a
    sample grid every ``eval_every``, a checkpoint every ``ckpt_every``, both at the end too -> summary."""
    setup, progress = state.setup, state.progress
    cfg = setup.cfg
    if setup.resumed_from and progress.step >= cfg.steps:
        return _summary(state, progress.elapsed)
    bar = progress_bar(cfg.steps, min(progress.step, cfg.steps), setup.dist.main and cfg.progress)
    progress.started = time.perf_counter() - progress.elapsed
    last_eval = last_ckpt = progress.step
    while progress.step < cfg.steps:
        lr, grad_norm = train_step(state)
        _show(state, bar, lr)
        if progress.step % cfg.log_every == 0 and progress.window:
            _log_train(state, lr, grad_norm)
        if cfg.eval_every and progress.step % cfg.eval_every == 0:
            evaluate_and_sample(state)
            last_eval = progress.step
        if cfg.ckpt_every and progress.step % cfg.ckpt_every == 0:
            save(state)
            last_ckpt = progress.step
    bar.close()
    setup.data.close()
    if last_eval != progress.step or progress.test_bpd is None:
        evaluate_and_sample(state)
    if last_ckpt != progress.step:
        save(state)
    elapsed = time.perf_counter() - progress.started
    setup.log.write(event="done", step=progress.step, test_bpd=progress.test_bpd, elapsed_s=round(elapsed, 3),
                    skipped_total=state.guard.skipped)
    return _summary(state, elapsed)


def _summary(state: RunState, elapsed: float) -> dict:
    setup, progress = state.setup, state.progress
    return {"test_bpd": progress.test_bpd, "sample": progress.sample,
            "checkpoint": progress.checkpoint or setup.resumed_from, "test_accuracy": progress.test_accuracy,
            "skipped": state.guard.skipped, "step": progress.step, "elapsed_s": elapsed,
            "config": dataclasses.asdict(setup.cfg), "rank": setup.dist.rank, "world_size": setup.dist.world}
