"""One process or many: the torchrun world and the few collectives the trainer uses.

`init_distributed()` joins the torchrun process group when there is one (gloo on CPU,
NCCL on GPU; multi-node through torchrun's rendezvous) and otherwise leaves a plain
single process. Every collective here is a no-op in a single process, so callers
never branch on the world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0  # this process's global rank
    size: int = 1  # processes in the run
    local_rank: int = 0  # rank on this node; picks the GPU
    device: torch.device = torch.device("cpu")  # where this process computes

    @property
    def distributed(self) -> bool:
        """Part of a process group of several processes. A World of size 1 inside a
        torchrun job (rank 0 evaluating alone) runs no collectives."""
        return self.size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """The torchrun world, or a single process. torchrun sets RANK / WORLD_SIZE /
    LOCAL_RANK and the rendezvous address; a plain `python -m kiln.training` has none."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return World(device=device)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def all_reduce_mean(value: float, world: World) -> float:
    """The mean of `value` over all ranks (sent as float64, the Python float unrounded)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world.size


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
