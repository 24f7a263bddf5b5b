"""The list of labs, and ``python -m labkit tour``: every lab's headless quick path as one table.

:data:`LABS` is the one registry: the tour, the ``bench`` command's choices and the course map follow
it. Each lab is a package whose ``lab`` module has ``tour(world_size=2) -> list[dict]`` (rows made by
:func:`run_check`) and, when the lab has a benchmark, whose ``bench`` module has ``main(argv)``.

This is the smoke test for a teacher preparing a server: if the tour passes, the labs will run.
"""
from __future__ import annotations

import importlib
import time
import traceback
from dataclasses import dataclass


@dataclass(frozen=True)
class Lab:
    number: str            # "01"
    title: str             # "collectives"
    package: str           # "labkit.collectives": has .lab.tour and, if bench is set, .bench.main
    bench: str | None = None  # the name for ``python -m labkit bench NAME``
    notebook: str | None = None

    @property
    def name(self) -> str:
        return f"{self.number} {self.title}"


LABS: tuple[Lab, ...] = (
    Lab("00", "start here", "labkit.runtime", "launch", "00_start_here.ipynb"),
    Lab("01", "collectives", "labkit.collectives", "collectives", "01_collectives.ipynb"),
    Lab("02", "data parallel", "labkit.ddp", "ddp", "02_data_parallel.ipynb"),
    Lab("03", "model parallel", "labkit.sliced", None, "03_model_parallel.ipynb"),
    Lab("04", "pipeline", "labkit.pipeline", "pipeline", "04_pipeline.ipynb"),
    Lab("05", "load balancing", "labkit.balance", None, "05_load_balancing.ipynb"),
    Lab("06", "k-means", "labkit.kmeans", "kmeans", "06_kmeans_pseudo_labels.ipynb"),
    Lab("07", "pseudo-labels", "labkit.pseudo_label", "ssl", "07_generative_pseudo_labels.ipynb"),
    Lab("08", "ablation", "labkit.ablation", "ablation", "08_ablation.ipynb"),
    Lab("09", "hardware", "labkit.hardware", "hardware", "09_hardware.ipynb"),
    Lab("10", "sharded data parallel", "labkit.zero", "zero", "10_sharded_data_parallel.ipynb"),
    Lab("11", "capstone", "labkit.capstone", "capstone", "11_capstone.ipynb"),
    Lab("12", "context and expert parallel", "labkit.context_expert", "context_expert",
        "12_context_and_expert_parallel.ipynb"),
)


def lab_name(package: str) -> str:
    """``"06 k-means"`` for ``"labkit.kmeans"``: a lab's number and title, written only in :data:`LABS`."""
    for lab in LABS:
        if lab.package == package:
            return lab.name
    raise ValueError(f"package={package!r} is not a lab; labs are: {[lab.package for lab in LABS]}")


def benches() -> dict[str, str]:
    """``{bench name: module}`` for ``python -m labkit bench NAME``, in course order."""
    return {lab.bench: f"{lab.package}.bench" for lab in LABS if lab.bench}


def run_check(lab: str, check: str, fn) -> dict:
    """One tour row from ``fn() -> (ok, detail)``; an exception becomes a failed row, not a crash."""
    try:
        ok, detail = fn()
    except Exception as e:  # report, do not stop the tour
        ok, detail = False, f"{type(e).__name__}: {e}"
    return {"lab": lab, "check": check, "ok": bool(ok), "detail": detail}


def select(labs: list[str] | None = None) -> list[Lab]:
    """The labs whose name or package contains one of ``labs`` (all of them for ``None``)."""
    chosen = [lab for lab in LABS if not labs or any(s in lab.name or s in lab.package for s in labs)]
    if labs and not chosen:
        raise ValueError(f"no lab matches {labs}; labs are: {[lab.name for lab in LABS]}")
    return chosen


def run_tour(labs: list[str] | None = None, world_size: int = 2, echo: bool = True) -> list[dict]:
    """Run every lab's ``tour(world_size)`` (or those whose name contains one of ``labs``); return all rows."""
    from ._validate import validate_int
    from .viz import format_table, progress

    world_size = validate_int("world_size", world_size, minimum=1)
    selected = select(labs)
    rows: list[dict] = []
    for lab in progress(selected, desc="tour") if echo else selected:
        t0 = time.perf_counter()
        first = len(rows)
        try:
            got = importlib.import_module(f"{lab.package}.lab").tour(world_size=world_size)
            secs = time.perf_counter() - t0
            for i, row in enumerate(got):  # the lab's wall time goes on its first row
                rows.append({"lab": row.get("lab", lab.name), "check": row["check"],
                             "result": "ok" if row["ok"] else "FAIL", "seconds": f"{secs:.1f}" if i == 0 else "",
                             "detail": str(row.get("detail", ""))[:80], "full": str(row.get("detail", ""))})
        except ModuleNotFoundError as e:
            rows.append({"lab": lab.name, "check": "module present", "result": "MISSING", "seconds": "",
                         "detail": str(e)})
        except Exception as e:
            rows.append({"lab": lab.name, "check": "quick path ran", "result": "FAIL",
                         "seconds": f"{time.perf_counter() - t0:.1f}",
                         "detail": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]})
            if echo:
                traceback.print_exc()
        if echo:
            done = rows[first:]
            print(f"  {lab.name}: {sum(r['result'] == 'ok' for r in done)}/{len(done)} ok", flush=True)
    if echo:
        print()
        print(format_table([{k: v for k, v in r.items() if k != "full"} for r in rows], floatfmt="{:.2f}"))
        failed = [r for r in rows if r["result"] != "ok" and len(r.get("full", "")) > 80]
        for r in failed:  # the table cuts details at 80 characters: a failure's whole story comes after it
            print(f"\n--- {r['lab']}: {r['check']}\n{r['full']}")
    return rows
