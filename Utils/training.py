"""The training loop: data, model, symmetry groups, tracking optimizer, evaluation, checkpoints.

`train(config)` is everything train.py does. Checkpoints are written at the save schedule's
steps and at every evaluation step; the per-group theory state rides inside the optimizer's
state_dict, so `--resume` continues a run exactly (bitwise on CPU with --deterministic).

One process of a run is a `Trainer`: `Trainer.run` plans the run folder (rank 0), builds
the data, model and optimizer, then loops over batches. Code that wants to follow or extend
the loop (logging, live progress, trackers) passes `Callback` objects: each hook gets the
trainer, whose attributes (``step``, ``epoch``, ``history``, ``last_loss``, ``model``,
``optimizer``, ``cfg``...) describe the state at that point.

Resume rules (`plan_run`): the experiment's flags come from the run's hyperparameters.json;
the machine flags (`Utils.config.MACHINE_KEYS`: data and model folders, device, processes...)
from this command line; a flag given on the command line with another value than the run's
is refused, except the keys of `Utils.config.RESUMABLE_KEYS` (``--epochs``, to extend a run),
whose change is recorded under "changes" in hyperparameters.json.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from tqdm.auto import tqdm

from Models import get_model
from Utils import fileio, xla
from Utils.budget import BudgetTracker
from Utils.checkpoint import (
    FORMAT,
    METRIC_NAMES,
    VERSION,
    CheckpointWriter,
    latest_valid_checkpoint,
    list_checkpoints,
    rng_state,
    save_steps,
    set_rng_state,
)
from Utils.ckptread import UnsafeCheckpointError, safe_torch_load
from Utils.config import (
    MACHINE_KEYS,
    RESUMABLE_KEYS,
    RUN_VARIABLE_KEYS,
    TrainConfig,
    complete,
    flag_name,
    validate,
)
from Utils.data import get_data, sample_batch
from Utils.distributed import (
    DistContext,
    ReplicaMismatchError,
    fingerprint,
    global_batch_size,
    init_from_env,
    shutdown,
    slice_loss,
)
from Utils.errors import CorruptFileError, UsageError, UserError
from Utils.groups import groups_from_json, groups_to_json
from Utils.losses import loss_fn as get_loss
from Utils.optimizers import BUFFERS, build_optimizer
from Utils.registry import parse_name_list
from Utils.rundir import RunDir, RunLock, held_by_other, lock_path  # noqa: F401 (lock_path: API)
from Utils.symmetry import detect

LOCK_CHECK_INTERVAL = 1.0  # seconds between reads of the run's lock file in the step loop


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
        return xla.device()
    return torch.device("cpu")


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seeds python, numpy and torch; optionally asks for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def environment_info() -> dict[str, Any]:
    """Library versions, machine and git commit, stored with the hyperparameters."""
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


@dataclass
class RunPlan:
    """Rank 0's decision about the run folder, shared with every rank.

    Attributes:
        run_dir: the run folder ("" when nothing is saved).
        cfg: the config to train with (on --resume: the run's, with this command's machine
            flags and allowed changes).
        resuming: whether training continues from a checkpoint.
        changes: keys changed on --resume, ``{key: [old, new]}`` (recorded in
            hyperparameters.json).
        stored: the config in hyperparameters.json before the changes (None: new run).
    """

    run_dir: str
    cfg: dict[str, Any]
    resuming: bool = False
    changes: dict[str, list] = field(default_factory=dict)
    stored: dict[str, Any] | None = None


def _is_leftover(run: RunDir) -> bool:
    """Whether a run folder holds only what a run killed before its first checkpoint leaves."""
    early = {"hyperparameters.json", "groups.json", "metrics.json", "ckpt"}
    return set(run.entries()) <= early and not list_checkpoints(run.path)


def plan_run(cfg: dict[str, Any], given: set[str] | dict[str, Any]) -> RunPlan:
    """Checks whether the run folder may be written (rank 0; nothing is written here).

    A folder left by a run killed before its first checkpoint (no checkpoint, only the files
    written at the start) counts as empty: the same command starts the run again, and
    ``--resume`` starts it from step 0.

    Args:
        cfg: the complete config of this invocation.
        given: the keys set explicitly (flags on the command line, keys of `train`'s dict).

    Raises:
        UserError: the run exists without --overwrite/--resume, --resume has nothing to
            resume, or changes flags that may not change.
        CorruptFileError: --resume with a missing or invalid hyperparameters.json.
    """
    if not cfg["expid"]:
        return RunPlan("", cfg)
    run = RunDir(cfg["save_dir"], cfg["experiment"], cfg["expid"])
    if not cfg["resume"]:
        if run.entries() and not cfg["overwrite"] and not _is_leftover(run):
            hint = run.command("train.py")
            raise UserError(
                f"run {run} already exists; continue it with `{hint} --resume` or replace it "
                f"with `{hint} --overwrite`"
            )
        return RunPlan(run.path, cfg)
    if not fileio.exists(run.hyperparameters):
        if list_checkpoints(run.path):
            raise CorruptFileError(
                f'--resume: {run.hyperparameters} is missing; restore it (or copy the "config" '
                'of a checkpoint into it as {"config": ...}), or start again with --overwrite'
            )
        raise UserError(f"--resume: nothing to resume at {run}; start the run without --resume")
    stored = _stored_config(run)
    changes = {k: [stored[k], cfg[k]] for k in sorted(given) if k not in MACHINE_KEYS}
    changes = {k: v for k, v in changes.items() if v[0] != v[1]}
    refused = [k for k in changes if k not in RESUMABLE_KEYS]
    if refused:
        shown = ", ".join(
            f"{flag_name(k)} {changes[k][1]!r} (run: {changes[k][0]!r})" for k in refused
        )
        raise UsageError(
            f"--resume continues the run as it was trained, but {shown} differ; drop "
            f"{'it' if len(refused) == 1 else 'them'} to continue {run}, or train a new run "
            "under another --expid (only --epochs may change, to extend a run)"
        )
    merged = {**stored, **{k: cfg[k] for k in MACHINE_KEYS}}
    merged.update({k: new for k, (_, new) in changes.items()})
    merged["resume"] = True
    validate(merged)
    return RunPlan(run.path, merged, bool(list_checkpoints(run.path)), changes, stored)


def _stored_config(run: RunDir) -> dict[str, Any]:
    """The valid config of hyperparameters.json (rank 0, --resume)."""
    path = run.hyperparameters
    try:
        stored = fileio.read_json(path)["config"]
        stored = TrainConfig.from_dict(stored).to_dict()
        validate({**stored, "experiment": run.experiment, "expid": run.expid})
    except (ValueError, KeyError, TypeError, UsageError) as err:
        why = f" ({err})" if isinstance(err, UsageError) else ""
        raise CorruptFileError(
            f"{path} is not a valid hyperparameters file{why}; restore it or start again "
            "with --overwrite"
        ) from None
    return stored


def _check_stored_config(run_dir: str, stored: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """Refuses a hyperparameters.json edited since the checkpoints were written."""
    theirs = ckpt.get("config") or {}
    differ = [
        k
        for k in sorted(stored)
        if k not in RUN_VARIABLE_KEYS and k in theirs and theirs[k] != stored[k]
    ]
    if differ:
        shown = ", ".join(f"{k}={stored[k]!r} (checkpoint: {theirs[k]!r})" for k in differ[:3])
        raise CorruptFileError(
            f"{RunDir.from_path(run_dir).hyperparameters} does not match the run's checkpoints "
            f"({shown}); restore it, or start again with --overwrite"
        )


def _read_history(run: RunDir, step: int) -> list[dict[str, float]]:
    """The evaluations of a run being resumed up to `step` ([] without metrics.json)."""
    if not fileio.exists(run.metrics):
        return []
    try:
        history = fileio.read_json(run.metrics)
        return [dict(h) for h in history if int(h["step"]) <= step]
    except (ValueError, KeyError, TypeError):
        raise CorruptFileError(
            f"{run.metrics} is damaged; restore it, or delete it to resume without the "
            "evaluation history"
        ) from None


def _stored_groups(run: RunDir) -> list | None:
    """The groups of a run being resumed (None when it has no groups.json)."""
    if not fileio.exists(run.groups):
        return None
    try:
        return groups_from_json(json.dumps(fileio.read_json(run.groups)))
    except Exception:  # any malformed content: the file is damaged
        raise CorruptFileError(
            f"{run.groups} is damaged; restore it, or delete it to detect the groups again"
        ) from None


def _take_run_dir(plan: RunPlan) -> RunLock | None:
    """Rank 0 locks the run folder; empties it for a new run, removes stale temporaries on
    --resume."""
    if not plan.run_dir:
        return None
    lock = RunLock(plan.run_dir, force=plan.cfg["overwrite"])
    if not lock.wait_for_previous():
        warnings.warn(
            f"process {lock.taken_from} still runs; it writes no further checkpoint to "
            f"{plan.run_dir}, but stop it (scripts/kill_all.sh)",
            stacklevel=2,
        )
    run = RunDir.from_path(plan.run_dir)
    if plan.cfg["resume"]:
        run.remove_temporaries()  # of a killed process (checkpoints: the writer's own)
    else:
        run.clear()
    return lock


def build_model(cfg: dict[str, Any], info, restore: bool = True) -> nn.Module:
    """The model for a dataset, with --pretrained or (when `restore`) --restore-path weights."""
    model = get_model(
        cfg["model"],
        cfg["model_class"],
        tuple(info.input_shape),
        int(info.num_classes),
        pretrained=cfg["pretrained"],
        model_dir=cfg["model_dir"],
    )
    if cfg["restore_path"] and restore:
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
    return xla.device_loader(it, len(stream) - first, device)


@torch.no_grad()
def evaluate_model(
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


def _state_tensors(model: nn.Module, optimizer) -> list[torch.Tensor]:
    """Parameters and theory state: what every replica must hold identically."""
    tensors = [p for p in model.parameters()]
    if hasattr(optimizer, "theory_snapshot"):
        for fields in optimizer.theory_snapshot().values():
            tensors += [torch.from_numpy(np.asarray(fields[k])) for k in sorted(fields)]
    return tensors


class Callback:
    """Hooks into the training loop; subclass and override what you need (all no-ops).

    Every hook receives the `Trainer`; read its state (``step``, ``epoch``, ``last_loss``,
    ``history``, ``model``, ``optimizer``, ``cfg``, ``ctx``...) and leave it unchanged. Hooks
    run on every rank (use ``trainer.ctx.is_master`` to print or write once).
    """

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step of this invocation (after the step-0 evaluation)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer update (``trainer.last_loss`` lags one step behind on XLA)."""

    def on_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After an evaluation (``metrics`` is also ``trainer.history[-1]``)."""

    def on_checkpoint(self, trainer: Trainer, step: int) -> None:
        """After the checkpoint of `step` was handed to the writer."""

    def on_train_end(self, trainer: Trainer, result: RunResult | None) -> None:
        """When the loop ends; `result` is None when it ended with an error or interrupt."""


class ProgressBar(Callback):
    """The tqdm bar of train.py (rank 0 only; off with --no-progress or without a tty)."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_start(self, trainer: Trainer) -> None:  # noqa: D102
        disable = trainer.cfg["no_progress"] or not trainer.ctx.is_master or None
        self.bar = tqdm(
            total=trainer.total_steps,
            desc="train",
            disable=disable,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self.bar.update(trainer.step)

    def on_step_end(self, trainer: Trainer) -> None:  # noqa: D102
        self.bar.set_description(f"epoch {trainer.epoch + 1}/{trainer.cfg['epochs']}", False)
        self.bar.update(1)
        if trainer.device.type != "xla":
            self.bar.set_postfix(loss=f"{trainer.last_loss:.4f}", refresh=False)

    def on_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:  # noqa: D102
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{trainer.last_loss:.4f}", test=f"{metrics['test_loss']:.4f}"
            )

    def on_train_end(self, trainer: Trainer, result: RunResult | None) -> None:  # noqa: D102
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """One process of a training run (single, DDP rank or XLA replica).

    Args:
        cfg: the complete, validated config.
        ctx: this process's place in the run (see `Utils.distributed`).
        given: the keys set explicitly (for the --resume rules, see `plan_run`).
        callbacks: hooks into the loop (see `Callback`); a `ProgressBar` is added.
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        ctx: DistContext,
        given: set[str] | None = None,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.given = set(cfg) if given is None else set(given)
        from Utils.live import TrackingCallback  # api hook: --track-online, --tensorboard, lines

        self.callbacks = [ProgressBar(), TrackingCallback(), *callbacks]
        self.step = 0
        self.epoch = 0
        self.last_loss = math.nan
        self.history: list[dict[str, float]] = []
        self.last: dict[str, float] = {}
        self.running = {"loss_sum": 0.0, "top1_sum": 0.0, "count": 0}
        # training statistics of steps not yet read back: (step, epoch, [loss_sum, top1, n])
        self.pending: list[tuple[int, int, torch.Tensor]] = []
        self.lock: RunLock | None = None
        self._next_lock_check = 0.0
        self.writer: CheckpointWriter | None = None
        self.run_dir = ""

    def _hook(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(self, *args)

    # ------------------------------------------------------------------------- building

    def run(self) -> RunResult:
        """Plans the run folder, builds everything, trains and returns the result."""
        plan = self.ctx.on_master(lambda: plan_run(self.cfg, self.given), share=True)
        self.plan, self.cfg, self.run_dir = plan, plan.cfg, plan.run_dir
        self.run = RunDir.from_path(plan.run_dir) if plan.run_dir else None
        if not self.run_dir and self.ctx.is_master:
            warnings.warn("--expid is empty: training without saving anything", stacklevel=3)
        self._build_model()
        self.lock = self.ctx.on_master(lambda: _take_run_dir(plan))
        try:
            self._build_optimizer()
            self._start_or_resume()
            return self._train()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _build_model(self) -> None:
        """Device, data, model and loss of this process."""
        cfg, ctx = self.cfg, self.ctx
        set_determinism(cfg["seed"], cfg["deterministic"])
        self.device = resolve_device(cfg, ctx)
        self.on_xla = self.device.type == "xla"
        self.dtype = torch.float64 if cfg["dtype"] == "float64" else torch.float32
        self.data = get_data(
            cfg["dataset"],
            data_dir=cfg["data_dir"],
            train_batch_size=cfg["train_batch_size"],
            test_batch_size=cfg["test_batch_size"],
            seed=cfg["seed"],
            workers=cfg["workers"],
            augment=not cfg["no_augment"],
            device="cpu" if self.on_xla else self.device,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        self.task = self.data.info.task
        if cfg["loss"] == "ce" and self.task != "classification":
            raise UsageError(f"--dataset {cfg['dataset']} is a regression task; use --loss mse")
        self.sync_bn = bool(cfg.get("sync_bn")) and ctx.distributed
        if self.sync_bn and self.device.type != "cuda":
            raise UsageError("--sync-bn needs GPUs (nccl); drop it on CPU or XLA")
        # XLA: symmetry detection runs on the CPU copy before the model moves to the device
        where = "cpu" if self.on_xla else self.device
        restore = not self.plan.resuming  # a resumed run takes its weights from the checkpoint
        model = build_model(cfg, self.data.info, restore=restore)
        self.model = model.to(device=where, dtype=self.dtype)
        self.model.train()
        self.loss_fn = get_loss(cfg["loss"])
        self.steps_per_epoch = len(self.data.train)
        self.total_steps = self.steps_per_epoch * cfg["epochs"]
        self.eval_every = cfg["eval_freq"] or self.steps_per_epoch

    def _find_groups(self) -> list:
        """The stored groups when resuming from a checkpoint, else the detected ones (rank 0)."""
        stored = _stored_groups(self.run) if self.plan.resuming else None
        if stored is not None:
            return stored
        where = next(self.model.parameters()).device
        return detect_groups(self.model, self.cfg, self.data, where, self.dtype)

    def _build_optimizer(self) -> None:
        """Groups, optimizer, lr schedule and the (DDP) training model."""
        cfg, ctx = self.cfg, self.ctx
        groups = ctx.on_master(self._find_groups, share=True)
        if self.on_xla:
            self.model = self.model.to(self.device)
        if self.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # every replica starts from rank 0's weights (XLA threads share one RNG)
        ctx.broadcast_tensors_([*self.model.parameters(), *self.model.buffers()])
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(
            cfg["optimizer"],
            self.named,
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            dampening=cfg["dampening"],
            weight_decay=cfg["wd"],
            nesterov=cfg["nesterov"],
            groups=groups,
            buffers=parse_name_list(cfg["save_buffers"], BUFFERS, "buffer"),
        )
        self.groups = list(getattr(self.optimizer, "groups", groups))
        # the symmetry-breaking budget of any optimizer (not traced on XLA)
        self.budget = (
            None if self.on_xla else BudgetTracker(self.optimizer, self.named, self.groups)
        )
        if self.on_xla and ctx.is_master and any(g.valid for g in self.groups):
            print(
                "note: the symmetry-breaking budget is not tracked on XLA (its per-step hooks "
                "are not traced): checkpoints hold no budget, so the budget and equilibrium "
                "metrics skip this run; train on CPU or CUDA to get it",
                file=sys.stderr,
            )
        milestones = sorted(int(e) * self.steps_per_epoch for e in cfg["lr_drops"])
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=milestones, gamma=cfg["lr_drop_rate"]
        )
        self.train_model: nn.Module = self.model
        if ctx.distributed and not self.on_xla:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.float_buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        self.save_at = set(
            save_steps(
                self.total_steps, cfg["save_schedule"], cfg["save_freq"], cfg["num_checkpoints"]
            ).tolist()
        )

    def _start_or_resume(self) -> None:
        """Loads the checkpoint on --resume; writes hyperparameters.json and groups.json."""
        ctx = self.ctx
        if self.plan.resuming:
            ckpt, self.history = ctx.on_master(self._load_resume, share=True)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.budget is not None and "budget" in ckpt:
                self.budget.load_state_dict(ckpt["budget"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            self.running = dict(ckpt["running"])
            self.step = ckpt["step"]
            if ctx.is_master:
                print(f"resuming {self.run_dir} at step {self.step}", file=sys.stderr)
        elif self.run_dir and ctx.is_master:
            environment = {
                **environment_info(),
                "world_size": ctx.world_size,
                "backend": ctx.backend or "single",
            }
            fileio.write_json(
                self.run.hyperparameters, {"config": self.cfg, "environment": environment}
            )
            fileio.write_json(self.run.groups, json.loads(groups_to_json(self.groups)))

    def _load_resume(self) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """Rank 0 reads the newest valid checkpoint (on the CPU) and the metrics before it."""
        ckpt, skipped = latest_valid_checkpoint(self.run_dir, map_location="cpu")
        for path in skipped:
            print(f"warning: skipping corrupt checkpoint {path}", file=sys.stderr)
        if ckpt is None:
            raise UserError(
                f"--resume: no valid checkpoint in {self.run_dir}; start again with --overwrite"
            )
        _check_stored_config(self.run_dir, self.plan.stored, ckpt)
        if ckpt["step"] > self.total_steps:
            raise UsageError(
                f"--epochs {self.cfg['epochs']} ends before the run's last checkpoint (step "
                f"{ckpt['step']}); give --epochs >= {math.ceil(ckpt['step'] / self.steps_per_epoch)}"
            )
        history = _read_history(self.run, ckpt["step"])
        if self.plan.changes:
            self._record_changes(ckpt["step"])
        return ckpt, history

    def _record_changes(self, step: int) -> None:
        """Stores the new config and what changed at `step` in hyperparameters.json."""
        stored = fileio.read_json(self.run.hyperparameters)
        change = {"step": step, "changed": self.plan.changes, "argv": sys.argv}
        stored["changes"] = [*stored.get("changes", []), change]
        stored["config"] = {**stored["config"], **{k: v[1] for k, v in self.plan.changes.items()}}
        fileio.write_json(self.run.hyperparameters, stored)

    # ------------------------------------------------------------------------- the loop

    def _train(self) -> RunResult:
        """The epochs of this invocation, with checkpoints and evaluations; the result."""
        cfg, ctx = self.cfg, self.ctx
        if self.run_dir and ctx.is_master:
            guard = self.lock.check if self.lock is not None else None
            self.writer = CheckpointWriter(
                self.run_dir, background=not cfg["sync_save"], guard=guard
            )
        t0 = time.perf_counter()
        result = None
        try:
            try:
                self._loop()
            except KeyboardInterrupt:
                if self.writer is not None:
                    self.writer.abort()  # interrupted: the files on disk are complete, stop now
                raise
            finally:
                if self.writer is not None:
                    self.writer.close()
            result = self._result(time.perf_counter() - t0)
        finally:
            self._hook("on_train_end", result)
        self._print_summary(result)
        return result

    def _loop(self) -> None:
        """Every step of this invocation, with its checkpoints and evaluations."""
        cfg = self.cfg
        if not self.plan.resuming:
            self.last = self.checkpoint_and_eval()
        self._hook("on_train_start")
        start_epoch, start_batch = divmod(self.step, max(self.steps_per_epoch, 1))
        for epoch in range(start_epoch, cfg["epochs"]):
            self.epoch = epoch
            first = start_batch if epoch == start_epoch else 0
            for index, (x, y) in enumerate(batches(self.data.train, epoch, first, self.device)):
                self.train_step(x, y, first + index)
                self._check_lock()
                if self._due(self.step):
                    metrics = self.checkpoint_and_eval()
                    if not math.isnan(metrics["test_loss"]):
                        self.last = metrics
        if self.on_xla:
            xla.sync()
        self.read_statistics()

    def _check_lock(self) -> None:
        """Stops (`UserError`) within about a second once another process took the run over
        with --overwrite; the lock file is read at most once a second."""
        now = time.monotonic()
        if self.lock is not None and now >= self._next_lock_check:
            self._next_lock_check = now + LOCK_CHECK_INTERVAL
            self.lock.check()

    def _due(self, step: int) -> bool:
        return step % self.eval_every == 0 or step in self.save_at or step == self.total_steps

    def train_step(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        """One optimizer update on this rank's slice of global batch `batch`."""
        ctx, device, dtype = self.ctx, self.device, self.dtype
        train = self.data.train
        size = global_batch_size(train.num_samples, train.batch_size, batch)
        x = x.to(device=device, dtype=dtype, non_blocking=True)
        y = y.to(device=device, non_blocking=True)
        if y.is_floating_point():
            y = y.to(dtype)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.train_model(x)  # [b, C]
        loss, mean = slice_loss(self.loss_fn, out, y, size, ctx.world_size)
        loss.backward()
        stats = torch.zeros(3, dtype=torch.float64, device=device)
        if mean is not None:
            n = x.shape[0]
            correct = (
                (out.detach().argmax(1) == y).sum().double()
                if self.task == "classification"
                else stats[1]
            )
            stats = torch.stack([mean.detach().double() * n, correct, stats[2] + n])
        self.pending.append((self.step, self.epoch, ctx.all_reduce_sum(stats)))  # [3]
        if self.on_xla:
            xla.optimizer_step(self.optimizer)
        else:
            self.read_statistics()  # reads the loss before the update, as CPU/GPU allow
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._hook("on_step_end")

    def read_statistics(self) -> None:
        """Adds pending step statistics to the running sums; stops on a NaN loss."""
        while self.pending:
            at, epoch, stats = self.pending.pop(0)
            loss_sum, top1_sum, count = stats.tolist()
            if count and not math.isfinite(loss_sum) and not self.cfg["allow_nan"]:
                raise TrainingDivergedError(
                    f"loss became {loss_sum / count} at step {at} (epoch {epoch + 1}); the "
                    "last good checkpoint is kept; lower --lr, or pass --allow-nan"
                )
            self.running["loss_sum"] += loss_sum
            if self.task == "classification":
                self.running["top1_sum"] += top1_sum
            self.running["count"] += int(count)
            self.last_loss = loss_sum / count if count else math.nan

    def checkpoint_and_eval(self, force_eval: bool = False) -> dict[str, float]:
        """Evaluates when due and saves the checkpoint of the current step when due."""
        if self.on_xla:
            xla.sync()  # every replica runs its pending graph (as xm.save does)
        self.read_statistics()
        if self.lock is not None:
            self.lock.check()
        metrics = dict.fromkeys(METRIC_NAMES, math.nan)
        step = self.step
        is_eval = step % self.eval_every == 0 or step == self.total_steps or force_eval
        self.ctx.broadcast_tensors_(self.float_buffers)  # BatchNorm statistics of rank 0
        if is_eval:
            metrics.update(self.evaluate())
        if self.writer is not None and (step in self.save_at or is_eval):
            self.writer.save(step, self.snapshot(metrics))
            self._hook("on_checkpoint", step)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Test metrics and the running training metrics; appended to the history."""
        ctx, step = self.ctx, self.step
        if ctx.distributed and not ctx.agree(
            fingerprint(_state_tensors(self.model, self.optimizer))
        ):
            raise ReplicaMismatchError(
                f"parameters or theory state differ across the {ctx.world_size} "
                f"processes at step {step}; please report this with the command line"
            )
        metrics = dict.fromkeys(METRIC_NAMES, math.nan)
        test = self.data.test
        metrics.update(
            evaluate_model(self.model, test, self.loss_fn, self.device, self.dtype, ctx, self.task)
        )
        running = self.running
        if running["count"] > 0:
            metrics["train_loss"] = running["loss_sum"] / running["count"]
            if self.task == "classification":
                metrics["train_top1"] = running["top1_sum"] / running["count"]
        running.update(loss_sum=0.0, top1_sum=0.0, count=0)
        self.history.append({"step": step, "epoch": step / max(self.steps_per_epoch, 1), **metrics})
        if self.run_dir and ctx.is_master:
            fileio.write_json(self.run.metrics, self.history)
        self._hook("on_evaluation", metrics)
        return metrics

    def snapshot(self, metrics: dict[str, float]) -> dict[str, Any]:
        """The checkpoint of the current step (see `Utils.checkpoint.CHECKPOINT_KEYS`)."""
        spe, step = self.steps_per_epoch, self.step
        epoch, batch = divmod(step, spe) if spe else (0, 0)
        return {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "epoch": epoch,
            "batch": batch,
            "epoch_float": step / spe if spe else 0.0,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "config": self.cfg,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **({"budget": self.budget.state_dict()} if self.budget is not None else {}),
            "param_names": [n for n, _ in self.named],
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "metrics": metrics,
            "running": dict(self.running),
        }

    def _result(self, seconds: float) -> RunResult:
        """Waits for every rank; the result of this process."""
        writer = self.writer
        self.ctx.barrier()
        return RunResult(
            run_dir=self.run_dir,
            steps=self.step,
            metrics=self.last,
            seconds=seconds,
            checkpoints=writer.files_written if writer else 0,
            checkpoint_bytes=writer.bytes_written if writer else 0,
            groups=[g.to_dict() for g in self.groups],
        )

    def _print_summary(self, result: RunResult) -> None:
        """The "done" line with the next command (rank 0)."""
        ctx = self.ctx
        if ctx.is_master:
            procs = f" on {ctx.world_size} processes" if ctx.distributed else ""
            parts = [f"done: {self.step} steps{procs} in {result.seconds:.1f} s"]
            summary = ", ".join(
                f"{k} {v:.4f}" for k, v in self.last.items() if isinstance(v, float) and v == v
            )
            parts += [summary] if summary else []
            if self.run is not None:
                parts += [f"checkpoints in {self.run}; next: {self.run.command('extract.py')}"]
            print("; ".join(parts), file=sys.stderr)


def run_training(
    cfg: dict[str, Any],
    ctx: DistContext,
    given: set[str] | None = None,
    callbacks: list[Callback] | tuple[Callback, ...] = (),
) -> RunResult:
    """The training loop of one process of a run (single, DDP rank or XLA replica).

    Args:
        cfg: the complete, validated config.
        ctx: this process's place in the run (see `Utils.distributed`).
        given: the keys set explicitly (None: every key of `cfg`).
        callbacks: hooks into the loop (see `Callback`).

    Returns:
        A `RunResult`.
    """
    return Trainer(cfg, ctx, given, callbacks).run()


def train(
    config: dict[str, Any] | TrainConfig,
    given: set[str] | None = None,
    callbacks: list[Callback] | tuple[Callback, ...] = (),
) -> RunResult:
    """Trains as train.py does, from a config (missing keys take the flag defaults).

    One process by default; under ``torchrun`` every process calls this and they train
    together (DDP); with ``--device xla``/``--tpu`` it launches the XLA processes itself.

    Args:
        config: flag values with underscores (e.g. ``{"dataset": "synthetic", "lr": 0.1}``),
            or a `TrainConfig`.
        given: the keys the user set explicitly (default: the keys of `config`; every key
            for a `TrainConfig`); on --resume they must agree with the run's config.
        callbacks: hooks into the loop (see `Callback`); under XLA they must pickle.

    Returns:
        A `RunResult` (on ranks other than 0, `checkpoints` is 0: only rank 0 writes).

    Raises:
        UserError: any problem the user can fix (bad value, missing data, existing run...).
    """
    if given is None:
        given = set(config.to_dict() if isinstance(config, TrainConfig) else config)
    cfg = complete(config) if not _resuming(config) else _complete_unchecked(config)
    if xla.uses_xla(cfg):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--device xla starts its own processes; run train.py without torchrun")
        return xla.spawn(functools.partial(run_training, given=given, callbacks=callbacks), cfg)
    device_type = "cuda" if cfg["device"] in ("cuda", "auto") else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        device_type = "cpu"
    ctx = init_from_env(device_type)
    try:
        return run_training(cfg, ctx, given, callbacks)
    finally:
        shutdown(ctx)


def _resuming(config: dict[str, Any] | TrainConfig) -> bool:
    return bool(config.resume if isinstance(config, TrainConfig) else config.get("resume"))


def _complete_unchecked(config: dict[str, Any] | TrainConfig) -> dict[str, Any]:
    """On --resume: the config with defaults; validated once merged with the run's (`plan_run`)."""
    if isinstance(config, TrainConfig):
        return config.to_dict()
    return TrainConfig.from_dict(dict(config)).to_dict()
