"""Processes and devices for training: one process, or a torchrun process group (nccl on CUDA, gloo on CPU)."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import torch

from .errors import InputError


@dataclasses.dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """One process, or (WORLD_SIZE > 1, set by torchrun) a process group: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available here")
    if world == 1:
        return Dist(0, 1, torch.device(device))
    import torch.distributed as dist

    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def all_reduce_sum(t: torch.Tensor, ctx: Dist) -> torch.Tensor:
    if ctx.world > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def broadcast_object(obj, ctx: Dist):
    if ctx.world == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def parameters_agree(model: torch.nn.Module, ctx: Dist) -> bool:
    """Whether every rank holds bit-identical parameters and buffers (a SHA-256 of their bytes, gathered)."""
    if ctx.world == 1:
        return True
    import torch.distributed as dist
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    gathered = [None] * ctx.world
    dist.all_gather_object(gathered, digest.hexdigest())
    return len(set(gathered)) == 1
