"""Bad input through the real command lines: one clear line, non-zero exit, nothing touched.

Every case runs ``python <script> ...`` in a fresh subprocess (the environment a user has: no
warning filters), inside its own copy of a small set of runs, with that copy as the working
directory. Each case must exit with the expected status and print exactly one non-empty line
on stderr that names the problem (and the fix), without a traceback, and the whole directory
(runs, data folder, anything relative to the working directory) must be byte-for-byte and
mtime-for-mtime unchanged afterwards.

The runs are trained and extracted in-process once (synthetic data, logistic model); the
subprocesses run a few at a time, since each spends most of its time importing torch.

The "missing data" cases use CIFAR-10 with an empty or missing ``--data-dir``. The loader tries
a torchvision download first, which fails offline (as in CI); on a machine with internet access
these two cases would download CIFAR-10 instead of failing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from Utils.checkpoint import list_checkpoints
from Utils.extraction import extract_run
from Utils.training import train

ROOT = Path(__file__).resolve().parent.parent

BASE = {
    "dataset": "synthetic",
    "model": "logistic",
    "epochs": 1,
    "train_batch_size": 1024,
    "test_batch_size": 1024,
    "save_freq": 2,
    "no_progress": True,
    "experiment": "t",
}
TRAIN = [
    "--experiment",
    "t",
    "--dataset",
    "synthetic",
    "--model",
    "logistic",
    "--epochs",
    "1",
    "--train-batch-size",
    "1024",
]


@dataclass(frozen=True)
class Case:
    """One bad input: the script, its arguments, the exit status and words the line must hold.

    Arguments may contain ``{save}``, ``{data}`` and ``{ckpt}`` (the step-4 checkpoint of run
    ``a``), filled in with the case's own copy.
    """

    id: str
    script: str
    args: tuple[str, ...]
    code: int
    needles: tuple[str, ...]


def train_case(id: str, args: list[str], code: int, *needles: str, expid: str = "new") -> Case:
    """A train.py case on a fresh expid (``new``) unless told otherwise."""
    return Case(
        id, "train.py", ("--save-dir", "{save}", "--expid", expid, *TRAIN, *args), code, needles
    )


def run_case(id: str, script: str, expid: str, args: list[str], code: int, *needles: str) -> Case:
    """An extract.py / cache.py / plot.py case on one run of the copy."""
    return Case(
        id,
        script,
        ("--save-dir", "{save}", "--experiment", "t", "--expid", expid, *args),
        code,
        needles,
    )


CASES = [
    # unknown names (argparse choices or registries: the valid names are listed)
    train_case("unknown-model", ["--model", "nope"], 2, "--model", "'nope'", "logistic"),
    train_case("unknown-dataset", ["--dataset", "nope"], 2, "--dataset", "synthetic"),
    train_case("unknown-optimizer", ["--optimizer", "nope"], 2, "--optimizer", "custom_sgd"),
    train_case("unknown-loss", ["--loss", "nope"], 2, "--loss", "'ce'"),
    train_case("unknown-buffer", ["--save-buffers", "grad,nope"], 2, "'nope'", "update_norm"),
    run_case("unknown-metric", "cache.py", "ext", ["--metrics", "nope"], 2, "'nope'", "scale"),
    # bad values
    train_case("lr-zero", ["--lr", "0"], 2, "--lr", "> 0"),
    train_case("lr-infinite", ["--lr", "inf"], 2, "--lr", "finite"),
    train_case("momentum-one", ["--momentum", "1"], 2, "--momentum", "[0, 1)"),
    train_case("nesterov-no-momentum", ["--nesterov"], 2, "--nesterov", "--momentum"),
    train_case(
        "nesterov-dampening",
        ["--nesterov", "--momentum", "0.9", "--dampening", "0.5"],
        2,
        "--nesterov",
        "--dampening 0",
    ),
    train_case("batch-size-zero", ["--train-batch-size", "0"], 2, "--train-batch-size", ">= 1"),
    train_case("negative-epochs", ["--epochs", "-1"], 2, "--epochs", ">= 0"),
    train_case("lr-drops-beyond-epochs", ["--lr-drops", "3"], 2, "--lr-drops", "--epochs=1"),
    # missing data
    train_case(
        "empty-data-dir",
        ["--dataset", "cifar10", "--data-dir", "{data}"],
        1,
        "cifar10",
        "missing",
        "data_batch_1",
    ),
    train_case(
        "missing-data-dir",
        ["--dataset", "cifar10", "--data-dir", "{data}/nowhere"],
        1,
        "cifar10",
        "nowhere",
    ),
    # the run folder
    train_case("run-exists", [], 1, "already exists", "--resume", "--overwrite", expid="a"),
    train_case("resume-nothing", ["--resume"], 1, "nothing to resume"),
    train_case("resume-no-hyperparameters", ["--resume"], 1, "hyperparameters.json", expid="nohp"),
    train_case(
        "resume-hyperparameters-not-json", ["--resume"], 1, "hyperparameters.json", expid="hpjunk"
    ),
    train_case(
        "resume-hyperparameters-bad-lr", ["--resume"], 1, "hyperparameters.json", expid="hplr"
    ),
    train_case(
        "resume-hyperparameters-bad-model", ["--resume"], 1, "hyperparameters.json", expid="hpmodel"
    ),
    train_case(
        "restore-other-model",
        ["--model", "fc", "--restore-path", "{ckpt}"],
        1,
        "different model",
        "--model fc",
    ),
    train_case(
        "restore-not-a-checkpoint",
        ["--restore-path", "{save}/t/a/metrics.json"],
        1,
        "--restore-path",
        "checkpoint",
    ),
    # the pipeline out of order, and files of another run
    run_case(
        "extract-before-checkpoints", "extract.py", "nockpt", [], 1, "no checkpoints", "train.py"
    ),
    run_case(
        "extract-truncated-checkpoint",
        "extract.py",
        "trunc",
        [],
        1,
        "step_00000004.pt",
        "--skip-bad",
    ),
    run_case(
        "extract-features-of-other-run", "extract.py", "mix", [], 1, "different run", "--overwrite"
    ),
    run_case("cache-before-extract", "cache.py", "a", [], 1, "features.h5", "extract.py"),
    run_case(
        "cache-features-of-other-run", "cache.py", "mix", [], 1, "different run", "--overwrite"
    ),
    run_case("plot-before-cache", "plot.py", "ext", [], 1, "cache.py"),
]


def build_base(root: Path) -> Path:
    """The runs every case starts from (in `root`/save), plus an empty data folder.

    Runs of experiment ``t``: ``a`` (trained), ``o`` (another seed, extracted), ``ext``
    (trained and extracted), ``mix`` (``a`` holding ``o``'s features.h5), ``nockpt`` (only
    hyperparameters.json), ``trunc`` (its newest checkpoint cut in half), ``nohp`` /
    ``hpjunk`` / ``hplr`` / ``hpmodel`` (``a`` with hyperparameters.json missing, not JSON,
    with lr "abc", with model "nope").
    """
    save = root / "save"
    (root / "data").mkdir(parents=True)
    train({**BASE, "expid": "a", "save_dir": str(save)})
    train({**BASE, "expid": "o", "seed": 5, "save_dir": str(save)})
    train({**BASE, "expid": "ext", "save_dir": str(save)})
    extract_run(str(save / "t" / "o"), progress=False)
    extract_run(str(save / "t" / "ext"), progress=False)
    t = save / "t"
    for name in ("mix", "trunc", "nohp", "hpjunk", "hplr", "hpmodel"):
        shutil.copytree(t / "a", t / name)
    shutil.copy(t / "o" / "features.h5", t / "mix" / "features.h5")
    (t / "nockpt").mkdir()
    shutil.copy(t / "a" / "hyperparameters.json", t / "nockpt" / "hyperparameters.json")
    newest = Path(list_checkpoints(str(t / "trunc"))[-1])
    assert newest.name == "step_00000004.pt"
    with open(newest, "r+b") as fh:
        fh.truncate(newest.stat().st_size // 2)
    (t / "nohp" / "hyperparameters.json").unlink()
    (t / "hpjunk" / "hyperparameters.json").write_text('{"config": {"lr": 0.1,')
    for name, key, value in (("hplr", "lr", "abc"), ("hpmodel", "model", "nope")):
        path = t / name / "hyperparameters.json"
        hp = json.loads(path.read_text())
        hp["config"][key] = value
        path.write_text(json.dumps(hp))
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every folder and file under `root`: path -> (size, mtime in ns), None for folders."""
    out: dict[str, tuple[int, int] | None] = {}
    for folder, _, files in os.walk(root):
        out[os.path.relpath(folder, root)] = None
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


@dataclass
class Outcome:
    """What one case did."""

    returncode: int
    stderr: str
    changed: list[str]


def run_one(case: Case, base: Path, work: Path) -> Outcome:
    """Runs `case` in a fresh copy of `base` and reports its exit, stderr and disk changes."""
    root = work / case.id
    shutil.copytree(base, root, symlinks=True)
    save, data = root / "save", root / "data"
    ckpt = save / "t" / "a" / "ckpt" / "step_00000004.pt"
    args = [a.format(save=save, data=data, ckpt=ckpt) for a in case.args]
    before = snapshot(root)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / case.script), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    after = snapshot(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, 0) != after.get(k, 0))
    return Outcome(proc.returncode, proc.stderr, changed)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Every case's outcome (the subprocesses run a few at a time)."""
    base = build_base(tmp_path_factory.mktemp("bad-input-base"))
    work = tmp_path_factory.mktemp("bad-input-cases")
    workers = max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda c: run_one(c, base, work), CASES))
    return {c.id: r for c, r in zip(CASES, results)}


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(outcomes, case):
    out = outcomes[case.id]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert line.startswith(("error: ", f"{case.script}: error: ")), line
    for needle in case.needles:
        assert needle in line, (needle, line)
    assert out.returncode == case.code, (out.returncode, line)
    assert out.changed == [], out.changed
