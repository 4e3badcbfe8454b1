"""Process-group context for torchrun (DDP) and single-process runs.

The same training code runs on one process, under ``torchrun --nproc_per_node=N`` (gloo on
CPU, nccl on GPU) and on XLA devices. Every global batch is split into equal contiguous
slices, one per rank, and gradients are averaged across ranks before the optimizer step, so
the optimizer (and the per-group theory state it carries) sees the global-batch gradient,
identically on every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process stands in a distributed run.

    Attributes:
        rank: global rank (0 on a single process).
        world_size: number of processes.
        local_rank: rank within this node (selects the GPU).
        backend: "gloo", "nccl", "xla" or "" for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_master(self) -> bool:
        """Whether this process prints and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes take part."""
        return self.world_size > 1

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over ranks (the tensor itself on a single process)."""
        if not self.distributed:
            return values
        if self.backend == "xla":
            import torch_xla.core.xla_model as xm

            return xm.all_reduce(xm.REDUCE_SUM, values)
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        """Waits for every rank."""
        if self.distributed and self.backend != "xla":
            dist.barrier()


def init_from_env(device_type: str = "cpu") -> DistContext:
    """Initialises the default process group when launched by torchrun.

    Args:
        device_type: "cuda" selects nccl, anything else gloo.

    Returns:
        The context; a single-process context when WORLD_SIZE is unset or 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=backend,
    )


def shutdown(ctx: DistContext) -> None:
    """Destroys the process group if this module created one."""
    if ctx.distributed and ctx.backend != "xla" and dist.is_initialized():
        dist.destroy_process_group()
