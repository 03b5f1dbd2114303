"""The training data path: a resumable, rank-sharding batch sampler, a DataLoader over a split, and the
step's batch moved to the device and dequantised there.

Batch k (k = 0, 1, ...; batch 0 initialises ActNorm, step t trains on batch t) of a split of n images at
global batch B: with m = n // B batches per epoch, epoch e = k // m takes the permutation P_e = randperm(n)
from a generator seeded H(seed, "order", e), and the global batch is P_e[(k mod m) B : (k mod m + 1) B] (an
epoch's last incomplete batch is dropped); rank r of W reads the contiguous share [r B/W, (r + 1) B/W) of it.
The dequantisation noise u ~ U[0, 1) of batch k is drawn on the device for the whole global batch from a
generator seeded H(seed, "noise", k), each rank keeping its share, so the run does not depend on W.
Everything is a function of k: the sampler's state is the next batch's number (kept in the checkpoint with
its epoch and position), so a resume - with any number of workers, in any number of processes - reads and
draws exactly what an uninterrupted run would have. H is the first 8 bytes of a SHA-256.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys

import torch

from .distributed import all_gather_objects
from .errors import CheckpointError, InputError


def derive_seed(seed: int, purpose: str, k: int) -> int:
    """H(seed, purpose, k): a 63-bit seed, independent across purposes and k."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StepBatches(torch.utils.data.Sampler):
    """The endless stream of this rank's shares of global batches start, start + 1, ... (see the module)."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if n < batch:
            raise InputError(f"the training split has {n} images, fewer than --batch {batch}")
        self.n, self.batch, self.seed, self.rank, self.world, self.start = n, batch, seed, rank, world, start
        self.per_epoch = n // batch
        self._epoch, self._perm = -1, None

    def global_batch(self, k: int) -> torch.Tensor:
        """Indices (B,) of global batch k."""
        epoch, position = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[position * self.batch:(position + 1) * self.batch]

    def share(self, k: int) -> torch.Tensor:
        """This rank's contiguous 1/world of global batch k."""
        per = self.batch // self.world
        return self.global_batch(k)[self.rank * per:(self.rank + 1) * per]

    def __iter__(self):
        for k in itertools.count(self.start):
            yield self.share(k).tolist()

    def state_dict(self, next_batch: int) -> dict:
        epoch, position = divmod(next_batch, self.per_epoch)
        return {"next_batch": next_batch, "epoch": epoch, "position": position, "seed": self.seed, "n": self.n,
                "batch": self.batch}

    def check_state(self, state: dict, where: str) -> int:
        """The next batch's number from a checkpoint's data state, refusing one of another data order."""
        if "next_batch" not in state:
            raise CheckpointError(f"{where}: written by an older fastglow whose data order this one cannot "
                                  "continue; start a new run (another --out)")
        if state["n"] != self.n:
            raise InputError(f"{where}: the checkpoint's data order covers {state['n']} images, the training "
                             f"split has {self.n}: the data set changed since the checkpoint was written")
        if (state["batch"], state["seed"]) != (self.batch, self.seed):
            raise InputError(f"{where}: the checkpoint's data order has batch {state['batch']} and seed "
                             f"{state['seed']}, not {self.batch} and {self.seed}")
        return int(state["next_batch"])


def default_workers(world: int) -> int:
    """Loader processes per training process: the cores this process may use, shared by the ``world``
    processes of the machine, less one for the training process itself; at least 1, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, world) - 1))


def make_loader(split, sampler: StepBatches, workers: int, pin: bool):
    """A DataLoader reading ``sampler``'s batches of ``split`` in ``workers`` processes (0: in this one); each
    item is (position, levels, reason), so a batch is (positions, levels (b, C, S, S), reasons). The workers'
    seeds come from a generator of its own: the global RNGs stay untouched (nothing in a worker draws)."""
    seeds = torch.Generator().manual_seed(derive_seed(sampler.seed, "workers", sampler.start))
    from .runfolder import close_inherited_locks

    return torch.utils.data.DataLoader(split, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                                       prefetch_factor=4 if workers else None, generator=seeds,
                                       worker_init_fn=close_inherited_locks)


def fill_bad(levels: torch.Tensor, reasons: list[str]) -> tuple[torch.Tensor, list[int]]:
    """A batch with its unreadable images replaced by the next sound image of the same batch (cyclically), so
    every shape stays fixed -> (levels, positions of the bad ones); all bad: an InputError."""
    bad = [i for i, r in enumerate(reasons) if r]
    if not bad:
        return levels, bad
    sound = [i for i, r in enumerate(reasons) if not r]
    if not sound:
        raise InputError(f"every image of a batch is unreadable ({reasons[0]})")
    levels = levels.clone()
    for i in bad:
        levels[i] = levels[next((j for j in sound if j > i), sound[0])]
    return levels, bad


def device_batch(levels: torch.Tensor, n_bins: int, noise_gen: torch.Generator, seed: int, k: int,
                 global_batch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's share of batch k in model space, x = (level + u) / n_bins - 1/2: the levels copied to the
    noise generator's device (non-blocking from pinned memory), the global batch's noise drawn there."""
    device = noise_gen.device
    levels = levels.to(device, non_blocking=True)
    noise_gen.manual_seed(derive_seed(seed, "noise", k))
    noise = torch.rand((global_batch, *levels.shape[1:]), generator=noise_gen, device=device)
    per = global_batch // world
    return (levels.float() + noise[rank * per:rank * per + levels.shape[0]]) / n_bins - 0.5


class TrainData:
    """One process's training batches: global batch 0 whole (ActNorm's data-dependent init), then its share of
    batch t at step t from a DataLoader started at the step a run starts or resumes from; unreadable images are
    filled in from their batch (:func:`fill_bad`) and remembered (positions in the split)."""

    def __init__(self, split, labels: torch.Tensor | None, cfg, dist):
        self.split, self.labels, self.cfg, self.dist = split, labels, cfg, dist
        self.sampler = StepBatches(len(split), cfg.batch, cfg.seed, dist.rank, dist.world)
        self.noise_gen = torch.Generator(device=dist.device)
        in_memory = getattr(split.images, "in_memory", False)
        self.workers = cfg.workers if cfg.workers is not None else 0 if in_memory else default_workers(dist.world)
        self.loader = None
        self.bad: set[int] = set()

    def first_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole global batch 0 on this process's device: (x, labels or None)."""
        idx = self.sampler.global_batch(0)
        levels, _ = fill_bad(*self.split.read(idx))
        x = device_batch(levels, self.cfg.n_bins, self.noise_gen, self.cfg.seed, 0, self.cfg.batch)
        return x, None if self.labels is None else self.labels[idx].to(self.dist.device)

    def batch(self, k: int):
        """This process's share of batch k (the batch after the previous call's) -> (x, labels or None,
        [(position, reason)] of the unreadable images met)."""
        if self.loader is None:
            self.sampler.start = k
            self.loader = iter(make_loader(self.split, self.sampler, self.workers,
                                           pin=self.dist.device.type == "cuda"))
        positions, levels, reasons = next(self.loader)
        levels, bad = fill_bad(levels, list(reasons))
        x = device_batch(levels, self.cfg.n_bins, self.noise_gen, self.cfg.seed, k, self.cfg.batch,
                         self.dist.rank, self.dist.world)
        y = None if self.labels is None else self.labels[positions].to(self.dist.device, non_blocking=True)
        return x, y, [(int(positions[i]), reasons[i]) for i in bad]

    def record_bad(self, bad: list[tuple[int, str]], step: int, log) -> str | None:
        """Log the unreadable images of step ``step``'s global batch (every rank's ``bad``, gathered) in
        ``log``, warn once per image -> why the run must stop (more than ``max_bad_images`` of the training
        split unreadable), or None."""
        found = [item for part in all_gather_objects(bad, self.dist) for item in part]
        if self.dist.main:
            for j, why in found:
                if j not in self.bad:
                    print(f"fastglow: warning: skipped an unreadable image: {why}", file=sys.stderr)
        self.bad.update(j for j, _ in found)
        total, n = len(self.bad), len(self.split)
        log.write(event="bad_images", step=step, files=[self.split.describe(j) for j, _ in found],
                  reasons=[why for _, why in found], bad_images_total=total)
        if total > self.cfg.max_bad_images * n:
            return (f"{total} of the {n} training images are unreadable, more than --max-bad-images "
                    f"{self.cfg.max_bad_images:g} of them (the latest: {found[-1][1]})")
        return None

    def close(self) -> None:
        """Stop the loader's worker processes."""
        self.loader = None

    def state_dict(self, next_batch: int) -> dict:
        return {**self.sampler.state_dict(next_batch),
                "bad_images": torch.tensor(sorted(self.bad), dtype=torch.int64)}

    def load_state_dict(self, state: dict, where: str) -> int:
        next_batch = self.sampler.check_state(state, where)
        self.bad = set(state.get("bad_images", torch.zeros(0, dtype=torch.int64)).tolist())
        return next_batch
