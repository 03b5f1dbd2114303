"""Processes and devices for training: one process, or a torchrun process group (nccl on CUDA, gloo on CPU).

A :class:`Dist` says which process this is (rank of world) and on which device it runs; the helpers below
are no-ops in a single process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import torch

from .errors import InputError


@dataclasses.dataclass
class Dist:
    """This process's place in the run: rank (0 writes the files) of world processes, and its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(device: str | None) -> str:
    """``--device``: None or "auto" -> cuda if available, else cpu; anything but cpu, an available cuda[:N]
    or an available mps is refused."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available here")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices here")
    if dev.type not in ("cpu", "cuda") and not (dev.type == "mps" and torch.backends.mps.is_available()):
        raise InputError(f"--device {device}: cannot train or sample on {dev.type} (use auto, cpu, cuda or cuda:N)")
    return device


def pick_backend(backend: str | None, device) -> str:
    """``--backend``: "triton" needs a CUDA device (or TRITON_INTERPRET=1 on the CPU) and triton installed."""
    import importlib.util

    from ..backends import triton_interpreter_enabled

    backend = backend or "auto"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise InputError("--backend triton: triton is not installed here")
        if torch.device(device).type != "cuda" and not triton_interpreter_enabled():
            raise InputError(f"--backend triton runs on CUDA devices, not on {device} (use --backend eager or auto)")
    return backend


def setup_distributed(device: str) -> Dist:
    """One process, or (WORLD_SIZE > 1, set by torchrun) a process group: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device)
    if world == 1:
        return Dist(0, 1, torch.device(device))
    import torch.distributed as torch_dist

    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), dev)


def teardown(dist: Dist, finished: bool) -> None:
    """End the process group that :func:`setup_distributed` started, if any. ``finished``: every rank got here
    by finishing the run, so they meet at a barrier first (gloo's worker threads otherwise can still be serving
    a peer when the group is destroyed, and the process aborts on exit); after an error on one rank the others
    may never arrive, so the group is destroyed without waiting."""
    if dist.world > 1:
        import torch.distributed as torch_dist
        if torch_dist.is_initialized():
            if finished:
                torch_dist.barrier()
            torch_dist.destroy_process_group()


def shard(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This rank's contiguous 1/world of a global batch."""
    per = x.shape[0] // dist.world
    return x[dist.rank * per:(dist.rank + 1) * per]


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world > 1:
        import torch.distributed as torch_dist
        torch_dist.all_reduce(t)
    return t


def broadcast_object(obj, dist: Dist):
    """Rank 0's ``obj`` on every rank."""
    if dist.world == 1:
        return obj
    import torch.distributed as torch_dist
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj, dist: Dist) -> list:
    """Every rank's ``obj``, in rank order ([obj] in one process)."""
    if dist.world == 1:
        return [obj]
    import torch.distributed as torch_dist
    gathered = [None] * dist.world
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def parameters_agree(model: torch.nn.Module, dist: Dist) -> bool:
    """Whether every rank holds bit-identical parameters and buffers (a SHA-256 of their bytes, gathered)."""
    if dist.world == 1:
        return True
    import torch.distributed as torch_dist
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    gathered = [None] * dist.world
    torch_dist.all_gather_object(gathered, digest.hexdigest())
    return len(set(gathered)) == 1


def wrap_model(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """``model`` itself in one process; under torchrun, in DistributedDataParallel (whose construction
    broadcasts rank 0's parameters and buffers, so every rank starts bit-identical)."""
    if dist.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                   **_no_buffer_sync_in_forward())


def _no_buffer_sync_in_forward() -> dict:
    """DDP's keyword for "do not broadcast buffers at each forward" (the only buffer that changes, ActNorm's
    ``initialized``, is set identically on every rank): ``forward_sync_buffers`` where torch has it (it
    deprecates ``broadcast_buffers`` with a FutureWarning on every rank), else ``broadcast_buffers``."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
