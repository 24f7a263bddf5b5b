"""``python -m labkit bench launch``: cold launch vs pooled launch latency of a trivial job.

A cold launch starts fresh rank processes (import torch, join the process group) and stops them;
a pooled launch sends the job to ranks that are already up. Both run the same 1-element
all-reduce. Medians over several runs, side by side, with the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time


def trivial_rank(ctx):
    import torch
    import torch.distributed as dist

    t = torch.ones(1, device=ctx.device)
    dist.all_reduce(t)
    return t.item()


def measure(world_size: int, cold_runs: int, warm_runs: int) -> dict:
    from .launcher import Pool, launch

    cold = []
    for _ in range(cold_runs):
        t0 = time.perf_counter()
        launch(trivial_rank, world_size, echo=False, quiet=True)
        cold.append(time.perf_counter() - t0)
    warm = []
    with Pool(world_size, quiet=True, echo=False) as pool:
        pool.run(trivial_rank)  # start-up, not counted
        for _ in range(warm_runs):
            t0 = time.perf_counter()
            pool.run(trivial_rank)
            warm.append(time.perf_counter() - t0)
    c, w = statistics.median(cold), statistics.median(warm)
    return {"ranks": world_size, "cold launch (s)": c, "pooled run (ms)": w * 1e3,
            "cold runs": cold_runs, "pooled runs": warm_runs, "speed-up": c / w}


def main(argv: list[str] | None = None) -> int:
    from ..viz import format_table

    p = argparse.ArgumentParser(prog="python -m labkit bench launch", description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--cold-runs", type=int, default=5)
    p.add_argument("--warm-runs", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="3 cold runs, 20 pooled runs, 2 ranks only")
    a = p.parse_args(argv)
    if a.quick:
        a.world_sizes, a.cold_runs, a.warm_runs = [2], 3, 20
    from ..viz import progress

    rows = [measure(n, a.cold_runs, a.warm_runs) for n in progress(a.world_sizes, desc="launch bench: world sizes")]
    print(format_table(rows, floatfmt="{:.3g}"))
    two = [r for r in rows if r["ranks"] == 2]
    if two:
        ok = two[0]["speed-up"] >= 10
        print(f"\ntarget: pooled re-run of a trivial 2-rank job >= 10x faster than a cold launch: "
              f"{two[0]['speed-up']:.0f}x ({'met' if ok else 'NOT met'})")
    return 0
