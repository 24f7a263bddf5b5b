"""``python -m labkit tour``: every lab's headless quick path, as one table (lab, check, result, seconds).

This is the smoke test for a teacher preparing a server: if the tour passes, the labs will run.
Each lab module exposes ``tour() -> list[dict]`` with keys ``lab``, ``check``, ``ok``, ``detail``.
"""
from __future__ import annotations

import importlib
import time
import traceback

# (lab, module) in course order; a module that is not there yet is reported as missing, not skipped.
LABS = [
    ("00 start here", "labkit.tour"),
    ("00 data", "labkit.data"),
    ("01 collectives", "labkit.collectives"),
    ("02 data parallel", "labkit.ddp"),
    ("03 model parallel", "labkit.sliced"),
    ("04 pipeline", "labkit.pipeline"),
    ("05 load balancing", "labkit.balance"),
]


def check_row(lab: str, check: str, fn) -> dict:
    """One tour row from ``fn() -> (ok, detail)``; an exception becomes a failed row, not a crash."""
    try:
        ok, detail = fn()
    except Exception as e:  # report, do not stop the tour
        ok, detail = False, f"{type(e).__name__}: {e}"
    return {"lab": lab, "check": check, "ok": bool(ok), "detail": detail}


def hello(ctx):
    """Every rank says hello, then all ranks all-reduce their rank numbers (the result is 0+1+...+(n-1))."""
    import torch
    import torch.distributed as dist

    print(f"hello from rank {ctx.rank} of {ctx.world_size} on {ctx.device} ({ctx.backend})")
    t = torch.tensor([float(ctx.rank)], device=ctx.device)
    dist.all_reduce(t)
    return t.item()


def tour(world_size: int = 2) -> list[dict]:
    """The start-here lab's quick path: a real launch and all-reduce, then a pooled re-run."""
    from .launcher import Pool

    rows = []
    expected = world_size * (world_size - 1) / 2
    with Pool(world_size, quiet=True, echo=False) as pool:
        t0 = time.perf_counter()
        got = pool.run(hello, timeout=120)
        cold = time.perf_counter() - t0
        rows.append({"lab": "00 start here", "check": f"{world_size}-rank all-reduce of ranks = {expected:g}",
                     "ok": list(got) == [expected] * world_size, "detail": f"got {list(got)}, {cold:.1f} s incl. start-up"})
        t0 = time.perf_counter()
        again = pool.run(hello, timeout=60)
        warm = time.perf_counter() - t0
        rows.append({"lab": "00 start here", "check": "pooled re-run gives the same result",
                     "ok": list(again) == list(got), "detail": f"{warm * 1e3:.1f} ms"})
    return rows


def run_tour(labs: list[str] | None = None, world_size: int = 2, echo: bool = True) -> list[dict]:
    """Run every lab's ``tour()`` (or those whose name contains one of ``labs``); return all rows."""
    from .viz import format_table

    rows: list[dict] = []
    selected = [(lab, mod) for lab, mod in LABS if not labs or any(s in lab or s in mod for s in labs)]
    if labs and not selected:
        raise ValueError(f"no lab matches {labs}; labs are: {[lab for lab, _ in LABS]}")
    from .viz import progress

    for lab, mod_name in progress(selected, desc="tour") if echo else selected:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, "tour")
            got = fn(world_size) if mod_name == "labkit.tour" else fn()
            secs = time.perf_counter() - t0
            for i, row in enumerate(got):  # the lab's wall time goes on its first row
                rows.append({"lab": row.get("lab", lab), "check": row["check"],
                             "result": "ok" if row["ok"] else "FAIL", "seconds": f"{secs:.1f}" if i == 0 else "",
                             "detail": str(row.get("detail", ""))[:80]})
        except ModuleNotFoundError as e:
            rows.append({"lab": lab, "check": "module present", "result": "MISSING", "seconds": "", "detail": str(e)})
        except Exception as e:
            rows.append({"lab": lab, "check": "quick path ran", "result": "FAIL", "seconds": f"{time.perf_counter() - t0:.1f}",
                         "detail": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]})
            if echo:
                traceback.print_exc()
        if echo:
            done = [r for r in rows if r["lab"].startswith(lab.split()[0])]
            print(f"  {lab}: {sum(r['result'] == 'ok' for r in done)}/{len(done)} ok", flush=True)
    if echo:
        print()
        print(format_table(rows, floatfmt="{:.2f}"))
    return rows
