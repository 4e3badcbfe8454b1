"""The project builds into a wheel (offline) whose packages and console scripts work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SOURCES = ("pyproject.toml", "README.md", "requirements.txt", "Models", "Utils", "nm_commands.py")
SCRIPTS = ("train", "extract", "cache", "plot")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, request) -> Path:
    """A wheel built from a copy of the sources (so no build/ folder lands in the checkout)."""
    root = Path(request.config.rootpath)
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES + tuple(f"{s}.py" for s in SCRIPTS):
        path = root / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    done = subprocess.run([*cmd, str(src), "-w", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (found,) = out.glob("neural_mechanics-*.whl")
    return found


def test_wheel_holds_packages_scripts_and_entry_points(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "Models/__init__.py",
        "Models/registry.py",
        "Utils/__init__.py",
        "nm_commands.py",
        "Utils/api.py",
        "Utils/online.py",
        "Utils/metrics/__init__.py",
        "Utils/metrics/conservation.py",
        "Utils/figures/__init__.py",
    ):
        assert module in names, module
    for script in SCRIPTS:
        assert f"{script}.py" in names
    assert not any(n.startswith(("tests/", "scripts/", "notebooks/")) for n in names)
    (entry,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry).decode()
    for script in SCRIPTS:
        assert f"nm-{script} = nm_commands:{script}" in text
    (meta,) = [n for n in names if n.endswith("METADATA")]
    assert "Requires-Dist: torch>=" in zipfile.ZipFile(wheel).read(meta).decode()


@pytest.mark.slow
def test_installed_console_scripts_run_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
    done = subprocess.run(
        [*cmd, "--target", str(target), str(wheel)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    for script in SCRIPTS:
        run = subprocess.run(
            [str(target / "bin" / f"nm-{script}"), "--help"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert "usage:" in run.stdout
    # a bad flag value is one line and exit 2, as with `python train.py`
    bad = subprocess.run(
        [str(target / "bin" / "nm-train"), "--lr", "-1"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    api = subprocess.run(
        [sys.executable, "-c", "import Utils.api as a; print(a.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert api.returncode == 0 and str(target) in api.stdout, api.stderr


def test_editable_install_builds(tmp_path, request):
    """`pip install -e .`: the PEP 660 editable wheel maps the packages to the checkout."""
    root = Path(request.config.rootpath)
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES + tuple(f"{s}.py" for s in SCRIPTS):
        path = root / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    code = (
        "import sys; from setuptools import build_meta as b; print(b.build_editable(sys.argv[1]))"
    )
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (found,) = out.glob("*.editable-*.whl")
    names = zipfile.ZipFile(found).namelist()
    assert any(n.endswith(".pth") for n in names)
    mapped = "".join(zipfile.ZipFile(found).read(n).decode() for n in names if n.endswith(".py"))
    for package in ("Models", "Utils"):
        assert str(src / package) in mapped  # the import finder maps the packages to src
    (entry,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "nm-train = nm_commands:train" in zipfile.ZipFile(found).read(entry).decode()
