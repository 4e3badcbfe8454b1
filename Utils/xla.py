"""torch-xla (TPU) support: process launch, devices, loaders and collectives.

Only this module imports ``torch_xla`` (lazily, so the rest of the project runs without it).
It uses the ``torch_xla.runtime`` API of torch-xla 2.x (``xr.world_size()``,
``xr.global_ordinal()``); the XRT-era ``xm.xrt_world_size()``/``xm.get_ordinal()`` are gone.

A TPU run is ``spawn(run_training, cfg)``: ``xmp.spawn`` starts one process per XLA device
(or runs one process in place with ``--workers 1``); each process builds an `XlaContext` (a
`DistContext` whose collectives are XLA's) and runs the per-process function it is given,
the same training loop as single-process and DDP runs (``Utils.training.run_training``; this
module does not import the training module). The loop differs only where XLA needs it:

* batches are cut on the CPU (each rank its contiguous slice of the global batch, exactly as
  under DDP) and moved by ``MpDeviceLoader``, which also marks the step after each batch;
* ``xm.optimizer_step`` averages the gradients over replicas (``xm.all_reduce``, scale
  1/world size) before ``optimizer.step()``, so `TrackingSGD` advances its theory state from
  the all-reduced gradient, identically on every core;
* checkpoints follow ``xm.save``'s semantics: every replica syncs its pending graph, then
  the master copies the tensors to the CPU and writes them (atomically, through
  `Utils.checkpoint.CheckpointWriter`, so fsspec URLs work too);
* evaluation sums and the agreement check are reduced with ``xm.mesh_reduce`` on the host.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from Utils.distributed import DistContext
from Utils.errors import UsageError

INSTALL_HINT = (
    "pip install -r requirements-tpu.txt in a separate virtualenv "
    "(see docs/DISTRIBUTED.md, 'Running on a TPU VM')"
)


def available() -> bool:
    """Whether torch-xla can be imported."""
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


def _modules():
    """(torch_xla, xla_model, runtime), or UsageError when torch-xla is missing."""
    try:
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr
    except ImportError:
        raise UsageError(f"--device xla needs torch-xla: {INSTALL_HINT}") from None
    return torch_xla, xm, xr


def uses_xla(cfg: dict[str, Any]) -> bool:
    """Whether a training config asks for XLA (--device xla or --tpu NAME)."""
    return bool(cfg.get("tpu")) or cfg.get("device") == "xla"


def device() -> torch.device:
    """This process's XLA device."""
    torch_xla, _, _ = _modules()
    return torch_xla.device()


class XlaContext(DistContext):
    """A `DistContext` whose collectives run through torch-xla (one process per XLA device)."""

    def _reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        return all_reduce(values, op) if self.distributed else values

    def barrier(self) -> None:
        """Waits for every replica."""
        if self.distributed:
            barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """The master's picklable object, on every replica."""
        return broadcast_object(obj, self.is_master) if self.distributed else obj

    def broadcast_tensors_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrites XLA tensors in place with the master's values."""
        if self.distributed:
            broadcast_tensors_(tensors)


def context() -> XlaContext:
    """The context of this XLA process (rank and world size from ``torch_xla.runtime``)."""
    _, _, xr = _modules()
    return XlaContext(
        rank=int(xr.global_ordinal()),
        world_size=int(xr.world_size()),
        local_rank=int(xr.local_ordinal()),
        backend="xla",
    )


def sync(wait: bool = True) -> None:
    """Executes the pending graph (every replica must call it at the same point)."""
    torch_xla, _, _ = _modules()
    torch_xla.sync(wait=wait)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """All-reduces (averages) the gradients over replicas, then steps the optimizer."""
    _, xm, _ = _modules()
    xm.optimizer_step(optimizer)


class _Batches:
    """A sized iterable over a batch iterator (what ``MpDeviceLoader`` wraps)."""

    def __init__(self, batches: Iterator, length: int) -> None:
        self.batches = batches
        self.length = length

    def __iter__(self) -> Iterator:
        return self.batches

    def __len__(self) -> int:
        return self.length


def device_loader(batches: Iterator, length: int, dev: torch.device) -> Iterable:
    """Wraps CPU batches in ``MpDeviceLoader``: background upload, one step mark per batch.

    Args:
        batches: iterator of (x, y) CPU tensors (this rank's slices).
        length: number of batches it yields.
        dev: the XLA device.
    """
    _modules()
    from torch_xla.distributed.parallel_loader import MpDeviceLoader

    return MpDeviceLoader(_Batches(batches, length), dev)


def all_reduce(values: torch.Tensor, op: str) -> torch.Tensor:
    """Sum or max of a tensor over replicas, on the tensor's device.

    XLA tensors are reduced in the graph (``xm.all_reduce``, lazy); CPU tensors on the host
    (``xm.mesh_reduce``, which syncs).

    Args:
        values: the tensor (unchanged).
        op: "sum" or "max".
    """
    _, xm, _ = _modules()
    if values.device.type == "xla":
        kind = xm.REDUCE_SUM if op == "sum" else xm.REDUCE_MAX
        return xm.all_reduce(kind, values.clone())

    def reduce(copies: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(copies))  # [world, ...]
        return stacked.sum(0) if op == "sum" else stacked.amax(0)

    return xm.mesh_reduce(f"neural-mechanics-{op}", values.detach().cpu(), reduce).to(values.device)


def broadcast_object(obj: Any, is_master: bool) -> Any:
    """The master's picklable object, on every replica (one rendezvous)."""
    _, xm, _ = _modules()
    payload = pickle.dumps(obj) if is_master else b""
    return pickle.loads(xm.rendezvous("neural-mechanics-broadcast", payload)[0])


def broadcast_tensors_(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrites XLA tensors in place with the master's values."""
    _, xm, _ = _modules()
    if tensors:
        xm.collective_broadcast(list(tensors))


def barrier() -> None:
    """Waits for every replica."""
    _, xm, _ = _modules()
    xm.rendezvous("neural-mechanics-barrier")


def spawn(fn: Callable[[dict[str, Any], DistContext], Any], cfg: dict[str, Any]) -> Any:
    """Runs ``fn(cfg, ctx)`` in every XLA process (``xmp.spawn``); returns the master's value.

    ``--workers 1`` runs one process in place; any other value starts one process per XLA
    device (all of them: torch-xla's ``spawn`` takes 1 or all devices; restrict the devices
    with the ``TPU_NUM_DEVICES``/``CPU_NUM_DEVICES`` environment variables).

    Args:
        fn: the per-process function (e.g. ``Utils.training.run_training``); it must pickle
            (a module-level function) and its value too.
        cfg: the complete, validated training config.

    Raises:
        UsageError: torch-xla is not installed.
    """
    _modules()
    import torch_xla.distributed.xla_multiprocessing as xmp

    if cfg.get("tpu"):
        os.environ.setdefault("PJRT_DEVICE", "TPU")
        os.environ.setdefault("TPU_NAME", str(cfg["tpu"]))
    nprocs = 1 if int(cfg.get("workers", 0)) == 1 else None
    fd, result_path = tempfile.mkstemp(prefix="nm-xla-result-", suffix=".pkl")
    os.close(fd)
    try:
        xmp.spawn(_worker, args=(fn, cfg, result_path), nprocs=nprocs, start_method="spawn")
        with open(result_path, "rb") as f:
            data = f.read()
        if not data:
            raise RuntimeError("the XLA master process returned no result")
        return pickle.loads(data)
    finally:
        os.remove(result_path)


def _worker(index: int, fn: Callable, cfg: dict[str, Any], result_path: str) -> None:
    """One XLA process: runs `fn` and (on the master) stores its value for the parent."""
    ctx = context()
    result = fn(dict(cfg), ctx)
    if ctx.is_master:
        buf = io.BytesIO()
        pickle.dump(result, buf)
        with open(result_path, "wb") as f:
            f.write(buf.getvalue())
