"""docs/EXTENDING.md's worked example works: its metric file and figure file, loaded as
modules of Utils.metrics and Utils.figures, are computed by cache_run and drawn by
make_figures for a real run (in a child process, so the registries of other tests stay as
they are)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import re, sys, types
import h5py, numpy as np

save = sys.argv[1]
text = open("docs/EXTENDING.md").read()
blocks = re.findall(r"```python\n(.*?)```", text, re.S)
assert len(blocks) == 2, len(blocks)
import Utils.figures, Utils.metrics
for name, code in zip(("Utils.metrics.max_abs", "Utils.figures.max_abs"), blocks):
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(code, name, "exec"), module.__dict__)

from Utils.figures import make_figures
from Utils.metrics import cache_run, load_cache

run = f"{save}/t/x"
assert cache_run(run, metrics="max_abs", progress=False) == {"max_abs": "computed"}
cache = load_cache(f"{run}/cache/max_abs.h5")
with h5py.File(f"{run}/features.h5", "r") as f:
    for p in f["params"]:
        if p in cache["params"]:
            ref = [np.abs(row.astype(np.float64)).max() for row in f["params"][p][()]]
            assert np.array_equal(cache["params"][p], ref), p
print("\n".join(make_figures(save, "t", "x", metrics=["max_abs"])))
"""


@pytest.mark.slow
def test_extending_example_is_one_metric_file_and_one_figure_file(tmp_path):
    import extract
    import train

    where = ["--experiment", "t", "--expid", "x", "--save-dir", str(tmp_path)]
    assert train.main(
        [*where, "--dataset", "synthetic", "--model", "fc", "--epochs", "1",
         "--train-batch-size", "256", "--save-freq", "4", "--no-progress"]
    ) == 0  # fmt: skip
    assert extract.main([*where, "--no-progress"]) == 0
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "t" / "x" / "figures" / "max_abs.png")]
    image = mpimg.imread(result.stdout.strip())[..., :3]
    assert image.std() > 0.05
