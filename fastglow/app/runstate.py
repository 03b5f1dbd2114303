"""A training run's state in three parts, and how a run starts or resumes.

:class:`RunSetup` is what the run is made of, fixed once it starts (config, processes, data, model, optimizer,
metrics log, sample-grid latents); :class:`Progress` the counters and results that move as it trains (step,
training time, the window of losses since the last log line, the newest evaluation, sample grid and
checkpoint); :class:`fastglow.app.guard.Guard` the skipped steps and the last good state. A checkpoint holds
what a resume needs of them (:func:`fastglow.app.loop.save`); :func:`start_or_resume` builds a
:class:`RunState` from the options and, when resuming, the newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

from .. import CudaGraphStep, Glow
from . import checkpoint as ckpt_io
from . import fingerprint, runfolder
from .classes import run_labels, sample_grid_latents
from .config import TrainConfig, resolve_config
from .data import load_split
from .datasets import Split
from .distributed import Dist, broadcast_object, pick_backend, wrap_model
from .errors import CheckpointError, InputError
from .guard import Guard
from .objective import build_model
from .sampler import TrainData


@dataclasses.dataclass
class RunSetup:
    """What a run is made of, set up at its start (or resume): the config, processes, data, model and optimizer
    (the DDP wrapper, the run id, the sample latents and the CUDA graph are filled in once, then kept)."""
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
    y_sample: torch.Tensor | None = None  # classes of the sample grid's images: one row per class
    dataset: dict = dataclasses.field(default_factory=dict)  # held-out keys, fingerprint (app/fingerprint.py)
    train_labels: torch.Tensor | None = None  # int64 class ids (class-conditional runs)
    test_labels: torch.Tensor | None = None
    run_id: str | None = None  # in every checkpoint: the rotation deletes only this run's checkpoints
    resumed_from: str | None = None
    graph_step: CudaGraphStep | None = None  # --cuda-graph: forward and backward captured at the first step

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


@dataclasses.dataclass
class Progress:
    """A run's counters and newest results."""
    step: int = 0
    elapsed: float = 0.0  # training seconds so far, over every resume
    started: float = 0.0  # time.perf_counter() at which this process's elapsed would have been 0
    window: list[float] = dataclasses.field(default_factory=list)  # train bits/dim since the last log line
    test_bpd: float | None = None
    test_accuracy: float | None = None  # of model.classify on the held-out split (class-conditional runs)
    sample: str | None = None  # the newest sample grid
    checkpoint: str | None = None  # the newest checkpoint this process wrote
    saved_step: int = -1  # the step of the newest checkpoint written or resumed from (every rank)
    checked_step: int = -1  # the newest step whose weights passed an evaluation or a soundness probe


@dataclasses.dataclass
class RunState:
    """A run: its setup, its progress and its guard."""
    setup: RunSetup
    progress: Progress
    guard: Guard

    @property
    def step(self) -> int:
        return self.progress.step


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
    state = RunState(_new_setup(cfg, dist), Progress(), Guard(cfg.max_bad_steps))
    # first: a grid too large is refused before a resume
    state.setup.z_sample, state.setup.y_sample = sample_grid_latents(cfg)
    if found:
        _restore(state, *found)
    else:
        _initialise(state.setup)
    state.setup.net = wrap_model(state.setup.model, dist)
    return state


def _new_setup(cfg: TrainConfig, dist: Dist) -> RunSetup:
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
    return RunSetup(cfg, dist, train_set, test_set, model, optimizer, data, log, dataset=dataset,
                    train_labels=train_labels, test_labels=test_labels)


def _restore(state: RunState, path: str, ckpt: dict) -> None:
    """Load a training checkpoint into ``state``: weights, optimizer, data order, every RNG, counters."""
    setup, progress = state.setup, state.progress
    fingerprint.check_resume(ckpt.get("dataset"), setup.dataset, setup.cfg.data, path)
    try:
        setup.model.load_state_dict(ckpt["model"])
        setup.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: does not fit the run's model ({err})") from None
    setup.data.load_state_dict(ckpt["data"], path)
    ckpt_io.restore_rng(ckpt["rng"])
    progress.step, progress.elapsed = ckpt["step"], ckpt.get("elapsed", 0.0)
    state.guard.skipped = ckpt.get("skipped", 0)
    setup.resumed_from, setup.run_id, progress.saved_step = path, ckpt.get("run_id"), progress.step
    progress.window = list(ckpt.get("window", []))
    progress.test_bpd, progress.test_accuracy = ckpt.get("test_bpd"), ckpt.get("test_accuracy")
    if progress.step >= setup.cfg.steps:  # a finished run: nothing to do, nothing written
        grid = setup.out / "samples" / f"step_{progress.step:08d}.png"
        progress.sample = str(grid) if grid.is_file() else None
        if setup.dist.main:
            print(f"the run finished at step {progress.step} ({path}): nothing to do (raise --steps to train on)",
                  file=sys.stderr)
        return
    setup.log.truncate_after(progress.step)
    setup.log.write(event="resume", step=progress.step, checkpoint=str(path))
    if setup.dist.main:
        print(f"resuming from {path} (step {progress.step})", file=sys.stderr)


def _initialise(setup: RunSetup) -> None:
    """A new run: ActNorm's data-dependent init on the whole first global batch, a fresh metrics log."""
    setup.run_id = broadcast_object(uuid.uuid4().hex, setup.dist)
    x, y = setup.data.first_batch()
    with torch.no_grad():
        setup.model(x, y)
    setup.log.write(event="start", step=0, config=dataclasses.asdict(setup.cfg), world_size=setup.dist.world,
                    n_train=len(setup.train_set), n_test=len(setup.test_set), run_id=setup.run_id,
                    workers=setup.data.workers)
