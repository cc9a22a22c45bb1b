"""Process-group set-up from torchrun's environment, and the few collectives the training loop needs.

`torchrun --nproc_per_node N -m gptforge pretrain ...` sets RANK, LOCAL_RANK and WORLD_SIZE; without them
gptforge runs as a single process and no process group is created. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: `rank` of `world_size`, `local_rank` on its node, and its `device`.

    With tensor parallelism over `tensor_parallel` ranks, consecutive groups of that many ranks hold one model
    replica and see the same data: rank r is data-parallel rank `dp_rank` = r // tensor_parallel of `dp_size`.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False
    tensor_parallel: int = 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tensor_parallel

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    On CUDA each rank uses `cuda:LOCAL_RANK`. Returns a single-process DistInfo when WORLD_SIZE is unset or 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        created = True
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, initialised_here=created)


def teardown(info: DistInfo) -> None:
    """Destroy the process group if `init_distributed` created it, after every rank got here (destroying it while
    a peer is still finishing, e.g. writing a checkpoint, can abort gloo's threads)."""
    if info.initialised_here and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all ranks (in place on a copy); identity for a single process."""
    if not info.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's Python object, on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    """Every rank's Python object, in rank order (a one-element list for a single process)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
