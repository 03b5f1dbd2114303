"""Helpers for tests and benchmarks: models at random non-trivial weights and error measures (:mod:`.models`),
host-sync detection, the `fastglow` command and data-set fixtures; and (:mod:`.workloads`, importable from here)
kernel operands, a model of every implementation compared, one training step and memory probes."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .models import coupling_activity, initialized_model, max_rel_error, models_on_one_state, perturb_, rel_error

_WORKLOADS = ("kernel_operands", "ModelShape", "IMPLEMENTATIONS", "CheckpointedFlow", "load_glow_module", "build_model",
              "training_step", "MemoryProbe", "step_memory", "in_fresh_process", "MEMORY_SHAPE", "measure_step_memory",
              "level_tensor_mb")


def __getattr__(name: str):
    """The names of :mod:`.workloads`, imported on first use (so ``python -m fastglow.testing.workloads`` finds
    that module not yet imported)."""
    if name in _WORKLOADS:
        from . import workloads
        return getattr(workloads, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# aten ops that make the host wait for the device on CUDA: a value read back (.item(), bool(t), torch.equal),
# or an output whose size depends on the values (nonzero, masked_select, unique, repeat_interleave).
HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
                           "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"})


class HostSyncDetector(TorchDispatchMode):
    """Inside ``with HostSyncDetector() as d:`` every host-syncing aten op (:data:`HOST_SYNC_OPS`) is recorded
    in ``d.syncs`` (op names, in order). Works on any device, so a CPU test can show that a training step would
    never stall a GPU (and so can be captured in a CUDA graph)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_SYNC_OPS:
            self.syncs.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------------
# The `fastglow` command in a subprocess, as a user runs it
# ----------------------------------------------------------------------------------------------
def cli_command() -> list[str]:
    """The installed ``fastglow`` console script (``python -m fastglow`` where there is none)."""
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("fastglow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fastglow"]


def cli_env(extra: dict | None = None) -> dict:
    """This process's environment with one thread, unbuffered output and no torchrun variables."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_cli(*args, env: dict | None = None, timeout: float = 300):
    """``fastglow ARGS`` in a subprocess, as a user runs it -> subprocess.CompletedProcess (text output)."""
    import subprocess

    return subprocess.run(cli_command() + [str(a) for a in args], env=env or cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(run, *names, code: int = 2) -> str:
    """``run`` failed with exit status ``code`` and exactly one line on stderr, no traceback, naming ``names``."""
    err = run.stderr.strip()
    assert run.returncode == code, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for name in names:
        assert str(name) in err, (name, err)
    return err


def folder_state(root) -> dict:
    """{relative path: file bytes} of every file under ``root`` (to show a command left a folder intact)."""
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Data sets and run folders
# ----------------------------------------------------------------------------------------------
def write_image_folder(root, n: int, size: int = 8, mode: str = "RGB", seed: int = 0, ext: str = "png",
                       classes: int = 0) -> list:
    """``n`` random images of ``size`` x ``size`` under ``root`` (in ``classes`` subfolders c0, c1, ... when
    given) -> their paths in the data set's (sorted) order."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = Path(root) / (f"c{i % classes}" if classes else "")
        folder.mkdir(parents=True, exist_ok=True)
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        path = folder / f"{i:05d}.{ext}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return sorted(paths)


def truncate_image(path, keep: int = 60) -> None:
    """Cut an image file after ``keep`` bytes: its header still opens, its pixels no longer decode."""
    from pathlib import Path

    Path(path).write_bytes(Path(path).read_bytes()[:keep])


def metrics_events(out, kind: str | None = None) -> list[dict]:
    """The records of ``out/metrics.jsonl`` (of one ``event`` kind if given)."""
    import json
    from pathlib import Path

    lines = (json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines())
    return [e for e in lines if kind is None or e["event"] == kind]


def write_lmdb(path, n: int, sizes=(8,), seed: int = 0) -> None:
    """An LMDB in rosinality's layout (stylegan2-pytorch prepare_data.py): for each size S and image i, key
    f"{S}-{i:05d}" -> JPEG bytes of an S x S RGB image; key "length" -> n."""
    import io

    import lmdb
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    with lmdb.open(str(path), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for i in range(n):
            for size in sizes:
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="jpeg")
                txn.put(f"{size}-{str(i).zfill(5)}".encode(), buffer.getvalue())
        txn.put(b"length", str(n).encode())


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read off /proc; Linux)."""
    import os

    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
