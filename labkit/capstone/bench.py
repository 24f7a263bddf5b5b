"""``python -m labkit bench capstone``: time, bytes per group and pipeline bubble of the transformer on each grid.

For each dp × pp × tp grid (the quick set by default, every grid of 2, 4 and 8 ranks with ``--all``) it trains the
capstone's model for ``--steps`` steps, ``--rounds`` times, **interleaved** with one process training the same
model on one thread (the baseline, measured in the same run): round r runs one process, then each grid in turn,
so all share the machine's noise. It prints the median time per step and its ratio to one process, the payload
each group carries per rank per step beside :func:`~labkit.capstone.traffic.predict` (they must agree to the
byte), the bubble measured from the executor's timeline beside (p-1)/(m+p-1), and the largest difference from one
process (float64).

On two CPU cores, 8 ranks share 2 cores and every message is a context switch: the times show what the grid costs
here (the point of the "more parallelism always helps" experiment), not what it would gain on GPUs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ..viz import format_table
from .grid import GridRun, run_grid
from .model import Config, build, lm_loss, make_optimizer, sort_batch, train_single
from .traffic import predict

QUICK = ((2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2), (8, 1, 1), (1, 1, 8))


def all_grids(sizes=(2, 4, 8)) -> list[tuple[int, int, int]]:
    """Every (dp, pp, tp) whose product is one of ``sizes``: 3 + 6 + 10 = 19 grids."""
    return [(d, p, n // (d * p)) for n in sizes for d in range(1, n + 1) if n % d == 0
            for p in range(1, n // d + 1) if (n // d) % p == 0]


def single_step_seconds(steps: int, cfg: Config = Config(), batch: int = 16) -> float:
    """Median seconds per training step of the whole model in this process, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build(cfg)
        opt = make_optimizer(model.parameters())
        times = []
        for s in range(steps + 1):
            x, y = sort_batch(batch, cfg, seed=s)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            lm_loss(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m labkit bench capstone", description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every grid of 2, 4 and 8 ranks (19), not the quick 6")
    ap.add_argument("--grid", action="append", default=[], metavar="DPxPPxTP",
                    help="a grid to run, for example 2x2x2 (repeatable)")
    ap.add_argument("--sp", action="store_true", help="sequence parallelism in the tensor-parallel groups")
    ap.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3); medians are reported")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600)
    return ap.parse_args(argv)


def _grid(text: str) -> tuple[int, int, int]:
    try:
        d, p, t = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise SystemExit(f"--grid {text!r}: write it as DPxPPxTP, for example 2x2x2") from None
    return d, p, t


def measure(grids, sp=False, steps=3, rounds=3, batch=16, timeout=600, log=print) -> dict:
    cfg = Config()
    single, runs = [], {g: [] for g in grids}
    for r in range(rounds):
        single.append(single_step_seconds(steps, cfg, batch))
        for g in grids:
            runs[g].append(run_grid(*g, sp=sp, steps=steps, batch=batch, timeout=timeout))
        log(f"round {r + 1}/{rounds} done")
    return {"single": statistics.median(single), "runs": runs, "reference": train_single(steps, cfg, batch)}


def table(res: dict, batch: int = 16) -> str:
    rows = []
    cfg = Config()
    base = res["single"]
    for g, runs in res["runs"].items():
        run: GridRun = runs[-1]
        sec = statistics.median(x.step_seconds for x in runs)
        pred = predict(cfg, *g, sp=run.sp, batch=batch, n_micro=run.n_micro)
        meas = {k: sum(v.values()) for k, v in run.bytes.items()}
        want = {k: sum(v.values()) for k, v in pred.items()}
        same = all(abs(meas.get(k, 0) - want.get(k, 0)) < 0.5 for k in set(meas) | set(want))
        diff = run.compare(res["reference"])
        rows.append({"grid": run.shape, "ms/step": f"{sec * 1e3:.0f}", "vs 1 proc": f"{sec / base:.1f}x",
                     **{f"{k} kB": f"{meas.get(k, 0) / 1e3:.1f}" for k in ("dp", "pp", "tp")},
                     "wire kB": f"{sum(run.wire.values()) / 1e3:.1f}", "= formula": "yes" if same else "NO",
                     "bubble": f"{statistics.median(x.bubble for x in runs):.2f}",
                     "theory": f"{run.bubble_theory:.2f}", "max diff": f"{max(diff.values()):.1e}"})
    return format_table(rows)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    grids = [_grid(g) for g in args.grid] or (all_grids() if args.all else list(QUICK))
    print(f"capstone: {len(grids)} grids, {args.steps} steps, {args.rounds} interleaved rounds, float64, "
          f"batch {args.batch}{', sequence parallel' if args.sp else ''}")
    res = measure(grids, args.sp, args.steps, args.rounds, args.batch, args.timeout)
    print(f"one process, one thread: {res['single'] * 1e3:.1f} ms per step (median of {args.rounds})")
    print(table(res, args.batch))
    print("kB: payload per rank per step, averaged over the ranks (dp: gradients; pp: activations and their "
          "gradients with a 64-byte header; tp: activations in the layers, the embedding and the loss); wire: what "
          "a rank sends with ring algorithms, 2(n-1)/n of an all-reduce's payload, (n-1)/n of a gather's")
    return 0
