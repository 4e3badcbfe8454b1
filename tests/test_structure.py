"""The shape of the code: no import cycles, the library never imports the CLI module, short
functions in the training modules, and train.py's flags built from `TrainConfig`."""

from __future__ import annotations

import ast
from pathlib import Path

from Utils import config
from Utils.flags import given_flags, train_parser

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("Utils", "Models")
SCRIPTS = ("train.py", "extract.py", "cache.py", "plot.py")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for the library packages and the scripts."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    for name in SCRIPTS:
        modules[name[:-3]] = ROOT / name
    return modules


def top_level_imports(path: Path, modules: dict[str, Path], lazy: bool = False) -> set[str]:
    """Project modules imported by one file at module level (with `lazy`: anywhere)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    nodes = list(ast.walk(tree)) if lazy else list(tree.body)
    while nodes:  # module level, including inside if/try blocks
        node = nodes.pop()
        if isinstance(node, (ast.If, ast.Try)) and not lazy:
            nodes += node.body + node.orelse + getattr(node, "finalbody", [])
            nodes += [n for h in getattr(node, "handlers", []) for n in h.body]
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph ([] when there is none)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """Module -> project modules it imports (a package's own __init__ aside).

    Args:
        lazy: count imports inside functions too.
    """
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        imported = top_level_imports(path, modules, lazy)
        graph[name] = {m for m in imported if m != name and not name.startswith(m + ".")}
    return graph


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_project_modules():
    graph = import_graph()
    assert "Utils.training" in graph and "Utils.xla" in graph["Utils.training"]
    assert find_cycle(graph) == []


def test_no_import_cycle_even_through_imports_inside_functions():
    """training -> xla -> training and distributed <-> xla were cycles through lazy imports."""
    assert find_cycle(import_graph(lazy=True)) == []


def test_library_never_imports_the_command_line_module():
    graph = import_graph()
    library = [m for m in graph if m.startswith(PACKAGES)]
    assert [m for m in library if "Utils.flags" in graph[m]] == []
    for name, path in project_modules().items():  # lazy imports too
        if name.startswith(PACKAGES):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                assert "Utils.flags" not in names, name


def test_training_functions_are_short():
    """No function of the training modules exceeds 120 lines."""
    for name in ("training", "checkpoint", "config", "rundir", "flags", "xla", "distributed"):
        tree = ast.parse((ROOT / "Utils" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 120, (name, node.name, length)


def test_train_flags_come_from_the_config():
    parser = train_parser()
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    assert flags == {f.name for f in config.CONFIG_FIELDS}
    assert vars(parser.parse_args([])) == config.defaults()
    assert given_flags(["--lr", "0.5", "--resume"]) == {"lr": 0.5, "resume": True}
    assert config.MACHINE_KEYS >= {"data_dir", "model_dir", "device", "workers", "save_dir"}
    assert config.RESUMABLE_KEYS == {"epochs"}
