"""Benchmark harness (`make bench`): one table of ratios measured side by side in one run.

Sections (``--only 1,3`` selects some):

1. tracked step (TrackingSGD with the theory of every symmetry group) vs torch.optim.SGD step,
   same model, batch and data: fc, fc-bn, the demo conv-BN net (vgg-demo), and the
   tinyimagenet vgg11-bn and resnet18 on 64x64 input; and per model the AdamW step with the
   symmetry-breaking budget (`Utils.budget.BudgetTracker`) vs the plain AdamW step;
2. dense checkpointing: training with ``--save-freq 1`` and ``--save-freq 10`` (and
   ``--save-freq 1 --sync-save``) vs the same run without checkpoints (demo net);
3. checkpoint size: model + optimizer + theory state vs model + optimizer alone, per model,
   and a whole checkpoint file of the demo net (rng states, config, metrics included);
4. data path: in-memory tensor batches vs the per-sample DataLoader path, batches per second;
5. extraction throughput vs raw read throughput of the same checkpoint files, cache time per
   checkpoint per metric, and the peak memory of cache.py for ~10x more checkpoints;
6. end to end: scripts/demo.py (train + extract + cache + plot), seconds per stage;
7. online tracking (Utils/online.py) at every step vs the untracked step, on vgg-demo and
   resnet18 64x64 (torch SGD with and without the tracker, and custom_sgd with the tracker),
   and the bytes online.h5 gains per tracked step vs one checkpoint of the same model. These
   steps are timed in CPU time of this process (one torch thread: its compute), which other
   processes on a shared machine disturb far less than wall time.

Every ratio pairs the two sides repetition by repetition: after warm-up, each repetition runs
A and B alternately (A B, B A, A B, ...: single training steps in section 1, whole runs in
section 2), so that both sides see the same load of a shared machine, and the table gives the
median of the per-repetition ratios with their min-max. Step timings use one torch thread on
both sides. ``--quick`` uses tiny sizes and 2 repetitions (a smoke test: its
numbers mean nothing). ``--out FILE`` also writes the table as markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import io
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SECTIONS = {
    1: "tracked step vs torch.optim.SGD step",
    2: "dense checkpointing vs no checkpoints",
    3: "checkpoint size",
    4: "data path",
    5: "extraction and cache",
    6: "end to end demo",
    7: "online tracking vs untracked step",
}
ONLINE_MODELS = ("vgg-demo", "resnet18 64x64")  # labels in STEP_MODELS

# (label, model, model class, input shape, classes, batch: full, quick)
STEP_MODELS = (
    ("fc", "fc", "default", (1, 28, 28), 10, 128, 8),
    ("fc-bn", "fc-bn", "default", (1, 28, 28), 10, 128, 8),
    ("vgg-demo", "vgg-demo", "default", (1, 28, 28), 10, 128, 8),
    ("vgg11-bn 64x64", "vgg11-bn", "tinyimagenet", (3, 64, 64), 200, 8, 2),
    ("resnet18 64x64", "resnet18", "tinyimagenet", (3, 64, 64), 200, 8, 2),
)
HYPER = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
LARGE_MODEL_REPS = 11  # sections 1, 7: repetitions of the rows whose repetition is one step


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one bench mode.

    Attributes:
        quick: the smoke-test mode.
        reps: timed repetitions per side.
        run_reps: timed repetitions of the whole training runs of section 2 (they cannot be
            interleaved step by step, so more of them keep the median robust on a shared
            machine).
        warmup: untimed repetitions per side first.
        rep_seconds: aimed duration of one side's share of a repetition of section 1: the
            number of alternating training steps per repetition (at least one) is set from
            the time of a first step.
        ckpt_batch: training batch of the checkpointing runs (synthetic data, 4096 samples).
        ckpt_epochs: epochs of the checkpointing runs.
        data_batches: batches per repetition of the data-path timing.
        cache_batch: training batch of the extraction/cache runs (one epoch, --save-freq 1
            vs 10: ~10x more checkpoints).
        train_model: model of the training runs of sections 2, 3 and 5 (the demo net; the
            quick mode uses fc, whose epoch takes a fraction of a second).
        demo_args: extra scripts/demo.py flags.
    """

    quick: bool
    reps: int
    run_reps: int
    warmup: int
    rep_seconds: float
    ckpt_batch: int
    ckpt_epochs: int
    data_batches: int
    cache_batch: int
    train_model: str
    demo_args: tuple[str, ...]


FULL = Sizes(
    quick=False,
    reps=5,
    run_reps=7,
    warmup=1,
    rep_seconds=0.5,
    ckpt_batch=128,
    ckpt_epochs=2,
    data_batches=40,
    cache_batch=32,
    train_model="vgg-demo",
    demo_args=(),
)
QUICK = Sizes(
    quick=True,
    reps=2,
    run_reps=2,
    warmup=1,
    rep_seconds=0.0,
    ckpt_batch=1024,
    ckpt_epochs=1,
    data_batches=3,
    cache_batch=256,
    train_model="fc",
    demo_args=(
        "--dataset=synthetic",
        "--epochs=1",
        "--save-freq=2",
        "--extra=--train-batch-size 1024 --test-batch-size 1024",
    ),
)


@dataclass
class Row:
    """One line of the table.

    Attributes:
        section: section number.
        name: what is measured.
        a: side A (the measured configuration), with its unit.
        b: side B (the baseline), with its unit.
        ratio: median A/B [min-max], or "-" for absolute figures.
        target: the goal, or "-".
        met: "yes", "no" or "-".
        note: details (absolute times, counts).
    """

    section: int
    name: str
    a: str = "-"
    b: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: str = "-"
    note: str = ""


@dataclass
class Stat:
    """Median and range of repeated measurements."""

    values: list[float]

    @property
    def median(self) -> float:
        """Median value."""
        return float(statistics.median(self.values))

    def ratio_text(self, digits: int = 2) -> str:
        """``median [min-max]``."""
        lo, hi = min(self.values), max(self.values)
        return f"{self.median:.{digits}f}x [{lo:.{digits}f}-{hi:.{digits}f}]"


@dataclass
class Bench:
    """State shared by the sections of one bench run.

    Attributes:
        sizes: the mode's sizes.
        work: scratch folder (deleted at the end unless --keep).
        device: torch device of the step and training timings.
        rows: the table so far.
        errors: sections that failed, with the error.
        runs: run folders made by one section for another (name -> path).
        models: section 1's built models, reused by section 3.
    """

    sizes: Sizes
    work: Path
    device: torch.device
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)
    models: dict[str, tuple] = field(default_factory=dict)


# ------------------------------------------------------------------------------ helpers


def paired(
    sides: dict[str, Callable[[], float | None]], reps: int, warmup: int, calls: int = 1
) -> dict[str, list[float]]:
    """Times the sides repetition by repetition, interleaved call by call.

    Each repetition makes `calls` rounds; a round calls every side once, in an order that
    flips from round to round (A B, B A, A B, ...), so that both sides see the same load of a
    shared machine even when it changes within a repetition.

    Args:
        sides: name -> callable; it may return its own measured seconds (e.g. a training
            loop's time), else its wall time is taken.
        reps: timed repetitions.
        warmup: untimed rounds first.
        calls: rounds per repetition (a side's repetition time is the sum over its calls).

    Returns:
        name -> seconds of each repetition (same order for every side, so ratios pair up).
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    flip = 0
    for _ in range(reps):
        total = dict.fromkeys(names, 0.0)
        for _ in range(calls):
            for name in names if flip % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                own = sides[name]()
                total[name] += float(own) if own is not None else time.perf_counter() - t0
            flip += 1
        for name in names:
            times[name].append(total[name])
    return times


def ratios(a: Sequence[float], b: Sequence[float]) -> Stat:
    """Per-repetition ratios a_i / b_i."""
    return Stat([x / y for x, y in zip(a, b)])


def verdict(value: float, limit: float, at_least: bool = False) -> str:
    """ "yes" when value <= limit (>= with at_least), else "no"."""
    ok = value >= limit if at_least else value <= limit
    return "yes" if ok else "no"


def fmt_ms(seconds: float) -> str:
    """Seconds as a millisecond string."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def synchronize(device: torch.device) -> None:
    """Waits for queued device work (CUDA) so that wall times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def serialized_size(obj) -> int:
    """Bytes of `torch.save(obj)`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


@contextlib.contextmanager
def quiet():
    """Silences warnings and stderr chatter of the library (tqdm is off anyway)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stderr(io.StringIO()):
            yield


def machine_info() -> dict[str, str]:
    """CPU, cores, OS and library versions."""
    import h5py
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    gpu = ""
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "gpu": gpu or "none",
        "os": platform.platform(),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, numpy {np.__version__}, h5py {h5py.__version__}",
    }


def load_text() -> str:
    """The 1/5/15-minute load averages."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def train_quiet(cfg: dict):
    """`Utils.training.train` without its messages."""
    from Utils.training import train

    with quiet():
        return train(cfg)


def demo_train_config(bench: Bench, batch: int, epochs: int, **extra) -> dict:
    """Config of a run of the mode's model on synthetic data (evaluated at the first and last
    step only; the data are the demo's shape, 4096 training samples)."""
    return {
        "dataset": "synthetic",
        "model": bench.sizes.train_model,
        "epochs": epochs,
        "train_batch_size": batch,
        "test_batch_size": 1024,
        "lr": 0.05,
        "momentum": 0.9,
        "wd": 5e-4,
        "eval_freq": 10**9,
        "no_progress": True,
        "save_dir": str(bench.work / "runs"),
        "experiment": "bench",
        "overwrite": True,
        "device": bench.device.type,
        "seed": 1,
        **extra,
    }


# ------------------------------------------------------------------ 1. tracked step


def build_step_pair(spec: tuple, batch: int, device: torch.device) -> dict:
    """A model with its groups, an identical twin, and one batch of random data.

    Returns:
        dict with ``model``, ``twin``, ``groups``, ``x`` [B, *shape], ``y`` [B].
    """
    from Models import get_model
    from Utils.symmetry import detect

    _, name, model_class, shape, classes, _, _ = spec
    torch.manual_seed(0)
    model = get_model(name, model_class, shape, classes).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=gen).to(device)  # [B, *shape]
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)  # [B]
    state = copy.deepcopy(model.state_dict())
    groups = detect(model, x, y, loss="ce")
    model.load_state_dict(state)  # detection runs forward passes in train mode
    model.zero_grad(set_to_none=True)
    return {"model": model, "twin": copy.deepcopy(model), "groups": groups, "x": x, "y": y}


def step_reps(sizes: Sizes, steps: int) -> int:
    """Repetitions of a step row (sections 1 and 7): at least `LARGE_MODEL_REPS` when one step
    fills a repetition (large models: a single step's time swings by +-15% on a shared
    machine)."""
    return sizes.reps if sizes.quick or steps > 1 else max(sizes.reps, LARGE_MODEL_REPS)


def _stepper(model, opt, x, y, device: torch.device) -> Callable[[], None]:
    """One training step (zero_grad, forward, cross-entropy, backward, step)."""

    def go() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        synchronize(device)

    return go


def section_step(bench: Bench) -> None:
    """Section 1: tracked step vs torch.optim.SGD step."""
    from Utils.optimizers import build_optimizer

    sizes = bench.sizes
    for spec in STEP_MODELS:
        label = spec[0]
        batch = spec[6] if sizes.quick else spec[5]
        pair = build_step_pair(spec, batch, bench.device)
        tracked = build_optimizer(
            "custom_sgd", list(pair["model"].named_parameters()), groups=pair["groups"], **HYPER
        )
        plain = torch.optim.SGD(pair["twin"].parameters(), **HYPER)
        x, y = pair["x"], pair["y"]
        t0 = time.perf_counter()
        _stepper(pair["twin"], plain, x, y, bench.device)()  # a first step, untimed
        steps = max(1, round(sizes.rep_seconds / (time.perf_counter() - t0)))
        gc.collect()
        times = paired(
            {
                "tracked": _stepper(pair["model"], tracked, x, y, bench.device),
                "sgd": _stepper(pair["twin"], plain, x, y, bench.device),
            },
            step_reps(sizes, steps),
            sizes.warmup,
            calls=steps,
        )
        r = ratios(times["tracked"], times["sgd"])
        extra = (statistics.median(times["tracked"]) - statistics.median(times["sgd"])) / steps
        valid = sum(g.valid for g in tracked.groups)
        params = sum(p.numel() for p in pair["model"].parameters())
        bench.rows.append(
            Row(
                1,
                f"{label} (batch {batch})",
                fmt_ms(statistics.median(times["tracked"]) / steps) + "/step",
                fmt_ms(statistics.median(times["sgd"]) / steps) + "/step",
                r.ratio_text(3),
                "<= 1.10x",
                verdict(r.median, 1.10),
                f"{valid} groups, {params / 1e6:.2f} M params; {steps} step(s) per repetition, "
                f"{step_reps(sizes, steps)} repetitions; "
                f"tracking adds {extra * 1e3:+.2f} ms/step",
            )
        )
        bench.models[label] = (pair["model"], tracked, pair["twin"], plain)
        _budget_row(bench, label, pair, batch, steps)


def _budget_row(bench: Bench, label: str, pair: dict, batch: int, steps: int) -> None:
    """Section 1, second row per model: AdamW with the symmetry-breaking budget vs AdamW."""
    from Utils.budget import BudgetTracker

    sides = {}
    for name in ("budget", "adamw"):
        model = copy.deepcopy(pair["twin"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
        if name == "budget":
            tracker = BudgetTracker(opt, list(model.named_parameters()), pair["groups"])
        sides[name] = _stepper(model, opt, pair["x"], pair["y"], bench.device)
    gc.collect()
    times = paired(sides, step_reps(bench.sizes, steps), bench.sizes.warmup, calls=steps)
    r = ratios(times["budget"], times["adamw"])
    extra = (statistics.median(times["budget"]) - statistics.median(times["adamw"])) / steps
    bench.rows.append(
        Row(
            1,
            f"{label} (batch {batch}): budget, adamw",
            fmt_ms(statistics.median(times["budget"]) / steps) + "/step",
            fmt_ms(statistics.median(times["adamw"]) / steps) + "/step",
            r.ratio_text(3),
            "<= 1.10x",
            verdict(r.median, 1.10),
            f"{len(tracker.groups)} groups; the budget adds {extra * 1e3:+.2f} ms/step",
        )
    )


# ------------------------------------------------------------- 2. dense checkpointing


def section_checkpointing(bench: Bench) -> None:
    """Section 2: training with --save-freq 1 / 10 vs without checkpoints (demo net)."""
    sizes = bench.sizes
    runs = {
        "none": {"expid": ""},
        "freq1": {"expid": "freq1", "save_freq": 1},
        "freq10": {"expid": "freq10", "save_freq": 10},
        "freq1-sync": {"expid": "freq1-sync", "save_freq": 1, "sync_save": True},
    }
    results: dict[str, object] = {}

    def side(name: str) -> Callable[[], float]:
        def go() -> float:
            cfg = demo_train_config(bench, sizes.ckpt_batch, sizes.ckpt_epochs, **runs[name])
            results[name] = train_quiet(cfg)
            return results[name].seconds

        return go

    times = paired({name: side(name) for name in runs}, sizes.run_reps, sizes.warmup)
    base = times["none"]
    steps = results["none"].steps
    labels = {
        "freq1": ("--save-freq 1 (every step)", 1.5),
        "freq10": ("--save-freq 10", 1.05),
        "freq1-sync": ("--save-freq 1 --sync-save", None),
    }
    for name, (label, limit) in labels.items():
        r = ratios(times[name], base)
        res = results[name]
        diffs = [a - b for a, b in zip(times[name], base)]  # paired, per repetition
        extra_ms = statistics.median(diffs) / max(res.checkpoints, 1)
        bench.rows.append(
            Row(
                2,
                f"{sizes.train_model}, {steps} steps, {label}",
                fmt_ms(statistics.median(times[name])),
                fmt_ms(statistics.median(base)),
                r.ratio_text(3),
                f"<= {limit:.2f}x" if limit else "-",
                verdict(r.median, limit) if limit else "-",
                f"{res.checkpoints} files, {res.checkpoint_bytes / 1e6:.1f} MB, "
                f"{extra_ms * 1e3:+.1f} ms per checkpoint (paired median); the loop includes "
                "2 evaluations",
            )
        )
    bench.runs["demo-freq10"] = results["freq10"].run_dir


# ---------------------------------------------------------------- 3. checkpoint size


def _without_theory(optimizer_state: dict) -> dict:
    return {k: v for k, v in optimizer_state.items() if k != "theory"}


def section_size(bench: Bench) -> None:
    """Section 3: checkpoint size with the theory state vs model + optimizer alone."""
    from Utils.checkpoint import list_checkpoints, load_checkpoint
    from Utils.optimizers import build_optimizer

    for spec in STEP_MODELS:
        label = spec[0]
        if label not in bench.models:
            pair = build_step_pair(spec, 2, bench.device)
            opt = build_optimizer(
                "custom_sgd", list(pair["model"].named_parameters()), groups=pair["groups"], **HYPER
            )
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(pair["model"](pair["x"]), pair["y"]).backward()
                opt.step()
            bench.models[label] = (pair["model"], opt, None, None)
        model, opt = bench.models[label][:2]
        state = opt.state_dict()
        with_theory = serialized_size({"model": model.state_dict(), "optimizer": state})
        alone = serialized_size({"model": model.state_dict(), "optimizer": _without_theory(state)})
        ratio = with_theory / alone
        entries = sum(g.size for g in opt.groups if g.valid)
        bench.rows.append(
            Row(
                3,
                f"{label}: model + optimizer + theory",
                f"{with_theory / 1e3:.1f} kB",
                f"{alone / 1e3:.1f} kB",
                f"{ratio:.3f}x",
                "<= 1.05x",
                verdict(ratio, 1.05),
                f"theory: {entries} group entries x 5 float64 fields",
            )
        )
    bench.models.clear()  # section 1 models: free their memory
    run_dir = bench.runs.get("demo-freq10")
    if not run_dir:
        cfg = demo_train_config(bench, 1024, 1, expid="size", save_freq=2)
        run_dir = train_quiet(cfg).run_dir
    path = list_checkpoints(run_dir)[-1]
    ckpt = load_checkpoint(path)
    whole = os.path.getsize(path)
    alone = serialized_size(
        {"model": ckpt["model"], "optimizer": _without_theory(ckpt["optimizer"])}
    )
    ratio = whole / alone
    rng = serialized_size(ckpt["rng"])
    bench.rows.append(
        Row(
            3,
            f"{bench.sizes.train_model}: whole checkpoint file",
            f"{whole / 1e3:.1f} kB",
            f"{alone / 1e3:.1f} kB",
            f"{ratio:.3f}x",
            "-",
            "-",
            f"vs model + optimizer; includes rng states ({rng / 1e3:.1f} kB), config, metrics",
        )
    )


# --------------------------------------------------------------------- 4. data path


def section_data(bench: Bench) -> None:
    """Section 4: in-memory batches vs the per-sample DataLoader path."""
    from Utils.data import get_data
    from Utils.errors import UserError

    sizes = bench.sizes
    name = "fashion-mnist"
    try:
        get_data(name, train_batch_size=128, in_memory=False)
    except UserError:
        name = "synthetic"
    streams = {
        mode: get_data(name, train_batch_size=128, in_memory=mode == "memory", seed=0).train
        for mode in ("memory", "loader")
    }
    n = min(sizes.data_batches, len(streams["memory"]))

    def side(mode: str) -> Callable[[], None]:
        def go() -> None:
            it = iter(streams[mode].epoch(0))
            for _ in range(n):
                x, _ = next(it)
                x.to(bench.device)
            synchronize(bench.device)

        return go

    times = paired({m: side(m) for m in streams}, sizes.reps, sizes.warmup)
    r = ratios(times["loader"], times["memory"])  # speed of memory / speed of loader
    rate = {m: n / statistics.median(t) for m, t in times.items()}
    bench.rows.append(
        Row(
            4,
            f"{name}, batch 128: in-memory vs DataLoader (workers 0)",
            f"{rate['memory']:.0f} batches/s",
            f"{rate['loader']:.0f} batches/s",
            r.ratio_text(1),
            "-",
            "-",
            "ratio = speed-up of the in-memory path",
        )
    )


# ------------------------------------------------------------- 5. extraction and cache


# A small launcher: the peak RSS of a child counts its parent's memory at fork time, so the
# big bench process must not be the parent of the measured command.
_LAUNCHER = (
    "import resource, subprocess, sys; "
    "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory of a command in MB (ru_maxrss of a child of a small launcher)."""
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed ({proc.returncode}): {tail[0][:300]}")
    return int(proc.stdout.split()[-1]) / 1024.0  # Linux reports kB


def section_extraction(bench: Bench) -> None:
    """Section 5: extraction throughput, cache time per checkpoint, cache peak memory."""
    from Utils.extraction import extract_run, measure_throughput
    from Utils.metrics import cache_run

    sizes = bench.sizes
    few = train_quiet(demo_train_config(bench, sizes.cache_batch, 1, expid="few", save_freq=10))
    many = train_quiet(demo_train_config(bench, sizes.cache_batch, 1, expid="many", save_freq=1))
    with quiet():
        for res in (few, many):
            extract_run(res.run_dir, overwrite=True, progress=False)
        got = [measure_throughput(many.run_dir) for _ in range(sizes.reps)]
    ratio = Stat([g["ratio"] for g in got])
    extract_mb_s = statistics.median(g["extract_mb_s"] for g in got)
    read_mb_s = statistics.median(g["read_mb_s"] for g in got)
    load_mb_s = statistics.median(g["load_mb_s"] for g in got)
    copy_mb_s = statistics.median(g["copy_mb_s"] for g in got)
    bench.rows.append(
        Row(
            5,
            f"extraction vs raw read, {got[0]['files']:.0f} checkpoints, {got[0]['mb']:.0f} MB",
            f"{extract_mb_s:.0f} MB/s",
            f"{read_mb_s:.0f} MB/s",
            ratio.ratio_text(3),
            ">= 0.50x",
            verdict(ratio.median, 0.5, at_least=True),
            f"read from the page cache; torch.load alone {load_mb_s:.0f} MB/s, file copy "
            f"{copy_mb_s:.0f} MB/s (extraction = {extract_mb_s / copy_mb_s:.2f}x copy)",
        )
    )
    with quiet():
        statuses = cache_run(many.run_dir, overwrite=True, progress=False)
    for metric, status in statuses.items():
        if status.startswith("skipped"):
            continue
        t0 = time.perf_counter()
        with quiet():
            cache_run(many.run_dir, metrics=[metric], overwrite=True, progress=False)
        per = (time.perf_counter() - t0) / many.checkpoints
        bench.rows.append(
            Row(
                5,
                f"cache {metric}: time per checkpoint",
                f"{per * 1e3:.2f} ms",
                note=f"{many.checkpoints} checkpoints",
            )
        )
    peaks = {}
    for res in (few, many):
        run = Path(res.run_dir)
        cmd = [sys.executable, "cache.py", "--save-dir", str(run.parent.parent)]
        cmd += ["--experiment", run.parent.name, "--expid", run.name]
        peaks[res.checkpoints] = peak_rss_mb([*cmd, "--overwrite", "--no-progress"])
    imports = peak_rss_mb([sys.executable, "-c", "import cache, Utils.metrics, h5py"])
    (n_few, mb_few), (n_many, mb_many) = sorted(peaks.items())
    ratio_mem = mb_many / mb_few
    bench.rows.append(
        Row(
            5,
            f"cache.py peak memory, {n_many} vs {n_few} checkpoints ({n_many / n_few:.1f}x)",
            f"{mb_many:.0f} MB",
            f"{mb_few:.0f} MB",
            f"{ratio_mem:.2f}x",
            "flat (<= 1.10x)",
            verdict(ratio_mem, 1.10),
            f"peak RSS; above the {imports:.0f} MB of the imports alone: "
            f"{mb_many - imports:+.0f} vs {mb_few - imports:+.0f} MB",
        )
    )


# ---------------------------------------------------------------------- 6. end to end


def section_end_to_end(bench: Bench) -> None:
    """Section 6: scripts/demo.py, seconds per stage."""
    save_dir = bench.work / "demo"
    cmd = [sys.executable, "scripts/demo.py", "--save-dir", str(save_dir), *bench.sizes.demo_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"demo.py failed ({proc.returncode}): {tail[0][:300]}")
    stages = re.findall(r"(train|extract|cache|plot) (\d+) s", proc.stdout)
    what = "demo (fashion-mnist, 2 epochs)" if not bench.sizes.quick else "demo (quick)"
    bench.rows.append(
        Row(
            6,
            f"{what}: train + extract + cache + plot",
            f"{seconds:.0f} s",
            note=", ".join(f"{k} {v} s" for k, v in stages),
        )
    )


# ----------------------------------------------------------------- 7. online tracking


def _cpu_timed(fn: Callable[[], None]) -> Callable[[], float]:
    """`fn` returning the CPU time of this process it took (seconds)."""

    def go() -> float:
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    return go


def section_online(bench: Bench) -> None:
    """Section 7: online tracking every step vs the untracked step; bytes per tracked step."""
    from Utils.online import Tracker, online_path
    from Utils.optimizers import build_optimizer

    sizes = bench.sizes
    for spec in [s for s in STEP_MODELS if s[0] in ONLINE_MODELS]:
        label = spec[0]
        batch = spec[6] if sizes.quick else spec[5]
        pair = build_step_pair(spec, batch, bench.device)
        third = copy.deepcopy(pair["twin"])
        x, y = pair["x"], pair["y"]
        plain = torch.optim.SGD(pair["twin"].parameters(), **HYPER)
        sgd_tracked = torch.optim.SGD(third.parameters(), **HYPER)
        custom = build_optimizer(
            "custom_sgd", list(pair["model"].named_parameters()), groups=pair["groups"], **HYPER
        )
        slug = label.split()[0]
        trackers = {
            "sgd": Tracker(
                third, sgd_tracked, pair["groups"], run_dir=str(bench.work / f"online-sgd-{slug}")
            ),
            "custom": Tracker(
                pair["model"], custom, run_dir=str(bench.work / f"online-custom-{slug}")
            ),
        }
        t0 = time.perf_counter()
        _stepper(pair["twin"], plain, x, y, bench.device)()  # a first step, untimed
        steps = max(1, round(sizes.rep_seconds / (time.perf_counter() - t0)))
        gc.collect()
        times = paired(
            {
                "sgd+online": _cpu_timed(_stepper(third, sgd_tracked, x, y, bench.device)),
                "custom+online": _cpu_timed(_stepper(pair["model"], custom, x, y, bench.device)),
                "sgd": _cpu_timed(_stepper(pair["twin"], plain, x, y, bench.device)),
            },
            step_reps(sizes, steps),
            sizes.warmup,
            calls=steps,
        )
        for tracker in trackers.values():
            tracker.close()
        base = statistics.median(times["sgd"]) / steps
        for side, what in (
            ("sgd+online", "torch SGD + online tracking every step"),
            ("custom+online", "custom_sgd + online tracking every step"),
        ):
            r = ratios(times[side], times["sgd"])
            extra = statistics.median(times[side]) / steps - base
            bench.rows.append(
                Row(
                    7,
                    f"{label} (batch {batch}): {what}",
                    fmt_ms(statistics.median(times[side]) / steps) + "/step",
                    fmt_ms(base) + "/step",
                    r.ratio_text(3),
                    "<= 1.10x",
                    verdict(r.median, 1.10),
                    f"CPU time; vs torch SGD untracked; {len(pair['groups'])} groups; {steps} "
                    f"step(s) per repetition, {step_reps(sizes, steps)} repetitions; adds {extra * 1e3:+.2f} ms/step",
                )
            )
        tracker = trackers["custom"]
        path = online_path(tracker.run_dir)
        rows = tracker.step + 1
        file_bytes = os.path.getsize(path)
        row_bytes = sum(int(v.nbytes) for v in tracker.last_row().values.values())
        ckpt = serialized_size(
            {"model": pair["model"].state_dict(), "optimizer": custom.state_dict()}
        )
        ratio = row_bytes / ckpt
        entries = sum(g.size for g in tracker.groups)
        bench.rows.append(
            Row(
                7,
                f"{label}: online.h5 bytes per tracked step vs one checkpoint",
                f"{row_bytes / 1e3:.1f} kB",
                f"{ckpt / 1e3:.1f} kB",
                f"{ratio * 100:.3f}%",
                "<= 1%",
                verdict(ratio, 0.01),
                f"custom_sgd: {entries} group entries x ({len(tracker.last_row().values)} "
                f"datasets); file {file_bytes / 1e3:.1f} kB for {rows} rows (chunks of 64 rows "
                "are allocated at once)",
            )
        )


SECTION_FUNCTIONS = {
    1: section_step,
    2: section_checkpointing,
    3: section_size,
    4: section_data,
    5: section_extraction,
    6: section_end_to_end,
    7: section_online,
}

# ------------------------------------------------------------------------------ output


def render(bench: Bench, header: dict[str, str]) -> str:
    """The markdown report: header lines and one table."""
    lines = [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        "",
        "| # | measurement | A | B (baseline) | A/B median [min-max] | target | met | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in bench.rows:
        cells = (str(r.section), r.name, r.a, r.b, r.ratio, r.target, r.met, r.note)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    for err in bench.errors:
        lines.append(f"\nerror: {err}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of the bench."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 60 s)")
    p.add_argument("--only", default="", help="comma list of sections, e.g. 1,3 (default all)")
    p.add_argument("--out", default="", help="also write the markdown table to this file")
    p.add_argument(
        "--reps",
        type=int,
        default=0,
        help="timed repetitions (default 5, training runs of section 2: 7; quick 2)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device")
    p.add_argument("--work-dir", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args(argv)
    try:
        args.sections = sorted({int(s) for s in args.only.split(",") if s.strip()}) or sorted(
            SECTIONS
        )
    except ValueError:
        p.error(f"--only takes section numbers 1-7 separated by commas, got {args.only!r}")
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"--only: no section {bad[0]}; sections are 1-7")
    if args.reps < 0 or args.reps == 1:
        p.error("--reps must be >= 2 (a median of one repetition has no spread)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the selected sections and prints the table; returns the exit status."""
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.reps:
        sizes = Sizes(**{**sizes.__dict__, "reps": args.reps, "run_reps": args.reps})
    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="nm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(sizes, work, torch.device(args.device))
    info = machine_info()
    load_before = load_text()
    started = time.perf_counter()
    try:
        for s in args.sections:
            t0 = time.perf_counter()
            print(f"[{s}] {SECTIONS[s]} ...", file=sys.stderr, flush=True)
            try:
                SECTION_FUNCTIONS[s](bench)
            except Exception as exc:  # one failed section must not hide the others
                traceback.print_exc(file=sys.stderr)
                bench.errors.append(f"section {s} ({SECTIONS[s]}): {type(exc).__name__}: {exc}")
                bench.rows.append(Row(s, f"{SECTIONS[s]}: FAILED", note=str(exc)[:200]))
            print(f"[{s}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{info['cpu']}; GPU: {info['gpu']}; {info['os']}",
        "libraries": info["versions"],
        "mode": f"{'quick' if sizes.quick else 'full'}: {sizes.reps} repetitions "
        f"({sizes.run_reps} for the training runs of section 2) after {sizes.warmup} warm-up "
        f"per side, interleaved; torch threads 1; device {args.device}",
        "load average (1/5/15 min)": f"{load_before} before, {load_text()} after "
        f"({time.perf_counter() - started:.0f} s)",
    }
    text = render(bench, header)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
