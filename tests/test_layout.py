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


TOOL_PACKAGES = {"book"}   # packages that are the course's tools, not labs: the book renders every lab


def test_lab_list_covers_every_lab_package():
    packages = {p.parent.name for p in PKG.glob("*/__init__.py")} - TOOL_PACKAGES
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


# ----------------------------------------------------------------------------- one vocabulary (docs/glossary.md)
GLOSSARY = REPO / "docs" / "glossary.md"
# pure formula modules: they may write the papers' symbols (p, m, h, ...) and say in their docstring which is which
FORMULA_MODULES = {"labkit.memory_model", "labkit.pipeline.schedules", "labkit.collectives.cost",
                   "labkit.capstone.traffic"}
# a spelling the glossary refuses only where it would mean a stage count: lab 06's k is the number of clusters
SCOPED = {"k": ("labkit.pipeline", "labkit.balance", "labkit.partition", "labkit.sliced")}
SHARED_PUBLIC = {"labkit.checks", "labkit.viz", "labkit.data", "labkit.devices", "labkit.memory_model",
                 "labkit.models", "labkit.partition"}  # shared modules a notebook may import


def _is_shim(fn: ast.AST) -> bool:
    """A definition kept one release for an old name: its body warns through labkit._compat."""
    return any(isinstance(n, ast.Name) and n.id == "warn_renamed" or isinstance(n, ast.Attribute)
               and n.attr == "warn_renamed" for n in ast.walk(fn))


def _definitions():
    """``(module, qualname, node)`` for every function, method and class in labkit (not the shims module)."""
    for name, path in _modules().items():
        if name == "labkit._compat":
            continue
        tree = ast.parse(path.read_text())

        def walk(body, prefix):
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    yield name, prefix + node.name, node
                    if isinstance(node, ast.ClassDef):
                        yield from walk(node.body, prefix + node.name + ".")

        yield from walk(tree.body, "")


def _params(node) -> list[str]:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return names[1:] if names and names[0] in ("self", "cls") else names


def _public(module: str, qualname: str) -> bool:
    return not any(part.startswith("_") for part in module.split(".")[1:] + qualname.split("."))


def _glossary_refused() -> set[str]:
    """The spellings in the glossary table's "not" column (the fourth), each in backquotes."""
    import re

    refused = set()
    for line in GLOSSARY.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] not in ("term", "---"):
            refused.update(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[3]))
    return refused


def test_a_name_ends_in_rank_only_if_its_first_argument_is_ctx():
    bad = [f"{m}.{q}" for m, q, node in _definitions() if not isinstance(node, ast.ClassDef)
           and node.name.endswith("_rank") and not node.name.endswith("_each_rank") and not _is_shim(node)
           and (_params(node) or [""])[0] != "ctx"]
    assert not bad, (f"named like rank functions but their first argument is not ctx: {bad}; a per-rank quantity "
                     "is *_each_rank (docs/glossary.md)")


def test_a_name_starts_with_check_only_if_it_is_an_exercise_check():
    bad = [f"{m}.{q}" for m, q, node in _definitions() if not isinstance(node, ast.ClassDef)
           and node.name.startswith("check_") and "." not in q and not _is_shim(node)
           and not (m.endswith(".lab") or m == "labkit.checks")]
    assert not bad, (f"check_* outside the labs' exercise checks: {bad}; an argument check is validate_* "
                     "(docs/glossary.md)")


def test_public_signatures_use_the_glossary_spellings():
    refused = _glossary_refused()
    assert {"n_pieces", "micro_batches", "hidden", "world"} <= refused, "the glossary's 'not' column was not read"
    bad = []
    for m, q, node in _definitions():
        if not _public(m, q) or _is_shim(node):
            continue
        if isinstance(node, ast.ClassDef):  # dataclass fields and annotated class attributes
            names = [b.target.id for b in node.body if isinstance(b, ast.AnnAssign) and isinstance(b.target, ast.Name)]
        else:
            names = _params(node)
        for p in names:
            scoped = SCOPED.get(p)
            if p in refused and m not in FORMULA_MODULES and (scoped is None or m.startswith(scoped)):
                bad.append(f"{m}.{q}({p})")
    assert not bad, f"public names spelled against docs/glossary.md: {bad}"


def _package_exports() -> dict[str, list[str]]:
    import importlib

    return {lab.package: list(importlib.import_module(lab.package).__all__) for lab in LABS}


def test_no_two_lab_packages_export_one_name_with_two_meanings():
    import importlib

    owners: dict[str, list] = {}
    for pkg, names in _package_exports().items():
        mod = importlib.import_module(pkg)
        for n in names:
            owners.setdefault(n, []).append((pkg, getattr(mod, n)))
    bad = {n: [p for p, _ in v] for n, v in owners.items() if len({id(obj) for _, obj in v}) > 1}
    assert not bad, f"one name, several meanings (qualify one of them): {bad}"


def test_every_lab_package_has_the_one_init_shape():
    bad = []
    for lab in LABS:
        path = PKG / lab.package.split(".")[1] / "__init__.py"
        text = path.read_text()
        tree = ast.parse(text)
        alls = [n for n in tree.body if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
        lazy = "_EXPORTS" in text  # labkit.ablation: exported lazily so a worker does not import torch (it says so)
        if not alls and not lazy:
            bad.append(f"{lab.package}: no explicit __all__")
        if "# noqa" in text:
            bad.append(f"{lab.package}: '# noqa' in __init__ (names in __all__ need none)")
    for pkg, names in _package_exports().items():
        for n in names:
            if n.endswith("_rank") or n.startswith("validate_"):
                bad.append(f"{pkg} exports {n} (rank functions live in lab.py; validators are not API)")
    assert not bad, bad


def _notebook_imports(path: Path) -> list[str]:
    import json
    import re

    found = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            for m in re.finditer(r"^\s*(?:from\s+(labkit[\w.]*)\s+import|import\s+(labkit[\w.]*))", src, re.M):
                found.append(m.group(1) or m.group(2))
    return found


def test_notebooks_and_decks_import_only_a_labs_front_modules():
    allowed = {"labkit"} | SHARED_PUBLIC
    for lab in LABS:
        allowed |= {lab.package} | {f"{lab.package}.{front}" for front in FRONT}
    bad = {p.name: sorted(set(_notebook_imports(p)) - allowed)
           for p in sorted([*(REPO / "notebooks").glob("*.ipynb"), *(REPO / "slides").glob("*.ipynb")])}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, (f"notebooks importing a lab's private modules: {bad}; import labkit.<lab> (its API), "
                     "labkit.<lab>.lab, .plots or .bench")


def test_the_vocabulary_rules_catch_their_mistakes(tmp_path):
    # the checkers themselves, on a probe module: each rule must fire
    probe = PKG / "pipeline" / "_vocab_probe.py"
    probe.write_text("def predict_rank(cfg):\n    pass\n\ndef check_sizes(x):\n    pass\n\n"
                     "def public(n_pieces, k):\n    pass\n")
    try:
        defs = [(m, q, n) for m, q, n in _definitions() if m == "labkit.pipeline._vocab_probe"]
        assert [q for _, q, _ in defs] == ["predict_rank", "check_sizes", "public"]
        assert _params(defs[2][2]) == ["n_pieces", "k"] and {"n_pieces"} <= _glossary_refused()
        assert not _public("labkit.pipeline._vocab_probe", "public")  # a private module is not checked
        assert _public("labkit.pipeline.reference", "reference_step")
    finally:
        probe.unlink()
    nb = tmp_path / "x.ipynb"
    nb.write_text('{"cells": [{"cell_type": "code", "source": ["import labkit.zero.measure as M\\n", '
                  '"from labkit.capstone.lab import compare_block_rank"]}]}')
    assert _notebook_imports(nb) == ["labkit.zero.measure", "labkit.capstone.lab"]


def test_the_package_docstring_lists_every_lab_as_tour_LABS_names_it():
    import labkit

    doc = labkit.__doc__ or ""
    missing = [f"``{lab.package}`` ({lab.name})" for lab in LABS if f"``{lab.package}`` ({lab.name})" not in doc]
    assert not missing, f"labkit/__init__.py's docstring must list each lab as tour.LABS names it: {missing}"


def test_every_notebook_links_the_glossary_in_its_first_cell():
    import json

    bad = [p.name for p in sorted((REPO / "notebooks").glob("*.ipynb"))
           if "glossary" not in "".join(json.loads(p.read_text())["cells"][0]["source"])]
    assert not bad, f"first cells without a link to docs/glossary.md: {bad}"


def _markdown_cells(path):
    import json

    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]


def test_every_notebook_ends_with_a_summary_and_going_further():
    import re

    bad = []
    for p in sorted((REPO / "notebooks").glob("*.ipynb")):
        heads = [line for cell in _markdown_cells(p) for line in cell.splitlines() if line.startswith("## ")]
        tail = [re.sub(r"^##\s+(\d+\.\s+)?", "", h).lower() for h in heads[-2:]]
        if tail != ["summary", "going further"]:
            bad.append(f"{p.name}: last headings {heads[-2:]}")
    assert not bad, "each lab ends with '## Summary' then '## Going further' (with references):\n" + "\n".join(bad)


def test_notebook_prose_spells_optimiser_the_british_way():
    import re

    bad = []
    for p in sorted((REPO / "notebooks").glob("*.ipynb")):
        for cell in _markdown_cells(p):
            prose = re.sub(r"`[^`]*`", "", cell)   # code keeps torch's spelling: optimizer, torch.optim
            # a lower-case "optimiz..." is prose; a capitalised "Optimization" is a cited paper's title
            bad += [f"{p.name}: ...{prose[max(0, m.start() - 30):m.end() + 10]!r}..."
                    for m in re.finditer(r"\boptimiz\w*", prose)]
    assert not bad, "prose says optimiser / optimisation (code says optimizer):\n" + "\n".join(bad)


def test_every_notebook_cell_has_its_own_id():
    import json

    bad = []
    for p in sorted((REPO / "notebooks").glob("*.ipynb")) + sorted((REPO / "slides").glob("*.ipynb")):
        ids = [c.get("id") for c in json.loads(p.read_text())["cells"]]
        if None in ids or len(set(ids)) != len(ids):
            missing, repeated = sum(i is None for i in ids), len(ids) - len(set(ids))
            bad.append(f"{p.name}: {missing} cell(s) without an id, {repeated} repeated")
    assert not bad, ("nbformat 4.5 cells need a unique id (a cell pasted in by a script has none; "
                     "nbformat.validator.normalize adds them):\n" + "\n".join(bad))


def test_numbered_sections_of_a_notebook_follow_each_other():
    import json
    import re

    bad = []
    for p in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        nums = [int(m.group(1)) for c in cells if c["cell_type"] == "markdown"
                for line in "".join(c["source"]).splitlines() for m in [re.match(r"^## (\d+)\.", line)] if m]
        if nums and nums != list(range(nums[0], nums[0] + len(nums))):
            bad.append(f"{p.name}: sections {nums}")
    assert not bad, ("a numbered section is missing or out of order (a heading lost in an edit breaks every "
                     "'section N' reference after it):\n" + "\n".join(bad))
