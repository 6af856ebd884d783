"""The package's shape: imports run one way (no cycles, imports inside functions and under
TYPE_CHECKING included), and every module is short enough to read in one sitting.

The import graph is read from the source (`ast`), not from `sys.modules`, so an import hidden in a
function body counts as much as one at the top: either way one module needs the other, and a
cycle between them is a layering that only works by accident of import order.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "carajax"

# Imports allowed to close a cycle, as (importer, imported). Each is a known debt with its issue;
# the test fails once one no longer exists, so the list only shrinks.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()

MAX_LINES = 450
# Modules allowed past MAX_LINES until they are split; the test fails once one fits, so the list
# only shrinks.
LONG_MODULES = {
    "carajax/engine/engine.py",
    "carajax/engine/planner.py",
    "carajax/engine/runner.py",
    "carajax/lora/cpu_assist.py",
    "carajax/lora/kernels.py",
    "carajax/sched/profiler.py",
    "carajax/sched/router.py",
    "carajax/server/router.py",
}


def modules(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (its file, whether it is a package's __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {module it imports: the line of the first such import}, within the package.

    `from a.b import c` is an import of `a.b.c` when that is a module, else of `a.b` (c is a name
    in it); relative imports are resolved against the importing module's package. Importing a
    submodule also runs its parents' __init__, which is not counted: `carajax/__init__.py` is
    the public face that re-exports the layers, not a layer."""
    mods = modules(root)
    top = root.name

    def known(name: str) -> str | None:  # the longest prefix that is one of the package's modules
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    def imported(tree: ast.AST, package: str):  # (module, line) of each import of the package
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == top:
                        yield known(alias.name), node.lineno
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = parts[:len(parts) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] == top:
                    for alias in node.names:
                        sub = f"{source}.{alias.name}"
                        yield (sub if sub in mods else known(source)), node.lineno

    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in mods.items():
        package = name if is_package else name.rpartition(".")[0]
        deps = graph[name] = {}
        for target, line in imported(ast.parse(path.read_text(), str(path)), package):
            if target is not None and target != name:
                deps[target] = min(line, deps.get(target, line))
    return graph


def cycles(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    pkg = tmp_path / "carajax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from carajax.sub import high\n")
    (pkg / "sub" / "high.py").write_text("from .. import low\nfrom . import other\n")
    (pkg / "sub" / "other.py").write_text("import carajax.low\nfrom carajax.low import f\n")
    graph = import_graph(pkg)
    assert graph["carajax.low"] == {"carajax.sub.high": 2}
    assert graph["carajax.sub.high"] == {"carajax.low": 1, "carajax.sub.other": 2}
    assert graph["carajax.sub.other"] == {"carajax.low": 1}
    # low -> high -> other -> low: one cycle of three, found although one import is in a function.
    assert cycles(graph) == [["carajax.low", "carajax.sub.high", "carajax.sub.other"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def reaches(graph: dict[str, Iterable[str]], start: str, goal: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        for d in graph.get(todo.pop(), ()):
            if d == goal:
                return True
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return False


def test_no_import_cycles():
    graph = import_graph()
    pruned = {m: {d for d in deps if (m, d) not in KNOWN_CYCLE_EDGES} for m, deps in graph.items()}
    found = cycles(pruned)
    where = [f"{m} -> {d}  ({m.replace('.', '/')}.py:{graph[m][d]})"
             for c in found for m in c for d in sorted(graph[m]) if d in c]
    assert not found, "import cycles (a lower module imports a higher one):\n" + "\n".join(where)
    # Each known edge must still close a cycle (its target reaches back to its importer);
    # once it does not, it is no debt any more.
    paid = sorted(e for e in KNOWN_CYCLE_EDGES
                  if e[1] not in graph.get(e[0], {}) or not reaches(graph, e[1], e[0]))
    assert not paid, f"no longer in a cycle: drop them from KNOWN_CYCLE_EDGES: {paid}"


def test_modules_are_short():
    lengths = {p.relative_to(PACKAGE.parent).as_posix(): len(p.read_text().splitlines())
               for p in PACKAGE.rglob("*.py")}
    long = {p: n for p, n in lengths.items() if n > MAX_LINES}
    new = {p: n for p, n in long.items() if p not in LONG_MODULES}
    assert not new, f"over {MAX_LINES} lines, split them by concept (../shared/style.md): {new}"
    fits = sorted(p for p in LONG_MODULES if lengths.get(p, 0) <= MAX_LINES)
    assert not fits, f"now at most {MAX_LINES} lines (or gone): drop them from LONG_MODULES: {fits}"
