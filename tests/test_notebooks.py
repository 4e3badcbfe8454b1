"""The notebooks execute headless from top to bottom (so they cannot rot).

Both run in a "python3" kernel, which jupyter_client starts with the interpreter running the
tests (the repository's .venv); a cell appended here checks that. notebooks/plots.ipynb is
pointed at a tiny real run (train -> extract -> cache) through NM_RUN_DIR.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path

import matplotlib.image as mpimg
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def execute(name: str, env: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """Executes a notebook in its folder, with a last cell that prints the kernel's python."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(
        not c.get("outputs") for c in nb.cells if c.cell_type == "code"
    ), f"{name} is committed with outputs; clear them"
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        ).execute()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    kernel_python = nb.cells[-1].outputs[0]["text"].strip()
    assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable)
    return nb


def images(nb: nbformat.NotebookNode) -> list[np.ndarray]:
    """The PNG outputs of a notebook as arrays [H, W, channels]."""
    out = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                out.append(mpimg.imread(io.BytesIO(base64.b64decode(data["image/png"]))))
    return out


def stream_text(nb: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name")
    )


@pytest.mark.slow
def test_theory_notebook_runs_and_checks_itself():
    nb = execute("theory.ipynb")
    figures = images(nb)
    assert len(figures) == 4
    for image in figures:
        assert image[..., :3].std() > 0.05
    text = stream_text(nb)
    assert "exact recursion: max relative error" in text
    assert "of the damped oscillator" in text


@pytest.mark.slow
def test_plots_notebook_on_a_tiny_run(tmp_path):
    import cache
    import extract
    import train

    where = ["--experiment", "t", "--expid", "nb", "--save-dir", str(tmp_path)]
    train_flags = [
        "--dataset", "synthetic", "--model", "vgg-demo", "--epochs", "1",
        "--train-batch-size", "256", "--save-freq", "4", "--momentum", "0.9", "--wd", "5e-4",
        "--lr", "0.05", "--no-progress",
    ]  # fmt: skip
    assert train.main([*where, *train_flags]) == 0
    assert extract.main([*where, "--no-progress"]) == 0
    assert (
        cache.main([*where, "--no-progress", "--metrics", "scale,rescale,performance,phase"]) == 0
    )
    run = tmp_path / "t" / "nb"
    nb = execute("plots.ipynb", env={"NM_RUN_DIR": str(run)})
    assert f"run {run}" in stream_text(nb)
    assert len(images(nb)) >= 7
    custom = run / "figures" / "scale_custom.png"
    assert custom.exists() and mpimg.imread(str(custom))[..., :3].std() > 0.05
