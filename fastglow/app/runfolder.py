"""A run folder (``--out``): one trainer at a time, and what a new start or a resume may do there.

Nothing here deletes a file. A trainer holds an exclusive ``flock`` on the folder itself (the kernel drops it
when the process ends, even on SIGKILL) and writes its PID to ``trainer.pid`` for the message of the next one.
Under torchrun only rank 0 takes it. What the folder holds decides how a run starts:

    no checkpoint, metrics.jsonl or sample grid          -> a new run (with or without --resume)
    a readable training checkpoint                      -> --resume continues from the newest one;
                                                           without --resume: refused
    unreadable checkpoints, none readable               -> refused with one line naming them; --new-run
                                                           first moves the earlier files (all of them) into
                                                           ``earlier-run-<UTC time>/``, then starts
    an earlier run's metrics or grids, no checkpoint    -> without --resume or --new-run: refused; with either
    (a run stopped before its first checkpoint)            the files move aside as above, and a new run starts
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import checkpoint as ckpt_io
from .distributed import Dist, broadcast_object
from .errors import InputError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no lock
    fcntl = None

PID_FILE = "trainer.pid"
_HELD: set[int] = set()  # descriptors of the locks this process holds
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


class RunLock:
    """An exclusive, non-blocking lock on a run folder, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, out: Path):
        self.out, self.fd, self.created = Path(out), None, False

    def acquire(self) -> None:
        """Create ``out`` if needed and lock it, or refuse naming the PID of the trainer that holds it."""
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out}: is a file; a run folder is a folder (choose another --out)")
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return
        fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{self.out}: another trainer is running in this folder (PID {self._holder()}); "
                             "wait for it to end, or choose another --out") from None
        self.fd = fd
        _HELD.add(fd)
        try:
            (self.out / PID_FILE).write_text(f"{os.getpid()}\n", encoding="utf-8")
        except OSError:
            pass  # the PID is only for the message above; the lock holds without it

    def _holder(self) -> str:
        try:
            return (self.out / PID_FILE).read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self, failed: bool = False) -> None:
        """Unlock; after a ``failed`` run, remove ``out`` again if this lock created it and it stayed empty."""
        if self.fd is None:
            return
        pid_file = self.out / PID_FILE
        if self._holder() == str(os.getpid()):
            pid_file.unlink(missing_ok=True)  # ours: we still hold the lock, nobody else can have written it
        _HELD.discard(self.fd)
        if failed and self.created:
            try:
                self.out.rmdir()  # only an empty folder: a refused run leaves no trace
            except OSError:
                pass
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None


def close_inherited_locks(*_) -> None:
    """In a forked child (a DataLoader worker): close its copies of the parent's lock descriptors, so that the
    lock ends with the trainer (a kill -9 included), not with the last of its workers."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


def earlier_files(out: Path) -> list[Path]:
    """The files of an earlier run in ``out``: checkpoints (readable or not), metrics.jsonl, sample grids."""
    files = [path for _, path in ckpt_io.list_checkpoints(out)]
    if (out / METRICS_FILE).is_file():
        files.append(out / METRICS_FILE)
    if (out / SAMPLES_DIR).is_dir():
        files += sorted((out / SAMPLES_DIR).glob("*.png"))
    return files


def prepare(out: Path, resume: bool, new_run: bool) -> tuple[Path, dict] | None:
    """Decide how a run starts in ``out`` (see the module docstring): -> (path, checkpoint) to resume from, or
    None for a new run (after --new-run has moved the earlier files aside). Refusals change nothing."""
    found, unreadable = ckpt_io.scan_checkpoints(out)
    if found and resume and not new_run:
        ckpt_io.warn_skipped(unreadable)
        return found
    if found:
        what = "--new-run would start another run over it" if new_run else "pass --resume to continue it"
        raise InputError(f"{out}: already holds checkpoints of a run ({found[0].name} is readable); {what}, "
                         "or choose another --out")
    earlier = earlier_files(out)
    if not earlier:
        if resume:
            print(f"no checkpoint in {out}: starting a new run", file=sys.stderr)
        return None
    nothing_to_lose = resume and not unreadable  # stopped before its first checkpoint: only logs and grids
    if not (new_run or nothing_to_lose):
        raise InputError(f"{out}: {_describe(out, unreadable, earlier)}; nothing was changed. Pass --new-run "
                         "to start a new run here (the earlier files move to earlier-run-<time>/), or choose "
                         "another --out")
    moved_to = move_aside(out)
    why = "no checkpoint to resume (the run stopped before its first one)" if nothing_to_lose else "--new-run"
    print(f"fastglow: {why}: the earlier run's files moved to {moved_to}; starting a new run", file=sys.stderr)
    return None


def _describe(out: Path, unreadable: list, earlier: list[Path]) -> str:
    if unreadable:
        names = [_name_in(out, path) for path, _ in unreadable]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"no checkpoint to resume: every one is unreadable ({shown})"
    shown = ", ".join(_name_in(out, p) for p in earlier[:3]) + (" ..." if len(earlier) > 3 else "")
    return f"holds an earlier run with no checkpoint to resume ({shown})"


def _name_in(out: Path, path: Path) -> str:
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path)


def move_aside(out: Path) -> Path:
    """Move checkpoints/, samples/ and metrics.jsonl of ``out`` into a new ``out/earlier-run-<UTC time>/``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, k = out / f"earlier-run-{stamp}", 1
    while target.exists():
        k += 1
        target = out / f"earlier-run-{stamp}-{k}"
    target.mkdir()
    for name in (ckpt_io.checkpoint_dir(out).name, SAMPLES_DIR, METRICS_FILE):
        if (out / name).exists():
            os.replace(out / name, target / name)
    return target


def find_checkpoint(out: Path, resume: bool, new_run: bool, lock: RunLock | None, dist: Dist):
    """(path, checkpoint) to resume from, or None for a new run: rank 0 takes ``lock`` and decides
    (:func:`prepare`); every rank then loads the same file, or raises the same one-line error."""
    found, error = None, None
    if dist.main:
        try:
            if lock is not None:
                lock.acquire()
            found = prepare(out, resume, new_run)
            ckpt_io.remove_temp_files(out)
        except (InputError, OSError) as err:  # e.g. --out is a file: every rank must hear of it
            error = str(err)
    path, error = broadcast_object((str(found[0]) if found else None, error), dist)
    if error:
        raise InputError(error)
    if found:
        return path, found[1]
    return (path, ckpt_io.load_training_checkpoint(path)) if path else None
