"""The layers point one way: library <- runner <- experiments <- CLI.

Read from the source (the AST), so an import hidden inside a function or behind
``TYPE_CHECKING`` counts like any other: those are how circles hide.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "music"
LAYERS = {"library": 0, "runner": 1, "experiments": 2, "cli": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    if module in ("music.cli", "music.__main__"):
        return LAYERS["cli"]
    if module == "music.runner":
        return LAYERS["runner"]
    if module == "music.experiments" or module.startswith("music.experiments."):
        return LAYERS["experiments"]
    return LAYERS["library"]


def imports(tree: ast.Module, module: str) -> list[tuple[ast.AST, str]]:
    """Every ``music.*`` module imported anywhere in ``tree``, relative imports resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names if a.name.split(".")[0] == "music"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module if module_is_package(module) else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                target = ".".join(filter(None, [package, node.module]))
            else:
                target = node.module or ""
            if target.split(".")[0] == "music":
                found.append((node, target))
    return found


def module_is_package(module: str) -> bool:
    return (PACKAGE.parent / Path(*module.split(".")) / "__init__.py").exists()


def nested_imports(tree: ast.Module) -> set[int]:
    """Ids of import nodes inside a function or an ``if TYPE_CHECKING:`` block."""
    nested: set[int] = set()
    for node in ast.walk(tree):
        inside = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside = True
        if inside:
            nested |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return nested


def graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = {}
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        nested = nested_imports(tree)
        edges[module] = set()
        for node, target in imports(tree, module):
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if id(node) in nested:
                problems.append(f"{where}: imports {target} inside a function or TYPE_CHECKING")
            if layer(target) > layer(module):
                problems.append(f"{where}: {module} imports {target}, a layer above it")
            edges[module].add(target)
    return edges, problems


def resolve(target: str, modules: set[str]) -> str | None:
    """``music.methods.EWC`` (a name in a package) -> ``music.methods``."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import circles between modules; a package's ``__init__`` importing its own submodules,
    and submodules importing siblings through it, are Python's normal package loading."""
    modules = set(edges)
    graph_ = {m: {t for t in (resolve(x, modules) for x in targets) if t and t != m and not m.startswith(t + ".")}
              for m, targets in edges.items()}
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph_[m]):
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph_):
        if m not in state:
            visit(m, [m])
    return found


def test_layers_point_one_way_without_hidden_imports():
    _, problems = graph()
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    edges, _ = graph()
    assert not cycles(edges), "\n".join(" -> ".join(c) for c in cycles(edges))


def test_the_checker_sees_a_circle_and_an_upward_import():
    assert cycles({"music.a": {"music.b"}, "music.b": {"music.a"}})
    assert layer("music.cli") > layer("music.experiments.study") > layer("music.runner") > layer("music.data")
    tree = ast.parse("def f():\n    from music import cli\n")
    assert nested_imports(tree)


def test_the_library_imports_no_experiment_or_cli():
    code = ("import sys, music.data, music.module; "
            "print(sorted(m for m in sys.modules if m.startswith(('music.experiments', 'music.cli', 'music.runner'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "[]", out
