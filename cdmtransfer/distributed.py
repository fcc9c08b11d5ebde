"""Data-parallel pretraining under torchrun: one code path, DistributedDataParallel, rank 0 logs and checkpoints.

    torchrun --standalone --nproc_per_node=N -m cdmtransfer pretrain RECIPE

Every rank draws the same global batch from the same seed and keeps its own 1/N slice; DDP averages the gradients,
so N processes take the same steps as one process on the whole batch (up to float rounding). gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from cdmtransfer.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env() -> Dist:
    """The process's place in a torchrun job (a single process when WORLD_SIZE is unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(dist: Dist, device: torch.device) -> torch.device:
    """Join the process group (once); returns this rank's device."""
    if not dist.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def check_batch(dist: Dist, batch: int) -> None:
    if dist.active and batch % dist.world:
        raise ConfigError(f"pretrain.batch_size = {batch} must be divisible by the {dist.world} torchrun processes")


def mean(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The average of a scalar over all ranks (the value itself in a single process)."""
    if not dist.active:
        return value
    value = value.detach().clone()
    tdist.all_reduce(value)
    return value / dist.world


def finish(dist: Dist) -> None:
    if dist.active and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
