"""Several processes, one trajectory: process groups (torchrun/DDP, XLA) and the shared rules.

The same training loop runs on one process, under ``torchrun --nproc_per_node=N`` (DDP; gloo
on CPU, nccl on GPU) and on XLA devices (``xmp.spawn``, see `Utils.xla`). The rules that make
a run with N processes follow the single-process trajectory live here, written once for
both backends:

* **Data**: every global batch (``--train-batch-size`` is global) is cut into N contiguous
  slices, rank r taking slice r (`Utils.data`); the union is the single-process batch.
* **Loss weighting**: each rank back-propagates ``loss_r = mean_r * n_r * N / n`` (`slice_loss`),
  n_r its slice size and n the global batch size. DDP and ``xm.optimizer_step`` average
  gradients over ranks, so the optimizer sees ``sum_r n_r grad(mean_r) / n``: the gradient of
  the global-batch mean, exactly the single-process gradient (up to summation order), even
  when the last batch is cut unevenly. A rank with an empty slice back-propagates zero.
* **Theory state**: the averaged gradient is identical on every rank, so `TrackingSGD`'s
  per-group theory state (inside the optimizer) is too; `DistContext.agree` checks the
  parameters and that state at every evaluation.
* **Decisions** (run folder checks, locking, symmetry detection, resuming) are taken on
  rank 0 and broadcast (`DistContext.on_master`): every rank holds the same run folder,
  groups and checkpoint, and an error on rank 0 is raised on every rank.
* **Saving and printing**: rank 0 only. Training statistics are summed over ranks every
  step and evaluation sums at every evaluation, so logged metrics are global.
* **BatchNorm**: running statistics are per rank (each rank normalises its own slice), so a
  model with BatchNorm does not follow the single-process trajectory exactly; the buffers
  of rank 0 are broadcast before every evaluation and checkpoint. On GPUs the config key
  ``sync_bn`` converts BatchNorm to SyncBatchNorm (global batch statistics).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from Utils.errors import UserError


class ReplicaMismatchError(RuntimeError):
    """Replicas hold different parameters or theory state (a bug, not a user error)."""


@dataclass
class DistContext:
    """Where this process stands in a distributed run (torch.distributed collectives).

    `Utils.xla.XlaContext` subclasses it with XLA's collectives.

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

    @property
    def comm_device(self) -> torch.device:
        """The device collective tensors must live on (CUDA for nccl, else the CPU)."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def _reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        if not self.distributed:
            return values
        out = values.detach().to(self.comm_device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return out.to(values.device)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over ranks (the tensor itself on a single process)."""
        return self._reduce(values, "sum")

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of a tensor over ranks (the tensor itself on one process)."""
        return self._reduce(values, "max")

    def barrier(self) -> None:
        """Waits for every rank."""
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable object, on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_master else None]
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def broadcast_tensors_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrites tensors in place with rank 0's values (e.g. BatchNorm buffers)."""
        if not self.distributed or not tensors:
            return
        for t in tensors:
            buf = t.detach().to(self.comm_device, copy=True)
            dist.broadcast(buf, src=0)
            t.data.copy_(buf.to(t.device))

    def on_master(self, fn: Callable[[], Any], share: bool = False) -> Any:
        """Runs `fn` on rank 0 only; its exception, if any, is raised on every rank.

        Args:
            fn: the work (reading or writing the run folder, detecting groups...).
            share: broadcast fn's return value to every rank (it must pickle).

        Returns:
            fn's value on rank 0; on the other ranks the same value when `share`, else None.
        """
        value, error = None, None
        if self.is_master:
            try:
                value = fn()
            except Exception as err:  # re-raised below, on every rank
                error = err
        if self.distributed:
            sent = error
            if sent is not None and not _picklable(sent):
                sent = RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
            shared, sent = self.broadcast_object((value if share else None, sent))
            if share:
                value = shared
            if not self.is_master:
                error = sent
        if error is not None:
            raise error
        return value

    def agree(self, values: torch.Tensor) -> bool:
        """Whether every rank holds exactly the same values (always True on one process)."""
        if not self.distributed:
            return True
        values = values.detach().to(torch.float64).cpu()
        high = self.all_reduce_max(values)
        low = -self.all_reduce_max(-values)
        return bool(torch.equal(high, low))


def _picklable(obj: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True


def init_from_env(device_type: str = "cpu") -> DistContext:
    """Initialises the default process group when launched by torchrun.

    torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; the process group is initialised from them (``env://``).

    Args:
        device_type: "cuda" selects nccl (and this process's GPU ``LOCAL_RANK``), anything
            else gloo.

    Returns:
        The context; a single-process context when WORLD_SIZE is unset or 1.

    Raises:
        UserError: WORLD_SIZE is set without the rest of torchrun's environment.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise UserError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} unset; launch with torchrun "
            "--nproc_per_node=N train.py ... (or unset WORLD_SIZE)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=dist.get_backend(),
    )


def shutdown(ctx: DistContext) -> None:
    """Destroys the process group if this module created one."""
    if ctx.distributed and ctx.backend != "xla" and dist.is_initialized():
        dist.destroy_process_group()


def global_batch_size(num_samples: int, batch_size: int, batch: int) -> int:
    """Samples in global batch `batch` of an epoch (the last one may be partial).

    Args:
        num_samples: samples in the split.
        batch_size: the global batch size.
        batch: the batch index within the epoch.
    """
    return max(0, min(batch_size, num_samples - batch * batch_size))


def slice_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    out: torch.Tensor,
    y: torch.Tensor,
    global_size: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss a rank back-propagates so that averaging gradients gives the global mean.

    With ``n_r`` samples on this rank out of ``global_size`` in the global batch, the loss
    is ``mean_r * n_r * world_size / global_size`` (``mean_r`` the batch-mean loss of the
    slice); the factor is exactly 1 for equal slices and on one process. An empty slice
    back-propagates zero, still connected to every parameter the forward pass used (DDP
    expects a gradient for each).

    Args:
        loss_fn: batch-mean loss (a `Utils.losses` function).
        out: [n_r, C] model outputs of this rank's slice.
        y: [n_r] labels or [n_r, C] targets.
        global_size: samples in the global batch.
        world_size: number of ranks.

    Returns:
        (0-d loss to back-propagate, 0-d batch-mean loss of the slice or None when empty).
    """
    n = out.shape[0]
    if n == 0:
        return out.sum() * 0.0, None
    mean = loss_fn(out, y)
    if world_size == 1 or n * world_size == global_size:
        return mean, mean
    return mean * (n * world_size / global_size), mean


def fingerprint(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per-tensor float64 sums and sums of squares, for `DistContext.agree`.

    Args:
        tensors: any tensors (parameters, theory state), on any devices.

    Returns:
        float64 [2 * number of tensors] on the CPU (one transfer per device).
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        d = t.detach().to(torch.float64)
        by_device.setdefault(d.device, []).append(torch.stack([d.sum(), d.square().sum()]))
    if not by_device:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([torch.cat(parts).cpu() for parts in by_device.values()])  # [2T]
