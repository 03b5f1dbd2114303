"""A run folder's files: checkpoints (atomic writes, the last N kept, resume from the newest readable one),
the metrics log and the RNG state (models loaded from checkpoints for inference: :mod:`fastglow.app.model_io`).

A training checkpoint is a dict readable with ``torch.load(f, weights_only=True)``::

    format   "fastglow-checkpoint"      version  1
    model    Glow.state_dict() with rosinality's keys (no "module." prefix): rosinality's code can
             ``model.load_state_dict(ckpt["model"])``
    optimizer, step, elapsed (training seconds so far), config (the run's TrainConfig as a dict)
    dataset  the held-out images' keys and the data's fingerprint (:mod:`fastglow.app.fingerprint`)
    rng      torch CPU, CUDA (all devices), numpy, python ``random``
    data     the data order's position (next batch, its epoch and position, seed, split size, batch) and the
             training images found unreadable (``bad_images``, positions in the split)

Written to ``<out>/checkpoints/step_<step>.pt`` as temp file in the same folder -> flush -> fsync -> rename
(``os.replace`` is atomic), then the folder is fsynced: a crash leaves the old file or the new one, never half
of one. Anything else in the folder (a ``.tmp`` left by a killed writer) is ignored and cleaned up.

Each checkpoint carries its run's ``run_id``; the rotation (keep the newest N) counts and deletes only readable
checkpoints of the run being written. A file of another run, or one that does not load, is never counted and
never deleted; one that sits where a new checkpoint must go is renamed aside (``<name>.set-aside-<k>``).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import random
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

FORMAT = "fastglow-checkpoint"
VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def checkpoint_dir(out) -> Path:
    return Path(out) / "checkpoints"


def atomic_save(obj, path) -> None:
    """torch.save to a temp file next to ``path``, flush + fsync, then os.replace onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(out) -> list[tuple[int, Path]]:
    """(step, path) of ``step_*.pt`` files under ``<out>/checkpoints``, newest first."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found, reverse=True)


def remove_temp_files(out) -> None:
    """Delete ``.tmp`` files a killed writer left behind (never a finished checkpoint)."""
    folder = checkpoint_dir(out)
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def save_checkpoint(out, step: int, payload: dict, keep: int) -> Path:
    """Write ``<out>/checkpoints/step_<step>.pt`` atomically, then delete all but the newest ``keep`` readable
    checkpoints of the same run (``payload["run_id"]``); other files are never deleted."""
    path = checkpoint_dir(out) / f"step_{step:08d}.pt"
    run_id = payload.get("run_id")
    if path.exists() and run_of(path) != run_id:
        _set_aside(path)
    atomic_save({"format": FORMAT, "version": VERSION, "step": step, **payload}, path)
    ours = [p for _, p in list_checkpoints(out) if p == path or run_of(p) == run_id]
    for old in ours[keep:]:
        old.unlink(missing_ok=True)
    return path


_UNREADABLE = object()


def run_of(path: Path):
    """The ``run_id`` of the training checkpoint at ``path`` (None if it has none), or a marker no run id equals
    if it does not load; read once per file version (memory-mapped: only the pickle is parsed)."""
    try:
        stat = path.stat()
    except OSError:
        return _UNREADABLE
    return _run_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _run_of(path: str, _size: int, _mtime_ns: int):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure: not a readable checkpoint
        return _UNREADABLE
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        return _UNREADABLE
    return ckpt.get("run_id")


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to the first free ``<name>.set-aside-<k>`` (never overwrite or delete a file)."""
    k = 1
    while (target := path.with_name(f"{path.name}.set-aside-{k}")).exists():
        k += 1
    os.replace(path, target)
    print(f"fastglow: warning: {path} is not a checkpoint of this run; renamed it to {target.name}",
          file=sys.stderr)
    return target


def load_file(path) -> dict:
    """torch.load(weights_only=True) onto the CPU; any failure -> CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, bad pickle, wrong format: all "corrupt"
        raise CheckpointError(f"{path}: {_unreadable_reason(err)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state_dict or a fastglow checkpoint")
    return obj


def _unreadable_reason(err: Exception) -> str:
    """Our own words for a failed torch.load (torch's own message may advise weights_only=False, which is
    unsafe for a file of unknown origin: unpickling arbitrary objects can run code)."""
    if isinstance(err, pickle.UnpicklingError):
        return ("not a fastglow/rosinality checkpoint: it is corrupt, or it holds pickled Python objects "
                "beyond tensors, which fastglow does not load")
    return "not a fastglow/rosinality checkpoint: the file is corrupt, truncated or not a PyTorch file"


def load_training_checkpoint(path) -> dict:
    ckpt = load_file(path)
    missing = [k for k in ("model", "optimizer", "step", "rng", "data", "config") if k not in ckpt]
    if ckpt.get("format") != FORMAT or missing:
        raise CheckpointError(f"{path}: not a fastglow training checkpoint (missing {missing or ['format']})")
    return ckpt


def warn_skipped(skipped: list[tuple[Path, CheckpointError]]) -> None:
    for _, err in skipped:
        print(f"fastglow: warning: skipping {err}", file=sys.stderr)


def scan_checkpoints(out) -> tuple[tuple[Path, dict] | None, list[tuple[Path, CheckpointError]]]:
    """(the newest checkpoint under ``out`` that loads as (path, checkpoint), or None; (path, error) of each
    newer one that does not), printing nothing."""
    skipped = []
    for _, path in list_checkpoints(out):
        try:
            return (path, load_training_checkpoint(path)), skipped
        except CheckpointError as err:
            skipped.append((path, err))
    return None, skipped


class MetricsLog:
    """JSON lines at ``<out>/metrics.jsonl`` (rank 0 only); on resume, lines after the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill, or bytes that are not a record
            if isinstance(record, dict) and _step_of(record) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def _step_of(record: dict) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else float("inf")


# ----------------------------------------------------------------------------------------------
# Random number generators
# ----------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """Every global RNG, as tensors/lists (loadable with weights_only=True); the data order and the
    dequantisation noise need none (:mod:`fastglow.app.sampler` derives them from the seed and the step)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
