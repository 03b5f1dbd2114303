"""A run folder's files: checkpoints (atomic writes, the last N kept, resume from the newest readable one),
the metrics log, and models loaded from checkpoints for inference.

A training checkpoint is a dict readable with ``torch.load(f, weights_only=True)``::

    format   "fastglow-checkpoint"      version  1
    model    Glow.state_dict() with rosinality's keys (no "module." prefix): rosinality's code can
             ``model.load_state_dict(ckpt["model"])``
    optimizer, step, elapsed (training seconds so far), config (the run's TrainConfig as a dict)
    rng      torch CPU, CUDA (all devices), numpy, python ``random`` and the data-order generator
    data     the data-order stream (current permutation and position)

Written to ``<out>/checkpoints/step_<step>.pt`` as temp file in the same folder -> flush -> fsync -> rename
(``os.replace`` is atomic), then the folder is fsynced: a crash leaves the old file or the new one, never half
of one. Anything else in the folder (a ``.tmp`` left by a killed writer) is ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import Glow
from .errors import CheckpointError, one_line

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
    """Write ``<out>/checkpoints/step_<step>.pt`` atomically, then delete all but the newest ``keep``."""
    path = checkpoint_dir(out) / f"step_{step:08d}.pt"
    atomic_save({"format": FORMAT, "version": VERSION, "step": step, **payload}, path)
    for _, old in list_checkpoints(out)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_file(path) -> dict:
    """torch.load(weights_only=True) onto the CPU; any failure -> CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, bad pickle, wrong format: all "corrupt"
        raise CheckpointError(f"{path}: not a readable checkpoint, the file is corrupt or truncated "
                              f"({one_line(err)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state_dict or a fastglow checkpoint")
    return obj


def load_training_checkpoint(path) -> dict:
    ckpt = load_file(path)
    missing = [k for k in ("model", "optimizer", "step", "rng", "data", "config") if k not in ckpt]
    if ckpt.get("format") != FORMAT or missing:
        raise CheckpointError(f"{path}: not a fastglow training checkpoint (missing {missing or ['format']})")
    return ckpt


def newest_valid_checkpoint(out) -> tuple[Path, dict] | None:
    """The newest checkpoint under ``out`` that loads; unreadable newer ones are skipped with a warning."""
    for _, path in list_checkpoints(out):
        try:
            return path, load_training_checkpoint(path)
        except CheckpointError as err:
            print(f"fastglow: warning: skipping {err}", file=sys.stderr)
    return None


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
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                pass  # a line cut short by a kill
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------------
# Random number generators
# ----------------------------------------------------------------------------------------------
def capture_rng(data_generator: torch.Generator) -> dict:
    """Every RNG a run touches, as tensors/lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "data": data_generator.get_state(),
    }


def restore_rng(state: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    data_generator.set_state(state["data"])


# ----------------------------------------------------------------------------------------------
# Models from checkpoints (sample / eval / interpolate)
# ----------------------------------------------------------------------------------------------
SHAPE_KEYS = ("in_channel", "n_flow", "n_block", "hidden", "affine", "conv_lu")


def infer_shape(state_dict: dict, path) -> dict:
    """A Glow's constructor arguments read off rosinality's state_dict keys and tensor shapes."""
    try:
        n_block = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        n_flow = 1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith("blocks.0.flows."))
        squeezed = state_dict["blocks.0.flows.0.actnorm.loc"].shape[1]
        net0 = state_dict["blocks.0.flows.0.coupling.net.0.weight"]
        out4 = state_dict["blocks.0.flows.0.coupling.net.4.conv.weight"].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError):
        raise CheckpointError(f"{path}: not a Glow state_dict (rosinality's keys blocks.<i>.flows.<k>... "
                              "are missing)") from None
    return {"in_channel": squeezed // 4, "n_flow": n_flow, "n_block": n_block, "hidden": net0.shape[0],
            "affine": out4 == squeezed,
            # the last level always has LU weights: with one level, conv_lu cannot be told (and does not matter)
            "conv_lu": "blocks.0.flows.0.invconv.w_p" in state_dict if n_block > 1 else None}


def _flag(key: str, value) -> str:
    if key == "affine":
        return "--affine" if value else "--additive"
    if key == "conv_lu":
        return "LU 1x1 convs" if value else "--no-lu"
    return f"--{key.replace('_', '-')} {value}"


def load_model(path, flags: dict, device: str = "cpu", backend: str = "auto", default_img_size: int = 64):
    """A Glow from a fastglow checkpoint or a bare (rosinality) state_dict -> (model in eval mode, info).

    ``flags`` holds the model-shape flags the user gave (None when not given): they must agree with the
    checkpoint. info: img_size (from the run's config, or ``flags["img_size"]``, else ``default_img_size``),
    n_bins (from the config, or 2**n_bits, default 5 bits) and the run's config (None for a bare state_dict).
    """
    ckpt = load_file(path)
    config = ckpt.get("config") if ckpt.get("format") == FORMAT else None
    state = ckpt["model"] if config is not None else ckpt
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    shape = infer_shape(state, path)
    for key in SHAPE_KEYS:
        given = flags.get(key)
        if given is not None and shape[key] is not None and given != shape[key]:
            raise CheckpointError(f"{path}: the checkpoint's model has {_flag(key, shape[key])}, "
                                  f"not {_flag(key, given)}")
    if config is not None:
        img_size, n_bins = config["img_size"], config["n_bins"]
        if flags.get("img_size") not in (None, img_size):
            raise CheckpointError(f"{path}: the model was trained at --img-size {img_size}, "
                                  f"not {flags['img_size']}")
    else:
        img_size = flags.get("img_size") or default_img_size
        n_bins = 2 ** (flags.get("n_bits") or 5)
    shape["conv_lu"] = shape["conv_lu"] is not False
    model = Glow(shape["in_channel"], shape["n_flow"], shape["n_block"], affine=shape["affine"],
                 conv_lu=shape["conv_lu"], hidden_channels=shape["hidden"], backend=backend, reversible=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit a Glow of that shape ({one_line(err)})") from None
    if img_size % 2 ** shape["n_block"]:
        raise CheckpointError(f"{path}: --img-size {img_size} is not a multiple of 2**n_block = "
                              f"{2 ** shape['n_block']}")
    return model.to(device).eval(), {"img_size": img_size, "n_bins": n_bins, "config": config, **shape}
