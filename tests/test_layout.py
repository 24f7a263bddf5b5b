"""The package layout: one package per lab, imports that follow the course, no cycles, and a wheel that ships it all.

The rules (README, "Where each lab's code lives"):
- a lab package imports only ``labkit.runtime``, the shared modules and the concept modules of earlier labs;
- nothing in ``labkit`` imports a ``lab``, ``bench`` or ``plots`` module (the tour and the CLI load them by name;
  notebooks and tests import them directly);
- the shared modules import no lab package but the runtime;
- no import cycles between modules;
- no module over about 400 lines unless its docstring says why.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from labkit.tour import LABS

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "labkit"
FRONT = {"lab", "bench", "plots"}  # modules only the tour, the CLI, notebooks and tests may import
LAB_OF = {lab.package: int(lab.number) for lab in LABS}  # "labkit.collectives" -> 1
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, unresolved: list | None = None) -> set[str]:
    """Every labkit module ``name`` imports, at module level or inside functions (relative imports resolved).

    ``unresolved`` collects imports of labkit modules that do not exist (a module moved, an import left behind)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "labkit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[:len(base) - node.level + 1]
                mod = ".".join(root + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "labkit":
                continue
            if unresolved is not None and mod not in _modules():
                unresolved.append(f"{name}: from {mod} import ...")
            out.add(mod)
            for a in node.names:  # `from . import checks` imports a module, not a name
                out.add(f"{mod}.{a.name}")
    known = _modules()
    return {m for m in out if m in known and m != name}


def _lab_of(module: str) -> int | None:
    for pkg, n in LAB_OF.items():
        if module == pkg or module.startswith(pkg + "."):
            return n
    return None


def _graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in _modules().items()}


def test_lab_list_covers_every_lab_package():
    packages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert packages == {lab.package.split(".")[1] for lab in LABS}, "a lab package missing from labkit.tour.LABS"
    numbers = [int(lab.number) for lab in LABS]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def test_every_labkit_import_names_a_module_that_exists():
    # imports inside functions run only when called: a stale path must fail here, not in a notebook
    unresolved: list = []
    for name, path in _modules().items():
        _imports(name, path, unresolved)
    assert not unresolved, f"imports of labkit modules that do not exist: {unresolved}"


def test_nothing_imports_a_lab_bench_or_plots_module():
    bad = [(src, dst) for src, dsts in _graph().items() for dst in dsts
           if dst.rsplit(".", 1)[-1] in FRONT and _lab_of(dst) is not None]
    assert not bad, f"imports of lab/bench/plots modules (load them by name in the tour or CLI instead): {bad}"


def test_labs_import_only_the_runtime_shared_modules_and_earlier_labs():
    bad = []
    for src, dsts in _graph().items():
        n = _lab_of(src)
        for dst in dsts:
            m = _lab_of(dst)
            if n is None:  # a shared module: only the runtime (lab 00) below it
                if m not in (None, 0):
                    bad.append((src, dst))
            elif m is not None and m > n:
                bad.append((src, dst))
            elif m is not None and m < n and m != 0 and dst.rsplit(".", 1)[-1] in FRONT:
                bad.append((src, dst))
    assert not bad, f"imports against the course order: {bad}"


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in sccs if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_the_rule_checker_catches_a_bad_import(tmp_path):
    # the checker itself: a relative import of a later lab's module from an earlier lab is resolved and flagged
    fake = PKG / "collectives" / "_layout_probe.py"
    fake.write_text("from ..pipeline import run_pipeline\nfrom .lab import tour\n")
    try:
        deps = _imports("labkit.collectives._layout_probe", fake)
        assert "labkit.pipeline" in deps and "labkit.collectives.lab" in deps
        assert _lab_of("labkit.pipeline") > _lab_of("labkit.collectives._layout_probe")
    finally:
        fake.unlink()


def test_long_modules_say_why():
    long = []
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "long because" not in doc.replace("\n", " "):
            long.append(f"{name} ({lines} lines)")
    assert not long, f"over {MAX_LINES} lines without 'long because ...' in the docstring: {long}"


def test_every_lab_package_says_what_is_in_it():
    for lab in LABS:
        doc = ast.get_docstring(ast.parse((PKG / lab.package.split(".")[1] / "__init__.py").read_text()))
        assert doc and doc.startswith(f"Lab {lab.number}") or lab.number == "00", lab.package
        assert doc and len(doc.splitlines()) >= 3, lab.package


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_built_wheel_ships_every_lab_and_imports_without_the_source_tree(tmp_path):
    """A non-editable install (``pip install .``) must find the subpackages (``packages.find``)."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheel_dir), str(REPO)], capture_output=True, text=True, timeout=480)
    assert p.returncode == 0, p.stdout + p.stderr
    (whl,) = wheel_dir.glob("labkit-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    missing = [str(f.relative_to(REPO)) for f in [*PKG.rglob("*.py"), *PKG.glob("*.json"), *PKG.rglob("*.toml")]
               if str(f.relative_to(REPO)) not in names]
    assert not missing, f"the wheel leaves out {missing}"
    zipfile.ZipFile(whl).extractall(target)
    mods = sorted({lab.package for lab in LABS} | {f"{lab.package}.lab" for lab in LABS})
    code = ("import importlib, labkit; print(labkit.__file__); "
            + "; ".join(f"importlib.import_module({m!r})" for m in mods))
    env = dict(os.environ, PYTHONPATH=str(target))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=480)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(str(target)), f"imported {p.stdout.strip()}, not the wheel's copy"
