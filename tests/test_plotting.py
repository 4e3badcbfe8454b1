"""plot.py and Utils.figures: every figure kind from cache files, run selection, errors, sweep.

Two sets of runs:

* written here with the real cache writer (`Utils.metrics.io.CacheWriter`) in the layouts of
  docs/METRICS.md (fast: run selection, grids, options, the command-line errors);
* one tiny real run (train.py -> extract.py -> cache.py on the synthetic dataset), whose
  checkpoints and features.h5 are deleted before anything is plotted (slow).

A figure counts as drawn when its PNG is non-empty and its pixels are not blank (several
percent of them differ from the background, with a clear spread of values).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest

from Utils import figures as plotting
from Utils.errors import UnknownNameError, UserError
from Utils.metrics.io import CacheWriter, cache_path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def assert_drawn(path: str | Path) -> None:
    """The file is a non-empty PNG with visible content."""
    path = Path(path)
    assert path.exists() and path.stat().st_size > 2000, path
    image = mpimg.imread(str(path))[..., :3]  # [H, W, 3] in [0, 1]
    assert image.shape[0] > 200 and image.shape[1] > 200
    not_white = np.mean(np.any(image < 0.95, axis=-1))
    assert not_white > 0.03, f"{path}: only {not_white:.1%} of the pixels are drawn"
    assert float(image.std()) > 0.05, f"{path} looks blank"


# ----------------------------------------------------------------------------------------
# Runs written with the cache writer


def write_run(root: Path, experiment: str, expid: str, lr: float, wd: float, layers: int = 3):
    """A run folder with hyperparameters.json and conservation, performance and norms caches."""
    run = root / experiment / expid
    run.mkdir(parents=True)
    config = {"lr": lr, "wd": wd, "momentum": 0.9, "expid": expid, "model": "toy", "seed": 1}
    (run / "hyperparameters.json").write_text(json.dumps({"config": config, "environment": {}}))
    rng = np.random.default_rng(0)
    n = 12
    steps = np.arange(n) * 5
    time = steps * lr
    for kind in ("translation", "scale", "rescale"):
        names = ["fc"] if kind == "translation" else [f"conv{i}" for i in range(layers)]
        with CacheWriter(cache_path(str(run), kind), kind) as w:
            w.write("steps", steps)
            w.write("time", time)
            w.write("epoch", steps / 20.0)
            w.write("lr", np.full(n, lr))
            for i, layer in enumerate(names):
                m = 4 + i
                emp = rng.uniform(1, 2, m)[None] * np.exp(-2 * wd * time)[:, None]  # [n, m]
                emp = emp + 0.05 * np.cumsum(rng.uniform(0, 1, (n, m)), axis=0)
                base = f"groups/{kind}/{layer}"
                w.group(base, kind=kind, size=m)
                w.write(f"{base}/empirical", emp)
                w.write(f"{base}/empirical_sum", emp.sum(1))
                w.write(f"{base}/magnitude", np.abs(emp))
                w.write(f"{base}/magnitude_sum", np.abs(emp).sum(1))
                for name, scale in (("exact", 1e-9), ("paper", 1e-3)):
                    theory = emp * (1 + scale * np.linspace(0, 1, n)[:, None])
                    w.write(f"{base}/theory_{name}", theory)
                    w.write(f"{base}/theory_{name}_sum", theory.sum(1))
                    w.write(f"{base}/error_{name}", np.abs(theory - emp) / np.abs(emp))
                    w.write(
                        f"{base}/error_{name}_sum",
                        np.abs(theory.sum(1) - emp.sum(1)) / np.abs(emp).sum(1),
                    )
            w.attrs(kind=kind, layers=names, invalid={}, theory=True, lr=lr, wd=wd)
            w.commit()
    with CacheWriter(cache_path(str(run), "performance"), "performance") as w:
        rows = np.arange(0, n, 3)
        w.write("rows", rows)
        w.write("steps", steps[rows])
        w.write("epoch", steps[rows] / 20.0)
        w.write("metrics/train_loss", np.where(rows == 0, np.nan, 2.3 - 0.1 * rows))
        w.write("metrics/test_loss", 2.4 - 0.1 * rows)
        w.write("metrics/top1", 0.1 + 0.05 * rows)
        w.write("metrics/top5", 0.5 + 0.03 * rows)
        w.commit()
    with CacheWriter(cache_path(str(run), "norms"), "norms") as w:
        w.write("steps", steps)
        names = [f"conv{i}" for i in range(layers)]
        for i, layer in enumerate(names):
            w.write(f"layers/{layer}", (i + 1) * np.exp(-steps / 100.0))
            w.write(f"params/{layer}.weight", (i + 1) * np.exp(-steps / 90.0))
        w.write("total", np.exp(-steps / 100.0) * layers)
        w.attrs(layers=names, params=[f"{layer}.weight" for layer in names])
        w.commit()
    return run


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """save_dir with experiment 'one' (run 'a', and 'bare' without caches) and 'grid' (2 x 2)."""
    root = tmp_path_factory.mktemp("written")
    write_run(root, "one", "a", 0.05, 5e-4)
    write_run(root, "one", "deep", 0.05, 5e-4, layers=11)
    bare = root / "one" / "bare"
    bare.mkdir(parents=True)
    (bare / "hyperparameters.json").write_text(json.dumps({"config": {"lr": 0.1}}))
    for lr in (0.01, 0.1):
        for wd in (0.0, 5e-4):
            write_run(root, "grid", f"lr{lr:g}_wd{wd:g}", lr, wd)
    return root


def test_find_runs_by_list_and_glob(written):
    runs = plotting.find_runs(str(written), "grid", "lr0.1*")
    assert [r.expid for r in runs] == ["lr0.1_wd0", "lr0.1_wd0.0005"]
    runs = plotting.find_runs(str(written), "grid", "lr0.1_wd0,lr0.01_wd0,lr0.1_wd0")
    assert [r.expid for r in runs] == ["lr0.1_wd0", "lr0.01_wd0"]
    with pytest.raises(UserError, match="runs in .*lr0.01_wd0"):
        plotting.find_runs(str(written), "grid", "nope")
    with pytest.raises(UserError, match="matches no run"):
        plotting.find_runs(str(written), "grid", "x*")
    with pytest.raises(UserError, match="no experiment 'zzz'.*grid"):
        plotting.find_runs(str(written), "zzz", "a")


def test_check_metrics_errors(written):
    bare = plotting.find_runs(str(written), "one", "bare")
    with pytest.raises(UserError, match="has no caches; run python cache.py"):
        plotting.check_metrics(bare, None, "")
    a = plotting.find_runs(str(written), "one", "a")
    with pytest.raises(UnknownNameError, match="available: .*performance.*scale"):
        plotting.check_metrics(a, ["phasez"], "")
    assert plotting.check_metrics(a, None, "")[:3] == ["translation", "scale", "rescale"]


def test_grid_layout_rows_lr_columns_wd(written):
    runs = plotting.find_runs(str(written), "grid", "lr*")
    assert plotting.varying_hyperparameters(runs) == ["lr", "wd"]
    cells, rows, cols, how = plotting.grid_layout(runs)
    assert [[c.expid for c in row] for row in cells] == [
        ["lr0.01_wd0", "lr0.01_wd0.0005"],
        ["lr0.1_wd0", "lr0.1_wd0.0005"],
    ]
    assert rows == [r"$\eta$=0.01", r"$\eta$=0.1"] and cols[1] == r"$\lambda$=0.0005"
    assert how == "rows: lr, columns: wd"


def test_single_run_figures_and_options(written, tmp_path):
    opts = dict(save_dir=str(written), experiment="one", expid="a")
    paths = plotting.make_figures(**opts, plot_dir=str(tmp_path / "plain"))
    names = sorted(Path(p).name for p in paths)
    expected = ["norms", "performance", "rescale", "scale", "translation"]
    assert names == sorted(f"{m}.png" for m in expected)
    for p in paths:
        assert_drawn(p)
    options = plotting.Options(layer_wise=True, norm=True, x="time", formats=("png", "pdf"))
    paths = plotting.make_figures(
        **opts,
        metrics=["scale", "norms", "performance"],
        options=options,
        plot_dir=str(tmp_path / "opt"),
    )
    assert sorted(Path(p).name for p in paths) == [
        "norms_layerwise_norm_time.pdf",
        "norms_layerwise_norm_time.png",
        "performance_norm_time.pdf",
        "performance_norm_time.png",
        "scale_layerwise_norm_time.pdf",
        "scale_layerwise_norm_time.png",
    ]
    for p in paths:
        if p.endswith(".png"):
            assert_drawn(p)
        else:
            assert Path(p).read_bytes()[:5] == b"%PDF-"
    assert not [f for f in os.listdir(tmp_path / "opt") if f.startswith(".")]


def test_normalised_curves_start_at_one(written):
    run = plotting.find_runs(str(written), "one", "a")[0]
    fig = plotting.figure_for(run, "scale", plotting.Options(norm=True))
    solid = [line for line in fig.axes[0].lines if line.get_linestyle() == "-"]
    assert len(solid) == 3
    for line in solid:
        assert line.get_ydata()[0] == pytest.approx(1.0)
        assert line.get_ydata()[-1] != pytest.approx(1.0)
    assert fig.axes[1].get_yscale() == "log"


def legend_texts(fig) -> set[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return {t.get_text() for legend in legends for t in legend.get_texts()}


def test_many_layers_use_a_colour_bar(written):
    run = plotting.find_runs(str(written), "one", "deep")[0]
    fig = plotting.figure_for(run, "scale")
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    assert "conv0" not in legend_texts(fig) and "measured" in legend_texts(fig)
    fig = plotting.figure_for(run, "scale", plotting.Options(legend=True))
    assert not any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    assert {"conv0", "conv10", "measured"} <= legend_texts(fig)


def test_grid_figure_of_four_runs(written):
    paths = plotting.make_figures(str(written), "grid", "lr*", metrics=["scale", "performance"])
    assert [Path(p).name for p in paths] == ["scale_grid.png", "performance_grid.png"]
    assert all(Path(p).parent == written / "grid" / "figures" for p in paths)
    for p in paths:
        assert_drawn(p)


# ----------------------------------------------------------------------------------------
# What the figures show (issue 11's review of the figures)


def write_review_run(root: Path, expid: str, wd: float) -> None:
    """A run whose caches hold what the review found drawn badly: an lr drop (x0.2 at step
    50), a translation sum constant to round-off when wd = 0, an error of 1e-16 at step 0,
    evaluations at 5 steps with top-5 at 100%, 14 network parameters, weights and gradients,
    and squared gradient norms spanning decades in one kind only."""
    run = root / "review" / expid
    run.mkdir(parents=True)
    config = {"lr": 0.1, "wd": wd, "momentum": 0.9, "expid": expid, "dtype": "float32"}
    (run / "hyperparameters.json").write_text(json.dumps({"config": config}))
    rng = np.random.default_rng(1)
    n = 20
    steps = np.arange(n) * 5
    lr = np.where(steps < 50, 0.1, 0.02)
    drift = 0.0 if wd == 0 else 0.05
    for kind, layer in (("translation", "fc"), ("rescale", "fc1->fc")):
        with CacheWriter(cache_path(str(run), kind), kind) as w:
            w.write("steps", steps)
            w.write("lr", lr)
            base = f"groups/{kind}/{layer}"
            emp = -0.83 + drift * np.linspace(0, 1, n) + 1e-10 * rng.standard_normal(n)
            w.write(f"{base}/empirical_sum", emp)
            w.write(f"{base}/magnitude_sum", np.full(n, 56.0))
            w.write(f"{base}/theory_exact_sum", emp)
            error = 10.0 ** rng.uniform(-9, -8, n)
            error[0] = 1e-16
            w.write(f"{base}/error_exact_sum", error)
            w.attrs(kind=kind, layers=[layer])
            w.commit()
    with CacheWriter(cache_path(str(run), "performance"), "performance") as w:
        rows = np.arange(0, n, 5)
        w.write("steps", steps[rows])
        w.write("lr", lr[rows])
        w.write("metrics/test_loss", 2.3 - 0.3 * np.arange(4))
        w.write("metrics/top1", 0.1 + 0.2 * np.arange(4))
        w.write("metrics/top5", np.array([0.5, 1.0, 1.0, 1.0]))
        w.commit()
    params = [f"layer{i}.{p}" for i in range(7) for p in ("weight", "bias")]
    with CacheWriter(cache_path(str(run), "network"), "network") as w:
        w.write("steps", steps)
        for p in params:
            w.write(f"params/{p}/values", rng.standard_normal((n, 20)).cumsum(axis=0))
        w.attrs(params=params)
        w.commit()
    with CacheWriter(cache_path(str(run), "weights_grads"), "weights_grads") as w:
        w.write("steps", steps)
        w.write("weights", rng.standard_normal((n, 30)))
        w.write("grads", rng.standard_normal((n, 30)))
        w.attrs(columns=30)
        w.commit()
    with CacheWriter(cache_path(str(run), "gradient"), "gradient") as w:
        w.write("steps", steps)
        w.write("groups/scale/conv/grad_sq_sum", np.logspace(0, -4, n))
        w.write("groups/rescale/fc1->fc/grad_sq_sum", np.linspace(1.0, 1.5, n))
        w.commit()


@pytest.fixture(scope="module")
def review(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("review")
    write_review_run(root, "wd0", 0.0)
    write_review_run(root, "wd5", 5e-4)
    return root


def review_figure(root: Path, metric: str, expid: str = "wd0"):
    return plotting.figure_for(plotting.find_runs(str(root), "review", expid)[0], metric)


def lr_drop_lines(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "-."]


def test_lr_drops_are_marked_on_time_series(review):
    for metric in ("translation", "performance", "gradient", "network", "weights_grads"):
        fig = review_figure(review, metric)
        marked = [ax for ax in fig.axes if lr_drop_lines(ax)]
        assert marked, metric
        assert all(lr_drop_lines(ax) == [50] for ax in marked), metric


def test_grid_of_conservation_runs_has_error_rows(review):
    runs = plotting.find_runs(str(review), "review", "wd*")
    fig = plotting.figure_grid(runs, "translation")
    logs = [ax for ax in fig.axes if ax.get_visible() and ax.get_yscale() == "log"]
    assert len(logs) == 2 and len(fig.axes) == 4


def test_round_off_is_labelled_not_drawn_as_a_failing_theory(review):
    fig = review_figure(review, "translation")
    values, errors = fig.axes[:2]
    lo, hi = values.get_ylim()
    assert hi - lo > 0.01 * 0.83
    assert any("constant to round-off" in t.get_text() for t in values.texts)
    assert any("float32 round-off" in t.get_text() for t in errors.texts)
    labels = [t.get_text() for t in values.get_yticklabels() if t.get_text()]
    assert labels and all(len(t.lstrip("−-").replace(".", "")) <= 5 for t in labels), labels
    drifting = review_figure(review, "translation", "wd5").axes[0]
    assert not any("round-off" in t.get_text() for t in drifting.texts)


def test_error_axis_is_not_stretched_by_the_first_row(review):
    fig = review_figure(review, "rescale")
    assert fig.axes[1].get_ylim()[0] > 1e-12


def test_network_shows_every_parameter_in_distinct_colours(review):
    fig = review_figure(review, "network")
    panels = [ax for ax in fig.axes if ax.get_title().startswith("layer")]
    assert len(panels) == 14
    for ax in panels:
        colours = [line.get_color() for line in ax.lines if line.get_linestyle() == "-"]
        assert len(colours) == 10
        rgb = np.array([matplotlib.colors.to_rgb(c) for c in colours])  # [10, 3]
        gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)[np.triu_indices(10, 1)]
        assert gaps.min() > 0.15, "two weights of a panel have nearly the same colour"


def test_weights_grads_does_not_repeat_the_network_pca(review):
    fig = review_figure(review, "weights_grads")
    assert not [ax for ax in fig.axes if ax.get_xlabel().startswith("PC")]
    assert [ax for ax in review_figure(review, "network").axes if ax.get_xlabel().startswith("PC")]


def test_gradient_panels_share_one_scale(review):
    fig = review_figure(review, "gradient")
    assert {ax.get_yscale() for ax in fig.axes if ax.get_visible()} == {"log"}


def test_performance_marks_evaluations_and_skips_a_saturated_top5(review):
    fig = review_figure(review, "performance")
    ax_loss, ax_acc = fig.axes[:2]
    for ax in (ax_loss, ax_acc):
        drawn = [line for line in ax.lines if line.get_linestyle() != "-."]
        assert drawn and all(line.get_linestyle() == "None" for line in drawn)
    assert "test top-5" not in [line.get_label() for line in ax_acc.lines]
    assert any("top-5" in t for t in legend_texts(fig))


def test_tex_escape_leaves_math_alone():
    text = r"fc_1->out: 50% of $|\theta_A|^2$, |g| < 3 & #5"
    assert plotting.tex_escape(text) == (
        r"fc\_1$\to$out: 50\% of $|\theta_A|^2$, $|$g$|$ $<$ 3 \& \#5"
    )


def run_plot(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, str(ROOT / "plot.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--experiment", "one", "--expid", "nope"], "error: no run ", 1),
        (["--experiment", "one", "--expid", "bare"], "has no caches; run python cache.py", 1),
        (["--experiment", "one", "--expid", "a", "--metrics", "scale,phasez"], "phasez", 2),
        (["--experiment", "one", "--expid", "a", "--format", "png,gif"], "gif", 2),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(written, args, message, code):
    before = sorted(p for p in written.rglob("*") if "figures" in p.parts)
    result = run_plot(*args, "--save-dir", str(written))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(p for p in written.rglob("*") if "figures" in p.parts) == before


def test_cli_use_tex_without_latex_warns_and_plots(written, tmp_path):
    env = dict(os.environ, PATH=str(Path(PY).parent))
    result = run_plot(
        "--experiment", "one", "--expid", "a", "--save-dir", str(written), "--metrics",
        "translation", "--use-tex", "--plot-dir", str(tmp_path), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning: --use-tex: no latex" in result.stderr
    assert result.stdout.split() == [str(tmp_path / "translation.png")]
    assert_drawn(tmp_path / "translation.png")


# ----------------------------------------------------------------------------------------
# scripts/sweep.py


def test_sweep_dry_run_prints_the_grid():
    result = subprocess.run(
        [PY, str(ROOT / "scripts" / "sweep.py"), "--experiment", "g", "--save-dir", "/tmp/s",
         "--lrs", "0.01,0.1", "--wds", "0,5e-4", "--dry-run", "--",
         "--dataset", "synthetic", "--epochs", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    expids = ["lr0.01_wd0", "lr0.01_wd0.0005", "lr0.1_wd0", "lr0.1_wd0.0005"]
    assert len(lines) == 13
    for i, expid in enumerate(expids):
        train, extract, cache = (line.split() for line in lines[3 * i : 3 * i + 3])
        assert train[1].endswith("train.py") and extract[1].endswith("extract.py")
        assert cache[1].endswith("cache.py")
        for cmd in (train, extract, cache):
            where = ["--experiment", "g", "--expid", expid, "--save-dir", "/tmp/s"]
            assert cmd[2:8] == where
        lr, wd = expid[2:].split("_wd")
        assert train[8:] == ["--lr", lr, "--wd", wd, "--dataset", "synthetic", "--epochs", "1"]
    plot = lines[-1].split()
    assert plot[1].endswith("plot.py") and plot[plot.index("--expid") + 1] == ",".join(expids)


def test_sweep_rejects_flags_it_sets():
    result = subprocess.run(
        [PY, str(ROOT / "scripts" / "sweep.py"), "--lrs", "0.1", "--dry-run", "--lr", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--lr is set by the sweep" in result.stderr
    assert result.stdout == ""


# ----------------------------------------------------------------------------------------
# A tiny real run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """save_dir of experiment 't', run 'a' (train -> extract -> cache), with its checkpoints
    and features.h5 deleted so that only caches are left to plot from."""
    import cache
    import extract
    import train

    save = tmp_path_factory.mktemp("real")
    where = ["--experiment", "t", "--expid", "a", "--save-dir", str(save)]
    assert (
        train.main(
            [*where, "--dataset", "synthetic", "--model", "vgg-demo", "--epochs", "2",
             "--train-batch-size", "256", "--save-freq", "4", "--momentum", "0.9",
             "--wd", "5e-4", "--lr", "0.05", "--lr-drops", "1", "--save-buffers",
             "grad,update", "--no-progress"]
        )  # fmt: skip
        == 0
    )
    assert extract.main([*where, "--no-progress"]) == 0
    assert cache.main([*where, "--no-progress"]) == 0
    run = save / "t" / "a"
    shutil.rmtree(run / "ckpt")
    (run / "features.h5").unlink()
    return save


@pytest.mark.slow
def test_real_run_every_figure_is_drawn(real_run):
    import plot

    run = real_run / "t" / "a"
    metrics = sorted(p.stem for p in (run / "cache").glob("*.h5"))
    assert {"translation", "scale", "rescale", "performance", "phase", "network", "budget",
            "equilibrium"} <= set(metrics)  # fmt: skip
    assert plot.main(["--experiment", "t", "--expid", "a", "--save-dir", str(real_run)]) == 0
    figures = sorted(p.stem for p in (run / "figures").glob("*.png"))
    assert figures == metrics
    for name in figures:
        assert_drawn(run / "figures" / f"{name}.png")
    first = (run / "figures" / "scale.png").stat().st_mtime_ns
    assert plot.main(["--experiment", "t", "--expid", "a", "--save-dir", str(real_run),
                      "--metrics", "scale"]) == 0  # fmt: skip
    assert (run / "figures" / "scale.png").stat().st_mtime_ns >= first
    assert not [f for f in os.listdir(run / "figures") if f.startswith(".")]


@pytest.mark.slow
def test_real_run_layer_wise_normalised_time_axis(real_run, tmp_path):
    run = plotting.find_runs(str(real_run), "t", "a")[0]
    options = plotting.Options(layer_wise=True, norm=True, x="time", formats=("png", "pdf"))
    for kind in ("translation", "scale", "rescale"):
        fig = plotting.figure_for(run, kind, options)
        layers = len(plotting.open_cache(run, kind).layers(kind))
        value_axes = [ax for ax in fig.axes if "neuron" in ax.get_title()]
        assert len(value_axes) == layers
        for ax in value_axes:
            assert np.allclose([line.get_ydata()[0] for line in ax.lines[:3]], 1.0)
        paths = plotting.save_figure(fig, str(tmp_path), kind, options.formats)
        assert_drawn(paths[0])
        assert Path(paths[1]).read_bytes()[:5] == b"%PDF-"
    x = plotting.open_cache(run, "performance", x="time").x()
    steps = plotting.open_cache(run, "performance").steps
    assert x[0] == 0 and np.all(np.diff(x) > 0) and x[-1] < steps[-1]


@pytest.mark.slow
def test_real_run_grid_of_copies(real_run):
    """Four copies of the real run with different lr and wd in hyperparameters.json make a
    2 x 2 grid, plotted through the command line."""
    for lr in (0.01, 0.05):
        for wd in (0.0, 5e-4):
            dst = real_run / "t" / f"lr{lr:g}_wd{wd:g}"
            shutil.copytree(real_run / "t" / "a" / "cache", dst / "cache")
            hp = json.loads((real_run / "t" / "a" / "hyperparameters.json").read_text())
            hp["config"].update(lr=lr, wd=wd, expid=dst.name)
            (dst / "hyperparameters.json").write_text(json.dumps(hp))
    result = run_plot(
        "--experiment", "t", "--expid", "lr*", "--save-dir", str(real_run), "--metrics",
        "translation,scale,rescale,phase", "--norm",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = result.stdout.split()
    names = ["translation", "scale", "rescale", "phase"]
    assert written == [str(real_run / "t" / "figures" / f"{m}_grid_norm.png") for m in names]
    for path in written:
        assert_drawn(path)
