"""The training loop: data, model, symmetry groups, tracking optimizer, evaluation, checkpoints.

`train(config)` is everything train.py does. Checkpoints are written at the save schedule's
steps and at every evaluation step; the per-group theory state rides inside the optimizer's
state_dict, so `--resume` continues a run exactly (bitwise on CPU with --deterministic).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from Utils import fileio
from Utils.checkpoint import (
    METRIC_NAMES,
    CheckpointWriter,
    latest_valid_checkpoint,
    rng_state,
    save_steps,
    set_rng_state,
)
from Utils.ckptread import UnsafeCheckpointError, safe_torch_load
from Utils.distributed import DistContext, init_from_env, shutdown
from Utils.errors import CorruptFileError, UsageError, UserError


class TrainingDivergedError(UserError):
    """The loss became NaN or Inf."""

    exit_code = 3


@dataclass
class RunResult:
    """What a training run did.

    Attributes:
        run_dir: the run folder ("" when nothing was saved).
        steps: optimizer updates done in total.
        metrics: the last evaluation.
        seconds: wall time of the training loop.
        checkpoints: number of checkpoint files written by this process.
        checkpoint_bytes: their size in bytes.
        groups: the symmetry groups found (dicts).
    """

    run_dir: str
    steps: int
    metrics: dict[str, float]
    seconds: float
    checkpoints: int = 0
    checkpoint_bytes: int = 0
    groups: list[dict] = field(default_factory=list)


def resolve_device(cfg: dict[str, Any], ctx: DistContext) -> torch.device:
    """The torch device for this process from --device/--gpu/--tpu (GPU ``LOCAL_RANK`` under DDP)."""
    name = "xla" if cfg.get("tpu") else cfg["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA GPU is visible; use --device cpu")
        index = ctx.local_rank if ctx.distributed else cfg["gpu"]
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"--gpu {index} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        return torch.device("cuda", index)
    if name == "xla":
        from Utils import xla

        return xla.device()
    return torch.device("cpu")


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seeds python, numpy and torch; optionally asks for deterministic kernels."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def environment_info() -> dict[str, Any]:
    """Library versions, machine and git commit, stored with the hyperparameters."""
    import torchvision

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "argv": sys.argv,
    }
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def run_dir_of(cfg: dict[str, Any]) -> str:
    """``<save-dir>/<experiment>/<expid>``, or "" when --expid is empty."""
    if not cfg["expid"]:
        return ""
    return fileio.join(cfg["save_dir"], cfg["experiment"], cfg["expid"])


def overwrite_hint(cfg: dict[str, Any]) -> str:
    """The command that would continue or replace an existing run."""
    base = f"python train.py --experiment {cfg['experiment']} --expid {cfg['expid']}"
    if cfg["save_dir"] != "results":
        base += f" --save-dir {cfg['save_dir']}"
    return base


def lock_path(run_dir: str) -> str:
    """The lock file of a run, which holds the PID of the process writing it.

    ``<run>/.lock`` for local runs; for URL runs (gs://, s3://) a local file named after the
    URL in ``$NM_LOCK_DIR`` (default ``<tmp>/neural-mechanics-locks``); "" for memory://
    runs, which live inside one process. scripts/kill_all.sh reads these files.
    """
    if not fileio.is_url(run_dir):
        return os.path.join(fileio.local_path(run_dir), ".lock")
    if run_dir.startswith("memory://"):
        return ""
    folder = os.environ.get("NM_LOCK_DIR") or os.path.join(
        tempfile.gettempdir(), "neural-mechanics-locks"
    )
    return os.path.join(folder, re.sub(r"[^A-Za-z0-9._-]+", "_", run_dir) + ".lock")


class RunLock:
    """A lock file that stops two processes of this machine from writing the same run.

    Args:
        run_dir: the run folder (see `lock_path` for where the lock lives).
        force: take the lock even if another live process holds it (--overwrite).
    """

    def __init__(self, run_dir: str, force: bool = False) -> None:
        self.run_dir = run_dir
        self.path = lock_path(run_dir)
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder and holder != os.getpid() and _alive(holder) and not force:
                    raise UserError(
                        f"run {run_dir} is being written by process {holder}; wait for it, "
                        "choose another --expid, or pass --overwrite"
                    ) from None
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return

    def _holder(self) -> int:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def check(self) -> None:
        """Raises `UserError` when another process took the run over (``--overwrite``)."""
        if self.path and self._holder() != os.getpid():
            raise UserError(
                f"run {self.run_dir} was taken over by another process (--overwrite); this "
                "process stops without writing to it"
            )

    def release(self) -> None:
        """Removes the lock if this process holds it."""
        if self.path and self._holder() == os.getpid():
            os.remove(self.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_run_dir(cfg: dict[str, Any]) -> str:
    """Checks whether the run folder may be written; clears it for --overwrite.

    Returns:
        The run folder, or "" when nothing is saved.

    Raises:
        UserError: the run exists without --overwrite/--resume, or --resume has nothing.
    """
    run_dir = run_dir_of(cfg)
    if not run_dir:
        return ""
    hparams = fileio.join(run_dir, "hyperparameters.json")
    if cfg["resume"]:
        if not fileio.exists(hparams):
            from Utils.checkpoint import list_checkpoints

            if list_checkpoints(run_dir):
                raise CorruptFileError(
                    f'--resume: {hparams} is missing; restore it (or copy the "config" of a '
                    'checkpoint into it as {"config": ...}), or start again with --overwrite'
                )
            raise UserError(
                f"--resume: nothing to resume at {run_dir}; start the run without --resume"
            )
        return run_dir
    if fileio.exists(run_dir) and fileio.listdir(run_dir):
        if not cfg["overwrite"]:
            raise UserError(
                f"run {run_dir} already exists; continue it with `{overwrite_hint(cfg)} "
                f"--resume` or replace it with `{overwrite_hint(cfg)} --overwrite`"
            )
    return run_dir


def load_resume_config(run_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The stored config of a run being resumed, with this invocation's machine and location flags.

    The machine flags (device, processes) may change between the interrupted and the
    resumed run: global batches do not depend on how many processes share them.
    """
    path = fileio.join(run_dir, "hyperparameters.json")
    try:
        stored = fileio.read_json(path)["config"]
    except (ValueError, KeyError, TypeError):
        raise CorruptFileError(
            f"{path} is not a valid hyperparameters file; restore it or start again with "
            "--overwrite"
        ) from None
    keep = (
        "device",
        "gpu",
        "tpu",
        "workers",
        "verbose",
        "no_progress",
        "sync_save",
        "resume",
        "experiment",
        "expid",
        "save_dir",
        "overwrite",
    )
    merged = {**cfg, **{k: v for k, v in stored.items() if k not in keep}}
    merged["resume"] = True
    from Utils.flags import default_config, validate_train_config

    defaults = default_config()
    wrong = [
        k
        for k, v in merged.items()
        if k in defaults
        and defaults[k] is not None
        and not isinstance(v, type(defaults[k]))
        and not (isinstance(defaults[k], float) and isinstance(v, int))
    ]
    try:
        if wrong:
            raise UsageError(f"{wrong[0]}={merged[wrong[0]]!r} has the wrong type")
        validate_train_config(merged)
    except UsageError as err:
        raise CorruptFileError(
            f"{path} holds an invalid config ({err}); restore it or start again with --overwrite"
        ) from None
    return merged


def build_model(cfg: dict[str, Any], info) -> nn.Module:
    """The model for a dataset, with --pretrained or --restore-path weights."""
    from Models import get_model

    model = get_model(
        cfg["model"],
        cfg["model_class"],
        tuple(info.input_shape),
        int(info.num_classes),
        pretrained=cfg["pretrained"],
        model_dir=cfg["model_dir"],
    )
    if cfg["restore_path"]:
        restore_weights(model, cfg["restore_path"], cfg["model"])
    return model


def restore_weights(model: nn.Module, path: str, name: str = "") -> None:
    """Initialises `model` from a checkpoint's (or a bare state dict's) weights.

    Raises:
        UserError: missing file, or weights of another architecture.
    """
    if not fileio.exists(path):
        raise UserError(f"--restore-path {path} does not exist; give a checkpoint file")
    try:
        obj = safe_torch_load(path)
    except UnsafeCheckpointError:
        raise
    except Exception:
        raise CorruptFileError(f"--restore-path {path} is not a readable checkpoint") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CorruptFileError(f"--restore-path {path} holds no model weights")
    own = model.state_dict()
    mismatch = [
        k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)
    ] + [k for k in state if k not in own]
    if mismatch:
        raise UserError(
            f"--restore-path {path} is from a different model ({len(mismatch)} mismatched "
            f"tensors, e.g. '{mismatch[0]}'); pass a checkpoint of a --model "
            f"{name or model.__class__.__name__} run"
        )
    model.load_state_dict(state)


def detect_groups(model: nn.Module, cfg: dict[str, Any], data, device, dtype) -> list:
    """Symmetry groups of the model, verified on one training batch.

    The check runs a forward pass in train mode; BatchNorm statistics and the torch random
    state are restored afterwards so detection leaves no trace on training.
    """
    from Utils.data import sample_batch
    from Utils.symmetry import detect

    x, y, _ = sample_batch(cfg["dataset"], cfg["data_dir"], batch_size=64, seed=cfg["seed"])
    x = x.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    try:
        groups = detect(model, x, y, loss=cfg["loss"])
    finally:
        model.load_state_dict(saved)
        torch.set_rng_state(rng)
        model.zero_grad(set_to_none=True)
    return groups


def batches(stream, epoch: int, first: int, device: torch.device):
    """This rank's batches of one epoch; on XLA through ``MpDeviceLoader`` (one step each)."""
    it = stream.epoch(epoch, first)
    if device.type != "xla":
        return it
    from Utils import xla

    return xla.device_loader(it, len(stream) - first, device)


@torch.no_grad()
def evaluate(
    model: nn.Module, stream, loss_fn, device, dtype, ctx: DistContext, task: str
) -> dict[str, float]:
    """Test loss, top-1 and top-5 accuracy over the whole test split (reduced over ranks)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in batches(stream, 0, 0, device):
        n = x.shape[0]
        if n == 0:  # this rank's slice of a short last batch
            continue
        x = x.to(device=device, dtype=dtype, non_blocking=True)
        y = y.to(device=device, non_blocking=True)
        if y.is_floating_point():
            y = y.to(dtype)
        out = model(x)  # [B, C]
        sums[0] += loss_fn(out, y).double() * n
        if task == "classification":
            k = min(5, out.shape[1])
            top = out.topk(k, dim=1).indices  # [B, k]
            hit = top == y[:, None]
            sums[1] += hit[:, 0].sum()
            sums[2] += hit.any(dim=1).sum()
        sums[3] += n
    sums = ctx.all_reduce_sum(sums)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    if task != "classification":
        return {"test_loss": loss / count, "top1": math.nan, "top5": math.nan}
    return {"test_loss": loss / count, "top1": top1 / count, "top5": top5 / count}


def _progress(total: int, disable: bool, desc: str, leave: bool = True, position: int = 0):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        disable=disable,
        leave=leave,
        position=position,
        dynamic_ncols=True,
        file=sys.stderr,
    )


def train(config: dict[str, Any]) -> RunResult:
    """Trains as train.py does, from a config dict (missing keys take the flag defaults).

    One process by default; under ``torchrun`` every process calls this and they train
    together (DDP); with ``--device xla``/``--tpu`` it launches the XLA processes itself.

    Args:
        config: flag values with underscores (e.g. ``{"dataset": "synthetic", "lr": 0.1}``).

    Returns:
        A `RunResult` (on ranks other than 0, `checkpoints` is 0: only rank 0 writes).

    Raises:
        UserError: any problem the user can fix (bad value, missing data, existing run...).
    """
    from Utils import xla
    from Utils.flags import default_config, validate_train_config

    cfg = {**default_config(), **config}
    validate_train_config(cfg)
    if xla.uses_xla(cfg):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--device xla starts its own processes; run train.py without torchrun")
        return xla.spawn_train(cfg)
    device_type = "cuda" if cfg["device"] in ("cuda", "auto") else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        device_type = "cpu"
    ctx = init_from_env(device_type)
    try:
        return run_training(cfg, ctx)
    finally:
        shutdown(ctx)


def _decide_run(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Rank 0's checks of the run folder: (run folder, config with the stored one on --resume)."""
    run_dir = prepare_run_dir(cfg)
    if cfg["resume"] and run_dir:
        cfg = load_resume_config(run_dir, cfg)
    return run_dir, cfg


def _take_run_dir(run_dir: str, cfg: dict[str, Any]) -> RunLock | None:
    """Rank 0 locks the run folder and, for --overwrite, empties it."""
    if not run_dir:
        return None
    lock = RunLock(run_dir, force=cfg["overwrite"])
    if cfg["overwrite"] and not cfg["resume"]:
        for name in fileio.listdir(run_dir):
            if name != ".lock":
                fileio.remove(fileio.join(run_dir, name))
    return lock


def _load_resume(run_dir: str) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Rank 0 reads the newest valid checkpoint (on the CPU) and the metrics before it."""
    ckpt, skipped = latest_valid_checkpoint(run_dir, map_location="cpu")
    for path in skipped:
        print(f"warning: skipping corrupt checkpoint {path}", file=sys.stderr)
    if ckpt is None:
        raise UserError(f"--resume: no valid checkpoint in {run_dir}; start again with --overwrite")
    history: list[dict[str, float]] = []
    mpath = fileio.join(run_dir, "metrics.json")
    if fileio.exists(mpath):
        history = [h for h in fileio.read_json(mpath) if h["step"] <= ckpt["step"]]
    return ckpt, history


def _stored_groups(run_dir: str) -> list | None:
    """The groups of a run being resumed (None when it has no groups.json)."""
    from Utils.groups import groups_from_json

    path = fileio.join(run_dir, "groups.json")
    if not fileio.exists(path):
        return None
    return groups_from_json(json.dumps(fileio.read_json(path)))


def _state_tensors(model: nn.Module, optimizer) -> list[torch.Tensor]:
    """Parameters and theory state: what every replica must hold identically."""
    tensors = [p for p in model.parameters()]
    if hasattr(optimizer, "theory_snapshot"):
        for fields in optimizer.theory_snapshot().values():
            tensors += [torch.from_numpy(np.asarray(fields[k])) for k in sorted(fields)]
    return tensors


def run_training(cfg: dict[str, Any], ctx: DistContext) -> RunResult:
    """The training loop of one process of a run (single, DDP rank or XLA replica).

    Args:
        cfg: the complete, validated config.
        ctx: this process's place in the run (see `Utils.distributed`).

    Returns:
        A `RunResult`.
    """
    from Utils.budget import BudgetTracker
    from Utils.data import get_data
    from Utils.distributed import ReplicaMismatchError, fingerprint, global_batch_size, slice_loss
    from Utils.groups import groups_to_json
    from Utils.losses import loss_fn as get_loss
    from Utils.optimizers import build_optimizer
    from Utils.registry import parse_name_list

    run_dir, cfg = ctx.on_master(lambda: _decide_run(cfg), share=True)
    if not cfg["expid"] and ctx.is_master:
        warnings.warn("--expid is empty: training without saving anything", stacklevel=2)

    set_determinism(cfg["seed"], cfg["deterministic"])
    device = resolve_device(cfg, ctx)
    on_xla = device.type == "xla"
    dtype = torch.float64 if cfg["dtype"] == "float64" else torch.float32
    data = get_data(
        cfg["dataset"],
        data_dir=cfg["data_dir"],
        train_batch_size=cfg["train_batch_size"],
        test_batch_size=cfg["test_batch_size"],
        seed=cfg["seed"],
        workers=cfg["workers"],
        augment=not cfg["no_augment"],
        device="cpu" if on_xla else device,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    if cfg["loss"] == "ce" and data.info.task != "classification":
        raise UsageError(f"--dataset {cfg['dataset']} is a regression task; use --loss mse")
    sync_bn = bool(cfg.get("sync_bn")) and ctx.distributed
    if sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs GPUs (nccl); drop it on CPU or XLA")
    # XLA: symmetry detection runs on the CPU copy before the model moves to the device
    model = build_model(cfg, data.info).to(device="cpu" if on_xla else device, dtype=dtype)
    model.train()
    loss_fn = get_loss(cfg["loss"])
    steps_per_epoch = len(data.train)
    total_steps = steps_per_epoch * cfg["epochs"]
    eval_every = cfg["eval_freq"] or steps_per_epoch

    lock = ctx.on_master(lambda: _take_run_dir(run_dir, cfg))
    try:

        def find_groups() -> list:
            stored = _stored_groups(run_dir) if (cfg["resume"] and run_dir) else None
            if stored is not None:
                return stored
            where = next(model.parameters()).device
            return detect_groups(model, cfg, data, where, dtype)

        groups = ctx.on_master(find_groups, share=True)
        if on_xla:
            model = model.to(device)
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # every replica starts from rank 0's weights (XLA threads share one RNG)
        ctx.broadcast_tensors_([*model.parameters(), *model.buffers()])

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        buffers = parse_name_list(cfg["save_buffers"], _buffers_registry(), "buffer")
        optimizer = build_optimizer(
            cfg["optimizer"],
            named,
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            dampening=cfg["dampening"],
            weight_decay=cfg["wd"],
            nesterov=cfg["nesterov"],
            groups=groups,
            buffers=buffers,
        )
        groups = list(getattr(optimizer, "groups", groups))
        budget = None if on_xla else BudgetTracker(optimizer, named, groups)
        milestones = sorted(int(e) * steps_per_epoch for e in cfg["lr_drops"])
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=milestones, gamma=cfg["lr_drop_rate"]
        )
        train_model: nn.Module = model
        if ctx.distributed and not on_xla:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        float_buffers = [b for b in model.buffers() if b.is_floating_point()]
        optimizer_step = optimizer.step
        if on_xla:
            from Utils import xla

            def optimizer_step() -> None:
                xla.optimizer_step(optimizer)

        step, start_epoch, start_batch = 0, 0, 0
        running = {"loss_sum": 0.0, "top1_sum": 0.0, "count": 0}
        history: list[dict[str, float]] = []
        if cfg["resume"] and run_dir:
            ckpt, history = ctx.on_master(lambda: _load_resume(run_dir), share=True)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if budget is not None and "budget" in ckpt:
                budget.load_state_dict(ckpt["budget"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            running = dict(ckpt["running"])
            step, start_epoch, start_batch = ckpt["step"], ckpt["epoch"], ckpt["batch"]
            del ckpt
            if ctx.is_master:
                print(f"resuming {run_dir} at step {step}", file=sys.stderr)
        elif run_dir and ctx.is_master:
            environment = {
                **environment_info(),
                "world_size": ctx.world_size,
                "backend": ctx.backend or "single",
            }
            fileio.write_json(
                fileio.join(run_dir, "hyperparameters.json"),
                {"config": cfg, "environment": environment},
            )
            fileio.write_json(
                fileio.join(run_dir, "groups.json"), json.loads(groups_to_json(groups))
            )

        save_at = set(
            save_steps(
                total_steps, cfg["save_schedule"], cfg["save_freq"], cfg["num_checkpoints"]
            ).tolist()
        )
        writer = (
            CheckpointWriter(run_dir, background=not cfg["sync_save"])
            if (run_dir and ctx.is_master)
            else None
        )
        # api hook 1: --track-online N records per-group quantities into <run>/online.h5
        from Utils.budget import FIELD_PREFIX
        from Utils.online import for_training

        online = (
            for_training(
                cfg,
                model,
                optimizer,
                groups,
                run_dir,
                steps_per_epoch,
                step,
                theory_sources=[(FIELD_PREFIX, budget)] if budget is not None else [],
            )
            if ctx.is_master
            else None
        )
        # api hook 4: a line per evaluation when stdout is not a terminal; --tensorboard
        from Utils.live import for_training as live_feedback

        live = (
            live_feedback(
                cfg,
                model,
                optimizer,
                groups,
                run_dir,
                steps_per_epoch,
                eval_every,
                total_steps,
                step,
                online,
            )
            if ctx.is_master
            else None
        )
        # training statistics of steps not yet read back: (step, epoch, [loss_sum, top1, n])
        pending: list[tuple[int, int, torch.Tensor]] = []
        shown = {"loss": math.nan}

        def snapshot(metrics: dict[str, float]) -> dict[str, Any]:
            epoch, batch = divmod(step, steps_per_epoch) if steps_per_epoch else (0, 0)
            return {
                "format": "neural-mechanics-checkpoint",
                "version": 1,
                "step": step,
                "epoch": epoch,
                "batch": batch,
                "epoch_float": step / steps_per_epoch if steps_per_epoch else 0.0,
                "lr": float(optimizer.param_groups[0]["lr"]),
                "config": cfg,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                **({"budget": budget.state_dict()} if budget is not None else {}),
                "param_names": [n for n, _ in named],
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "metrics": metrics,
                "running": dict(running),
            }

        def read_statistics() -> None:
            """Adds pending step statistics to the running sums; stops on a NaN loss."""
            while pending:
                at, epoch, stats = pending.pop(0)
                loss_sum, top1_sum, count = stats.tolist()
                if count and not math.isfinite(loss_sum) and not cfg["allow_nan"]:
                    raise TrainingDivergedError(
                        f"loss became {loss_sum / count} at step {at} (epoch {epoch + 1}); the "
                        "last good checkpoint is kept; lower --lr, or pass --allow-nan"
                    )
                running["loss_sum"] += loss_sum
                if data.info.task == "classification":
                    running["top1_sum"] += top1_sum
                running["count"] += int(count)
                shown["loss"] = loss_sum / count if count else math.nan

        def checkpoint_and_eval(force_eval: bool = False) -> dict[str, float]:
            if on_xla:
                xla.sync()  # every replica runs its pending graph (as xm.save does)
            read_statistics()
            if lock is not None:
                lock.check()
            metrics = dict.fromkeys(METRIC_NAMES, math.nan)
            is_eval = step % eval_every == 0 or step == total_steps or force_eval
            ctx.broadcast_tensors_(float_buffers)  # BatchNorm statistics of rank 0
            if is_eval:
                if ctx.distributed and not ctx.agree(fingerprint(_state_tensors(model, optimizer))):
                    raise ReplicaMismatchError(
                        f"parameters or theory state differ across the {ctx.world_size} "
                        f"processes at step {step}; please report this with the command line"
                    )
                metrics.update(
                    evaluate(model, data.test, loss_fn, device, dtype, ctx, data.info.task)
                )
                if running["count"] > 0:
                    metrics["train_loss"] = running["loss_sum"] / running["count"]
                    if data.info.task == "classification":
                        metrics["train_top1"] = running["top1_sum"] / running["count"]
                running.update(loss_sum=0.0, top1_sum=0.0, count=0)
                history.append({"step": step, "epoch": step / max(steps_per_epoch, 1), **metrics})
                if online is not None:  # api hook 2: the evaluation joins the online row
                    online.log(metrics)
                if live is not None:  # api hook 5: report the evaluation
                    live.evaluation(metrics)
                if run_dir and ctx.is_master:
                    fileio.write_json(fileio.join(run_dir, "metrics.json"), history)
            if writer is not None and (step in save_at or is_eval):
                writer.save(step, snapshot(metrics))
            return metrics

        t0 = time.perf_counter()
        last = checkpoint_and_eval() if not cfg["resume"] else {}
        disable = cfg["no_progress"] or not ctx.is_master or None
        bar = _progress(total_steps, disable, "train")
        bar.update(step)
        try:
            for epoch in range(start_epoch, cfg["epochs"]):
                first = start_batch if epoch == start_epoch else 0
                bar.set_description(f"epoch {epoch + 1}/{cfg['epochs']}")
                for index, (x, y) in enumerate(batches(data.train, epoch, first, device)):
                    size = global_batch_size(
                        data.train.num_samples, data.train.batch_size, first + index
                    )
                    x = x.to(device=device, dtype=dtype, non_blocking=True)
                    y = y.to(device=device, non_blocking=True)
                    if y.is_floating_point():
                        y = y.to(dtype)
                    optimizer.zero_grad(set_to_none=True)
                    out = train_model(x)  # [b, C]
                    loss, mean = slice_loss(loss_fn, out, y, size, ctx.world_size)
                    loss.backward()
                    stats = torch.zeros(3, dtype=torch.float64, device=device)
                    if mean is not None:
                        n = x.shape[0]
                        correct = (
                            (out.detach().argmax(1) == y).sum().double()
                            if data.info.task == "classification"
                            else stats[1]
                        )
                        stats = torch.stack([mean.detach().double() * n, correct, stats[2] + n])
                    pending.append((step, epoch, ctx.all_reduce_sum(stats)))  # [3]
                    if not on_xla:
                        read_statistics()  # reads the loss before the update, as CPU/GPU allow
                    optimizer_step()
                    scheduler.step()
                    step += 1
                    bar.update(1)
                    if not on_xla:
                        bar.set_postfix(loss=f"{shown['loss']:.4f}", refresh=False)
                    if step % eval_every == 0 or step in save_at or step == total_steps:
                        metrics = checkpoint_and_eval()
                        if not math.isnan(metrics["test_loss"]):
                            last = metrics
                            bar.set_postfix(
                                loss=f"{shown['loss']:.4f}", test=f"{metrics['test_loss']:.4f}"
                            )
            if on_xla:
                xla.sync()
            read_statistics()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            if online is not None:  # api hook 3: commit the last rows of online.h5
                online.close()
            if live is not None:  # api hook 6
                live.close()
        ctx.barrier()
        seconds = time.perf_counter() - t0
        if ctx.is_master:
            procs = f" on {ctx.world_size} processes" if ctx.distributed else ""
            parts = [f"done: {step} steps{procs} in {seconds:.1f} s"]
            summary = ", ".join(
                f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float) and v == v
            )
            parts += [summary] if summary else []
            parts += [f"checkpoints in {run_dir}"] if run_dir else []
            print("; ".join(parts), file=sys.stderr)
        return RunResult(
            run_dir=run_dir,
            steps=step,
            metrics=last,
            seconds=seconds,
            checkpoints=writer.files_written if writer else 0,
            checkpoint_bytes=writer.bytes_written if writer else 0,
            groups=[g.to_dict() for g in groups],
        )
    finally:
        if lock is not None:
            lock.release()


def _buffers_registry():
    from Utils.optimizers import BUFFERS

    return BUFFERS
