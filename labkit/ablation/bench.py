"""``python -m labkit bench ablation``: how fast the harness runs trials, and what its store costs per trial.

1. Throughput: the same small study (the lab's CNN trial, baseline and one change, on a few seeds) run into a fresh
   results file with 1 worker and with 2 workers, alternating (1, 2, 1, 2, ...); trials per minute, medians, and the
   ratio. Worker start-up (importing torch, building the data split) is included: it is what a study pays.
2. The store's overhead per trial: claim + finish (two transactions, each synced to disk: ``synchronous=FULL``)
   timed over many trials in one process, against the median seconds of one trial measured in the same run.

``--quick`` runs fewer seeds and one repeat.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def throughput(workers: int, seeds: list[int], steps: int) -> tuple[float, float, float]:
    """(trials per minute of the whole run, trials per minute from the first trial's start to the last one's end:
    without the workers' start-up, median seconds per trial inside the worker) of one fresh run."""
    from .runner import run_study
    from .store import Store
    from .study import Study
    from .training import BASELINE

    folder = tempfile.mkdtemp(prefix="labkit-bench-ablation-")
    db = os.path.join(folder, "b.db")
    study = Study(name="bench", baseline={**BASELINE, "steps": steps}, factors={"loss": ["smooth"]}, seeds=seeds)
    t0 = time.perf_counter()
    got = run_study(study, db, workers=workers, progress=False, echo=False)
    secs = time.perf_counter() - t0
    if got.failed:
        raise RuntimeError(f"bench trials failed: {got.errors}")
    with Store(db) as st:
        rows = st.rows(status="done")
    per = [r["result"]["seconds"] for r in rows]
    span = max(r["finished"] for r in rows) - min(r["started"] for r in rows)
    return 60.0 * got.done / secs, 60.0 * got.done / span, statistics.median(per)


def store_overhead(n: int = 200) -> float:
    """Median seconds of claim + finish of one trial (two synced transactions) in a fresh file."""
    from .store import Store

    folder = tempfile.mkdtemp(prefix="labkit-bench-store-")
    times = []
    with Store(os.path.join(folder, "s.db")) as st:
        result = {"accuracy": 0.9, "curve": [{"step": s, "train_loss": 0.1, "test_accuracy": 0.9} for s in range(6)]}
        for i in range(n):
            t0 = time.perf_counter()
            st.claim(f"k{i}", study="s", label="baseline", config={"a": 1}, seed=i, code="c")
            st.finish(f"k{i}", 0.9, result)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit bench ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer seeds, one repeat")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (trials = 2 x seeds)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per trial (the lab's baseline: 150)")
    args = p.parse_args(argv)
    seeds = list(range(args.seeds or (3 if args.quick else 6)))
    repeats = args.repeats or (1 if args.quick else 3)
    os.environ.setdefault("LABKIT_NO_PROGRESS", "1")
    print(f"throughput: {2 * len(seeds)} trials of {args.steps} steps, 1 vs 2 workers, {repeats} repeat(s), "
          f"alternating; {os.cpu_count()} CPU(s) here")
    got = {1: [], 2: []}
    trial = []
    for _ in range(repeats):
        for w in (1, 2):
            tpm, steady, per = throughput(w, seeds, args.steps)
            got[w].append((tpm, steady))
            trial.append(per)
            print(f"  {w} worker(s): {tpm:6.1f} trials/min with start-up, {steady:6.1f} without", flush=True)
    m1, m2 = (statistics.median(t for t, _ in got[w]) for w in (1, 2))
    s1, s2 = (statistics.median(s for _, s in got[w]) for w in (1, 2))
    overhead = store_overhead(50 if args.quick else 200)
    per = statistics.median(trial)
    print(f"\nmedian trials per minute, whole run (worker start-up included): 1 worker {m1:.1f}, 2 workers {m2:.1f}; "
          f"ratio 2/1 = {m2 / m1:.2f}")
    print(f"median trials per minute, first start to last finish: 1 worker {s1:.1f}, 2 workers {s2:.1f}; "
          f"ratio 2/1 = {s2 / s1:.2f}")
    print(f"store per trial (claim + finish, synced): {overhead * 1e3:.2f} ms = {overhead / per:.2%} of a median "
          f"trial ({per:.2f} s inside the worker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
