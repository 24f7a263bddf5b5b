"""``python -m labkit bench capstone``: the step-time simulator against published and measured runs, then the grids.

It prints three parts, in this order (``--part`` picks some; each part's running time is printed after it):

1. ``published``: the simulator (:mod:`labkit.capstone.simulator`) against the published runs of
   :mod:`labkit.capstone.published`: Megatron-LM 2021's Table 1 and Table 2, Llama 3 405B and three figures'
   trends, predicted beside the paper. Arithmetic only, a few seconds (pipelines of up to 64 micro-batches are
   played step by step).
2. ``measured``: the same simulator calibrated on this machine (:mod:`labkit.capstone.calibrate`: lab 01's
   ping-pong, a matmul and a copy rate, a layer overhead fitted on one-process runs) against lab 11's
   ``run_grid`` and lab 04's ``run_pipeline`` measured here, interleaved over ``--rounds``, printed side by side
   with the count of configurations within ±25%, once with the ping-pong's alpha and once with a small
   all-reduce's. About 3 minutes on the loaded 2-core machine, most of it the first round, which starts the
   pooled ranks of every world size; ``--quick`` runs that round alone (about 2.5 minutes), so its times come
   from freshly started processes and scatter more: a smoke test, not a figure to quote.
3. ``grids``: the grids' time, bytes per group and bubble, below (alone when ``--grid``, ``--all`` or ``--sp``
   is given without ``--part``).

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
from . import calibrate, published
from .grid import GridRun, run_grid
from .model import Config, build, lm_loss, make_optimizer, sort_batch, train_single
from .ranking import grids
from .traffic import predict

QUICK = ((2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2), (8, 1, 1), (1, 1, 8))
PARTS = ("published", "measured", "grids")


def all_grids(sizes=(2, 4, 8)) -> list[tuple[int, int, int]]:
    """Every (dp, pp, tp) whose product is one of ``sizes``: 3 + 6 + 10 = 19 grids."""
    return [g for n in sizes for g in sorted((d, p, t) for d, t, p in grids(n))]


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


def _parts(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in PARTS]
    if bad or not names:
        what = f"{', '.join(map(repr, bad))} is not a part" if bad else "no part named"
        raise argparse.ArgumentTypeError(f"{text!r}: {what}; pass one or more of {', '.join(PARTS)}, "
                                         "comma-separated, for example --part published,measured")
    return names


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m labkit bench capstone", description=__doc__.split("\n\n")[0],
                                 epilog="parts: published (the simulator against the papers, arithmetic, a few "
                                        "seconds), measured (the simulator calibrated here against lab 11's grids "
                                        "and lab 04's pipelines run here, about 3 minutes; --quick 2.5, a smoke "
                                        "test), grids "
                                        "(the grids' time, bytes and bubble against one process, about a minute)")
    ap.add_argument("--part", type=_parts, default=None, metavar="PART[,PART]",
                    help=f"which parts to run, comma-separated, of {', '.join(PARTS)} (always in that order; "
                         "default: all three, or grids alone when --grid, --all or --sp is given); --part "
                         "published,measured is the simulator alone")
    ap.add_argument("--quick", action="store_true",
                    help="1 round of 2 steps (unless --rounds/--steps say otherwise) and a shorter ping-pong")
    ap.add_argument("--all", action="store_true", help="grids part: every grid of 2, 4 and 8 ranks (19), not the "
                                                       "quick 6")
    ap.add_argument("--grid", action="append", default=[], metavar="DPxPPxTP",
                    help="grids part: a grid to run, for example 2x2x2 (repeatable)")
    ap.add_argument("--sp", action="store_true", help="grids part: sequence parallelism in the tensor-parallel groups")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 3, --quick 2)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds (default 3, --quick 1); medians are reported")
    ap.add_argument("--batch", type=int, default=16, help="grids part: the global batch (default 16)")
    ap.add_argument("--timeout", type=float, default=600, help="grids part: seconds a launch may take")
    args = ap.parse_args(argv)
    for name in ("steps", "rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)}: pass a whole number >= 1")
    args.grid = [_grid(g) for g in args.grid]  # refused here, before a part runs
    if args.part is None:  # the grids' own options keep meaning what they meant before the simulator's parts
        args.part = ("grids",) if (args.grid or args.all or args.sp) else PARTS
    args.steps = args.steps or (2 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


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


def _progress(line: str) -> None:
    print(f"  {line}", flush=True)


def published_part(args) -> None:
    """The simulator against the published runs (pure arithmetic)."""
    print("1. published: the simulator against the papers (no measurement here)\n", flush=True)
    print(published.format_published())


def measured_part(args) -> None:
    """The simulator calibrated on this machine against lab 11's grids and lab 04's pipelines measured here."""
    print(f"2. measured here: the simulator calibrated on this machine against {len(calibrate.GRID_SHAPES)} "
          f"run_grid configurations and {len(calibrate.PIPELINE_CASES)} run_pipeline runs, {args.rounds} "
          f"interleaved round(s) of {args.steps} step(s), medians", flush=True)
    machine = calibrate.measure_machine(repeats=5 if args.quick else 15, log=_progress)
    out = calibrate.compare(machine, rounds=args.rounds, steps=args.steps, log=_progress)
    print(calibrate.describe(out))


def grids_part(args) -> None:
    """The grids' time, bytes per group and bubble against one process."""
    grids = args.grid or (all_grids() if args.all else list(QUICK))
    print(f"3. grids: {len(grids)} grids, {args.steps} steps, {args.rounds} interleaved rounds, float64, "
          f"batch {args.batch}{', sequence parallel' if args.sp else ''}", flush=True)
    res = measure(grids, args.sp, args.steps, args.rounds, args.batch, args.timeout, log=_progress)
    print(f"one process, one thread: {res['single'] * 1e3:.1f} ms per step (median of {args.rounds})")
    print(table(res, args.batch))
    print("kB: payload per rank per step, averaged over the ranks (dp: gradients; pp: activations and their "
          "gradients with a 64-byte header; tp: activations in the layers, the embedding and the loss); wire: what "
          "a rank sends with ring algorithms, 2(n-1)/n of an all-reduce's payload, (n-1)/n of a gather's")


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    run = {"published": published_part, "measured": measured_part, "grids": grids_part}
    took = {}
    for part in PARTS:
        if part in args.part:
            t0 = time.perf_counter()
            run[part](args)
            took[part] = time.perf_counter() - t0
            print(f"[{part}: {took[part]:.1f} s]\n", flush=True)
    print("running time: " + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()))
    return 0
