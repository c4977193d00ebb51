"""Data-parallel runs over ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc-per-node N -m s2d convert ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set (and the rendezvous flags for several nodes);
:func:`init` joins them into one process group: gloo on CPU, nccl on CUDA, one GPU per
local rank. Training phases wrap their model in ``DistributedDataParallel`` and each rank
reads its own rows of every global batch; whatever writes files (checkpoints,
TensorBoard, the archive, reports) runs on rank 0 only, and the others wait for it. A
process started without ``torchrun`` is a world of one: nothing changes for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from s2d.errors import S2DError

T = TypeVar("T")
# A search or a report runs on rank 0 while the other ranks wait at a barrier: allow it hours, not gloo's 30 min.
TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self) -> tuple[int, int]:
        """(rank, size): which rows of each global batch this rank trains on."""
        return self.rank, self.size


def from_environment(env: dict[str, str] | None = None) -> World:
    """The world torchrun describes in the environment (a world of one without it)."""
    env = os.environ if env is None else env
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise S2DError("RANK / WORLD_SIZE / LOCAL_RANK are not integers; launch with torchrun") from None
    if size < 1 or not 0 <= rank < size:
        raise S2DError(f"RANK {rank} is outside WORLD_SIZE {size}; launch with torchrun")
    return World(rank, size, local)


def backend_for(device: str) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device.startswith("cuda") else "gloo"


def device_for(device: str, world: World) -> str:
    """Each rank on a node takes its own GPU (``cuda`` -> ``cuda:LOCAL_RANK``); CPU ranks share the CPU."""
    if not device.startswith("cuda") or not world.distributed:
        return device
    if ":" in device:
        raise S2DError(f"--device {device} names one GPU, but {world.size} ranks run: pass --device cuda "
                       "(each rank then takes cuda:LOCAL_RANK)")
    return f"cuda:{world.local_rank}"


def init(device: str) -> tuple[World, str]:
    """Join torchrun's process group (once) and return this rank's world and device."""
    world = from_environment()
    if not world.distributed:
        return world, device
    device = device_for(device, world)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=TIMEOUT)
    return world, device


def current() -> World:
    """The world of this process once :func:`init` ran (a world of one otherwise)."""
    if not dist.is_available() or not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), from_environment().local_rank)


def leave() -> None:
    """Leave the process group at the end of a command (nothing to do in a world of one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (a search result, a phase's state)."""
    if not current().distributed:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(value: float, device: str | torch.device = "cpu") -> float:
    """The mean of ``value`` over the ranks (a loss or an accuracy for the logs)."""
    if not current().distributed:
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()
