"""scripts/bench.py: the interleaving helper, the table, the flags, and a --quick smoke run.

No timing assertions: the smoke run only checks that every row of every section is printed
(and written by --out) with its cells filled.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    """scripts/bench.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_script"] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def table_rows(text: str) -> list[list[str]]:
    """Cells of the data rows of the markdown table in `text`."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| # ") and "---" not in line:
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_paired_interleaves_and_alternates_the_order():
    calls: list[str] = []

    def side(name: str, seconds: float):
        def go() -> float:
            calls.append(name)
            return seconds

        return go

    times = bench.paired({"a": side("a", 2.0), "b": side("b", 1.0)}, reps=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert times == {"a": [2.0] * 4, "b": [1.0] * 4}
    calls.clear()
    times = bench.paired({"a": side("a", 2.0), "b": side("b", 1.0)}, reps=2, warmup=0, calls=3)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert times == {"a": [6.0, 6.0], "b": [3.0, 3.0]}  # summed over the calls of a repetition
    stat = bench.ratios([2.0, 3.0, 4.0], [1.0, 1.0, 2.0])
    assert stat.median == 2.0
    assert stat.ratio_text(2) == "2.00x [2.00-3.00]"


def test_paired_takes_wall_time_when_a_side_returns_nothing():
    times = bench.paired({"x": lambda: None}, reps=2, warmup=0)
    assert len(times["x"]) == 2 and all(t >= 0 for t in times["x"])


def test_render_prints_every_row_and_the_header(tmp_path):
    b = bench.Bench(bench.QUICK, tmp_path, bench.torch.device("cpu"))
    b.rows = [
        bench.Row(1, "fc", "1 ms", "0.9 ms", "1.11x [1.0-1.2]", "<= 1.10x", "no", "a|b"),
        bench.Row(6, "demo", "3 s"),
    ]
    text = bench.render(b, {"date": "today", "machine": "m"})
    rows = table_rows(text)
    assert [r[:2] for r in rows] == [["1", "fc"], ["6", "demo"]]
    assert all(len(r) == 8 for r in rows)
    assert rows[0][7] == "a/b"  # a pipe inside a cell would break the table
    assert "- date: today" in text and "- machine: m" in text


def test_flags():
    assert bench.parse_args(["--only", "3,1,3"]).sections == [1, 3]
    assert bench.parse_args([]).sections == sorted(bench.SECTIONS)
    for bad in (["--only", "99"], ["--only", "x"], ["--reps", "1"]):
        with pytest.raises(SystemExit) as info:
            bench.parse_args(bad)
        assert info.value.code == 2


@pytest.mark.slow
def test_quick_run_prints_every_row(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert all(len(r) == 8 for r in rows), rows
    assert not [r for r in rows if "FAILED" in r[1]], rows
    by_section = {s: [r for r in rows if r[0] == str(s)] for s in bench.SECTIONS}
    names_1 = [r[1] for r in by_section[1]]
    assert len(names_1) == 2 * len(bench.STEP_MODELS)  # tracked SGD, then the budget row
    for i, spec in enumerate(bench.STEP_MODELS):
        assert names_1[2 * i].startswith(spec[0])
        assert names_1[2 * i + 1].startswith(spec[0]) and "budget" in names_1[2 * i + 1]
    assert len(by_section[2]) == 3
    assert len(by_section[3]) == len(bench.STEP_MODELS) + 1
    assert len(by_section[4]) == 1
    names_5 = [r[1] for r in by_section[5]]
    assert names_5[0].startswith("extraction vs raw read")
    assert any(n.startswith("cache ") and "per checkpoint" in n for n in names_5)
    assert names_5[-1].startswith("cache.py peak memory")
    assert len(by_section[6]) == 1
    assert len(by_section[7]) == 3 * len(bench.ONLINE_MODELS)  # 2 timings + bytes per model
    for r in by_section[1] + by_section[2] + by_section[3]:
        assert r[4].endswith("]") or r[4].endswith("x"), r  # a ratio in every ratio row
        assert r[6] in ("yes", "no", "-"), r
    assert "- machine:" in proc.stdout and "- libraries:" in proc.stdout
    assert table_rows(out.read_text()) == rows
