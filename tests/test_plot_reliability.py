"""plot.py and cache.py against damaged and unusual runs: real processes, real files, signals.

* A run trained with ``--allow-nan`` whose weights became NaN/Inf is plotted with one warning
  line (the rows are left out of the trajectory's PCA), not a LinAlgError traceback.
* A cache file with changed bytes is found damaged: cache.py recomputes it instead of calling
  it "up to date", and plot.py refuses it with one line before writing anything.
* A plot.py killed (SIGKILL) while writing a figure leaves a temporary file that the next
  plot.py removes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    """Runs one of the repository's scripts and returns its completed process."""
    return subprocess.run(
        [PY, str(ROOT / name), *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def where(save: Path, expid: str = "nan") -> list[str]:
    return ["--experiment", "t", "--expid", expid, "--save-dir", str(save)]


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Path:
    """save_dir of run t/nan: fc on synthetic data with lr 1e4 and --allow-nan, so that its
    weights overflow to Inf/NaN after the first checkpoints; extracted and cached."""
    save = tmp_path_factory.mktemp("nan")
    train = script(
        "train.py", *where(save), "--dataset", "synthetic", "--model", "fc", "--epochs", "1",
        "--train-batch-size", "256", "--save-freq", "2", "--lr", "1e4", "--allow-nan",
        "--no-progress",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert script("extract.py", *where(save), "--no-progress").returncode == 0
    cache = script("cache.py", *where(save), "--no-progress", "--metrics", "network,norms")
    assert cache.returncode == 0, cache.stderr
    return save


def copy_run(save: Path, tmp_path: Path) -> Path:
    """A copy of the run's save_dir (each test damages its own)."""
    dst = tmp_path / "save"
    shutil.copytree(save, dst)
    return dst


def hidden(folder: Path) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.startswith(".")) if folder.exists() else []


def test_allow_nan_run_plots_with_one_warning(nan_run, tmp_path):
    with h5py.File(nan_run / "t" / "nan" / "cache" / "network.h5", "r") as f:
        values = f["params/fc1.weight/values"][()]
    assert not (values == values).all(), "the run did not diverge; raise its lr"
    result = script("plot.py", *where(nan_run), "--plot-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NaN or Inf" in lines[0] and "network.h5" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["network.png", "norms.png"]


def flip_bytes(path: Path, dataset: str) -> None:
    """Inverts 8 bytes in the middle of a dataset's stored data (its structure stays intact)."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        if ds.chunks:
            info = ds.id.get_chunk_info(0)
            offset, size = info.byte_offset, info.size
        else:
            offset, size = ds.id.get_offset(), ds.id.get_storage_size()
    with open(path, "r+b") as fh:
        fh.seek(offset + size // 2 - 4)
        chunk = fh.read(8)
        fh.seek(offset + size // 2 - 4)
        fh.write(bytes(b ^ 0xFF for b in chunk))


def test_damaged_cache_is_refused_by_plot_and_rebuilt_by_cache(nan_run, tmp_path):
    save = copy_run(nan_run, tmp_path)
    path = save / "t" / "nan" / "cache" / "norms.h5"
    flip_bytes(path, "total")
    with h5py.File(path, "r") as f:  # still opens: only the data changed
        assert f.attrs["metric"] == "norms"
    figures = tmp_path / "figures"
    result = script("plot.py", *where(save), "--metrics", "norms", "--plot-dir", str(figures))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and "norms.h5" in lines[0] and "damaged" in lines[0], lines
    assert "cache.py" in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == "" and not figures.exists()
    cache = script("cache.py", *where(save), "--no-progress", "--metrics", "norms")
    assert cache.returncode == 0, cache.stderr
    assert cache.stdout.startswith("norms  computed (the old file was damaged: dataset /total")
    again = script("cache.py", *where(save), "--no-progress", "--metrics", "norms")
    assert again.stdout.splitlines()[0].split() == ["norms", "up", "to", "date"]
    result = script("plot.py", *where(save), "--metrics", "norms", "--plot-dir", str(figures))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert (figures / "norms.png").exists()


# plot.py whose figure writer stalls after the first bytes (so that it can be killed there).
STALLING_PLOT = """
import runpy, sys, time
from matplotlib.figure import Figure

def stall(self, f, **kwargs):
    f.write(b"partial")
    f.flush()
    time.sleep(600)

Figure.savefig = stall
sys.argv = ["plot.py", *sys.argv[1:]]
runpy.run_path("plot.py", run_name="__main__")
"""


def test_killed_plot_leaves_temporaries_that_the_next_run_removes(nan_run, tmp_path):
    figures = tmp_path / "figures"
    args = [*where(nan_run), "--metrics", "norms", "--plot-dir", str(figures)]
    proc = subprocess.Popen(
        [PY, "-c", STALLING_PLOT, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, MPLBACKEND="Agg"),
    )
    try:
        deadline = time.monotonic() + 120
        while not hidden(figures) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert hidden(figures), "plot.py never started writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert hidden(figures)[0].startswith(".norms.png.")
    result = script("plot.py", *args)
    assert result.returncode == 0, result.stderr
    assert hidden(figures) == []
    assert sorted(os.listdir(figures)) == ["norms.png"]
