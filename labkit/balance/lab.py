"""Lab 05's exercise checks and tour."""
from __future__ import annotations

import random
import time
from typing import Sequence

import torch

from ..checks import run_cases
from ..partition import check_cuts
from ..tour import check_row
from .profile import balance_by_memory, balance_by_time, memory_costs, profile_layers, sleep_layers
from .run import lab_model, micro_sample
from .solvers import brute_force_partition, evaluate_split, fits, min_max_partition


# --------------------------------------------------------------------------- exercise checks
EXERCISE_COSTS = [7, 2, 5, 8, 3, 6, 4, 9, 1, 5]
EXERCISE_STAGES = 3


def check_hand_split(cuts_or_fn, costs: Sequence[float] = EXERCISE_COSTS, k: int = EXERCISE_STAGES):
    """Exercise: give cuts (or a function returning them) that split ``costs`` into ``k`` stages optimally."""
    costs = list(costs)
    best = min_max_partition(costs, k)
    got: dict = {}

    def valid():
        cuts = cuts_or_fn() if callable(cuts_or_fn) else cuts_or_fn
        got["cuts"] = cuts
        try:
            check_cuts(cuts, len(costs), k)
        except (TypeError, ValueError) as e:
            raise AssertionError(str(e)) from None

    def optimal():
        if "cuts" not in got:
            raise AssertionError("no valid cuts to score")
        mine = evaluate_split(costs, got["cuts"])
        assert mine.bottleneck <= best.bottleneck, (
            f"your stages cost {mine.stage_costs} (slowest {mine.bottleneck:g}); the solver's best slowest stage "
            f"is {best.bottleneck:g}")

    return run_cases(f"split {costs} into {k} stages by hand", [
        (f"{k - 1} valid cut(s), strictly increasing, in 1..{len(costs) - 1}", valid),
        ("the slowest stage is as small as the exact solver's", optimal),
    ], hint="start from total/k and move each cut one layer left or right; the solver's bottleneck is a lower "
            "bound no split beats")


def check_fits(fn) -> "object":
    """Exercise: ``fn(costs, k, limit) -> bool`` must say whether k stages of at most ``limit`` each exist."""
    import random

    cases = [([10, 20, 30, 40, 50, 60], 2, 110, True), ([10, 20, 30, 40, 50, 60], 2, 109, False),
             ([5, 5, 5], 3, 5, True), ([5, 5, 5], 2, 5, False), ([1, 9, 1], 3, 8, False), ([4], 1, 4, True)]
    rng = random.Random(5)
    for _ in range(40):
        costs = [rng.randint(0, 9) for _ in range(rng.randint(1, 8))]
        k, limit = rng.randint(1, len(costs)), rng.randint(0, 30)
        cases.append((costs, k, limit, fits(costs, k, limit)))

    def case(costs, k, limit, want):
        def thunk():
            got = fn(list(costs), k, limit)
            assert bool(got) == want, f"fits({costs}, k={k}, limit={limit}) returned {got!r}, expected {want}"
        return thunk

    return run_cases("fits(costs, k, limit)", [(f"{c}, k={k}, limit={lim}", case(c, k, lim, w))
                                               for c, k, lim, w in cases],
                     hint="walk the layers once; start a new stage when adding the next layer would pass the "
                          "limit; a single layer above the limit makes it impossible")


def tour(world_size: int = 2, measured: bool = True) -> list[dict]:
    """The lab's quick path: exact partitioners vs brute force; then (``measured``) sleeping layers and a
    ``world_size``-rank GPipe run of a time-balanced ResNet split against the single process."""
    from ..pipeline import SplitModel, max_grad_error, reference_step, run_pipeline

    lab, k = "05 load balancing", world_size

    def exact():
        rng = random.Random(0)
        bad = 0
        for _ in range(200):
            n = rng.randint(1, 9)
            costs = [rng.randint(0, 20) for _ in range(n)]
            kk = rng.randint(1, n)
            ref = brute_force_partition(costs, kk).bottleneck
            bad += ((min_max_partition(costs, kk, "dp").bottleneck != ref)
                    + (min_max_partition(costs, kk, "search").bottleneck != ref))
        return bad == 0, f"{bad} mismatches"

    rows = [check_row(lab, "exact partitioners (DP, search) == brute force, 200 cases", exact)]
    if not measured:
        return rows
    ms = [10, 20, 30, 40, 50, 60]

    def sleeping():
        t0 = time.perf_counter()
        prof = profile_layers(sleep_layers(ms), torch.zeros(2, 3), repeats=1, warmup=0)
        split = balance_by_time(prof, min(k, len(ms)))
        want = min_max_partition(ms, min(k, len(ms))).sizes
        return split.sizes == want, (f"sizes {split.sizes} (known costs give {want}), stages "
                                     f"{[round(c) for c in split.stage_costs]} ms ({time.perf_counter() - t0:.1f} s)")

    def pipeline():
        prof = profile_layers(lab_model("small"), micro_sample("small", 4), repeats=2)
        cuts = balance_by_time(prof, k).cuts
        mem = balance_by_memory(memory_costs(prof), k)
        x, y = micro_sample("small", 8, 1), torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
        make = SplitModel("small", cuts=cuts)
        run = run_pipeline(make, k, (x, y), 2, schedule="gpipe", timeout=120, pool=False)
        ref = reference_step(make, k, (x, y), 2)
        err = max_grad_error(run.grads, ref["grads"])
        return (err < 1e-4 and abs(run.loss - ref["loss"]) < 1e-5,
                f"cuts {cuts}: max grad err {err:.1e}; memory balance would cut at {mem.cuts}; "
                f"step {run.seconds * 1e3:.0f} ms")

    rows.append(check_row(lab, f"layers sleeping 10..60 ms -> the known best {min(k, len(ms))}-stage split", sleeping))
    rows.append(check_row(lab, f"time-balanced ResNet split, {k}-rank GPipe == single process", pipeline))
    return rows
