"""vpeft's layers hold and nothing imports in a circle.

The layers are stated in pyproject.toml (``[tool.importlinter]``) and checked by ``lint-imports``.
A layers contract allows imports inside a layer, so the cycle check is separate: the import graph
grimp builds (the one import-linter reads; it sees imports inside functions too, so a function-level
import that dodges a cycle at run time is still a cycle here) must have none between vpeft's modules.
Both checks are also run on small packages that break them, so a check that cannot fail would show.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """One shortest import cycle (``[a, b, ..., a]``) per group of ``package``'s modules that import each other
    in a circle (a strongly connected group of the graph); empty when the imports form no cycle."""
    modules = {m for m in graph.modules if m == package or m.startswith(package + ".")}

    def successors(m: str) -> list[str]:
        return sorted(n for n in graph.find_modules_directly_imported_by(m) if n in modules)

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(modules):  # Tarjan's algorithm, iterative (no recursion limit on a deep graph)
        if start in index:
            continue
        work = [(start, iter(successors(start)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            nxt = next(todo, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        group.append(m)
                        if m == node:
                            break
                    if len(group) > 1 or node in graph.find_modules_directly_imported_by(node):
                        groups.append(sorted(group))
            elif nxt not in index:
                index[nxt] = low[nxt] = len(index)
                stack.append(nxt)
                on_stack.add(nxt)
                work.append((nxt, iter(successors(nxt))))
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
    cycles = []
    for group in sorted(groups):
        first = group[0]
        chains = [graph.find_shortest_chain(importer=n, imported=first) for n in successors(first) if n in group]
        cycles.append([first, *min((c for c in chains if c), key=len)])
    return cycles


def describe(cycles: list[list[str]], graph: grimp.ImportGraph) -> str:
    """The cycles with the line of each import, to see where to cut."""
    out = []
    for cycle in cycles:
        out.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            for d in graph.get_import_details(importer=a, imported=b)[:1]:
                out.append(f"    {a}:{d['line_number']}  {d['line_contents']}")
    return "\n".join(out)


def vpeft_graph() -> grimp.ImportGraph:
    """vpeft's import graph, with the imports grimp cannot see: ``vpeft.methods`` imports each method module
    by name (pkgutil) so that one file is one method."""
    graph = grimp.build_graph("vpeft", cache_dir=None)
    for child in graph.find_children("vpeft.methods"):
        if not child.rsplit(".", 1)[1].startswith("_"):
            graph.add_import(importer="vpeft.methods", imported=child)
    return graph


def lint_imports(cwd: Path, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    exe = str(exe) if exe.exists() else shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' (import-linter)")
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
    return subprocess.run([exe, "--no-cache", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def write_package(root: Path, name: str, files: dict[str, str]) -> None:
    (root / name).mkdir()
    for module, text in {"__init__": "", **files}.items():
        (root / name / f"{module}.py").write_text(textwrap.dedent(text))


# -- vpeft ----------------------------------------------------------------------------------------------------------


def test_vpeft_keeps_its_import_contracts():
    res = lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_no_vpeft_module_imports_in_a_circle():
    graph = vpeft_graph()
    assert len(graph.modules) > 50  # the package was found, not an empty graph
    cycles = import_cycles(graph, "vpeft")
    assert not cycles, "import cycles between vpeft modules:\n" + describe(cycles, graph)


# -- the checks themselves ------------------------------------------------------------------------------------------


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path, monkeypatch):
    write_package(tmp_path, "cyc_pkg", {
        "a": "from cyc_pkg import b\n",
        "b": "def f():\n    from cyc_pkg.a import x  # only at call time: Python would not notice\n",
        "c": "from cyc_pkg import a, d\n",  # imports into the cycle, not part of it
        "d": "from cyc_pkg import e\n",
        "e": "import cyc_pkg.f\n",
        "f": "from cyc_pkg import d\n",  # d -> e -> f -> d: a second cycle, three long
    })  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyc_pkg", cache_dir=None)
    cycles = import_cycles(graph, "cyc_pkg")
    assert cycles == [["cyc_pkg.a", "cyc_pkg.b", "cyc_pkg.a"], ["cyc_pkg.d", "cyc_pkg.e", "cyc_pkg.f", "cyc_pkg.d"]]
    assert "cyc_pkg.b:2" in describe(cycles, graph)  # where the hidden import is


def test_the_cycle_check_passes_a_package_without_cycles(tmp_path, monkeypatch):
    write_package(tmp_path, "acyc_pkg", {"a": "from acyc_pkg import b, c\n", "b": "import acyc_pkg.c\n", "c": ""})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles(grimp.build_graph("acyc_pkg", cache_dir=None), "acyc_pkg") == []


def test_lint_imports_fails_on_an_upward_import(tmp_path):
    write_package(
        tmp_path, "up_pkg", {"high": "from up_pkg import low\n", "low": "def f():\n    from up_pkg import high\n"}
    )
    (tmp_path / ".importlinter").write_text(
        "[importlinter]\nroot_package = up_pkg\n\n[importlinter:contract:layers]\nname = layers\ntype = layers\n"
        "layers =\n    up_pkg.high\n    up_pkg.low\n"
    )
    res = lint_imports(tmp_path, pythonpath=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "up_pkg.low is not allowed to import up_pkg.high" in res.stdout
