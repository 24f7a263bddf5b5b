"""Lab 05's exercise checks and tour."""
from __future__ import annotations

import random
import time
from typing import Sequence

import torch

from .._compat import renamed_kwargs
from ..checks import calls_to, refuse, run_cases
from ..partition import validate_cuts
from ..tour import lab_name, run_check
from .profile import balance_by_memory, balance_by_time, memory_costs, profile_layers, sleep_layers
from .run import lab_model, micro_sample
from .solvers import brute_force_partition, evaluate_split, fits, greedy_split, min_max_partition

# --------------------------------------------------------------------------- exercise checks
EXERCISE_COSTS = [7, 2, 5, 8, 3, 6, 4, 9, 1, 5]
EXERCISE_STAGES = 3


_SOLVERS = (min_max_partition, brute_force_partition, fits, balance_by_time, balance_by_memory, greedy_split)


def _drawn_costs(rng: random.Random, n_cases: int, max_layers: int = 9) -> list[tuple[list[int], int]]:
    """Cost lists and stage counts drawn at check time: inputs no answer can hard-code."""
    out = []
    while len(out) < n_cases:
        costs = [rng.randint(0, 12) for _ in range(rng.randint(2, max_layers))]
        n_stages = rng.randint(2, min(4, len(costs)))
        if (costs, n_stages) != (EXERCISE_COSTS, EXERCISE_STAGES):
            out.append((costs, n_stages))
    return out


@renamed_kwargs(k="n_stages")
def check_hand_split(fn, costs: Sequence[float] = EXERCISE_COSTS, n_stages: int = EXERCISE_STAGES):
    """Exercise: ``fn(costs, n_stages) -> cuts`` splits ``costs`` into ``n_stages`` stages with the smallest slowest
    stage.

    Tried on the exercise's costs and on cost lists drawn at check time (a list of cuts written
    for the exercise alone does not pass); calling the library's partitioners fails. The answer's
    slowest stage is compared with the exact solver's; equal-cost alternatives pass."""
    rng = random.Random()
    inputs = [(list(costs), n_stages, "")] + [(c, kk, " (drawn now)") for c, kk in _drawn_costs(rng, 6)]

    def case(cs, kk):
        def thunk():
            if not callable(fn):
                raise AssertionError(f"pass a function my_cuts(costs, n_stages) that returns the cuts, not {fn!r}: "
                                     f"the check tries it on other cost lists too")
            with calls_to(*_SOLVERS) as seen:
                try:
                    cuts = fn(list(cs), kk)
                except TypeError as e:
                    if "positional argument" in str(e):
                        raise AssertionError("write my_cuts(costs, n_stages): it gets the costs and the number of "
                                             "stages, and must work for any of them") from None
                    raise
            refuse(seen, "search the cut positions yourself (every placement, or a smarter exact method)")
            try:
                validate_cuts(cuts, len(cs), kk)
            except (TypeError, ValueError) as e:
                raise AssertionError(f"for costs {cs}, n_stages={kk}: {e}") from None
            mine, best = evaluate_split(cs, cuts), min_max_partition(cs, kk)
            assert mine.bottleneck <= best.bottleneck, (
                f"costs {cs}, n_stages={kk}: your stages cost {mine.stage_costs} (slowest {mine.bottleneck:g}); "
                f"a better split exists (its slowest stage is {best.bottleneck:g})")
        return thunk

    return run_cases(f"split costs into n_stages stages (the exercise: {list(costs)}, n_stages={n_stages})",
                     [(f"{c}, n_stages={kk}{label}", case(c, kk)) for c, kk, label in inputs],
                     hint="itertools.combinations(range(1, len(costs)), n_stages - 1) gives every placement of the "
                          "cuts; "
                          "keep the one whose slowest stage is smallest")


def check_fits(fn, seed: int | None = None) -> "object":
    """Exercise: ``fn(costs, n_stages, limit) -> bool`` must say whether ``n_stages`` stages of at most ``limit``
    each exist.

    Fixed edge cases plus cases drawn at check time (``seed`` fixes them): 40 at random, and 8 that tell the greedy
    pass from the usual wrong rules, whatever the draw (the total fits in n_stages * limit but the layers do not; one
    layer above the limit). Calling the library's ``fits`` or a partitioner instead of writing the greedy pass
    fails."""
    cases = [([10, 20, 30, 40, 50, 60], 2, 110, True), ([10, 20, 30, 40, 50, 60], 2, 109, False),
             ([5, 5, 5], 3, 5, True), ([5, 5, 5], 2, 5, False), ([1, 9, 1], 3, 8, False), ([4], 1, 4, True)]
    rng = random.Random(seed)
    for _ in range(40):
        costs = [rng.randint(0, 9) for _ in range(rng.randint(1, 8))]
        n_stages, limit = rng.randint(1, len(costs)), rng.randint(0, 30)
        cases.append((costs, n_stages, limit, fits(costs, n_stages, limit)))
    tricky = 0
    while tricky < 6:  # the total fits, the contiguous stages do not (found within a few dozen draws)
        costs = [rng.randint(1, 9) for _ in range(rng.randint(3, 8))]
        n_stages = rng.randint(2, len(costs) - 1)
        limit = -(-sum(costs) // n_stages)
        if not fits(costs, n_stages, limit):
            cases.append((costs, n_stages, limit, False))
            tricky += 1
    for _ in range(2):  # one layer above the limit, though the total would fit
        costs = [rng.randint(0, 9) for _ in range(rng.randint(2, 6))]
        costs.insert(rng.randrange(len(costs) + 1), 20 + rng.randint(1, 3))
        cases.append((costs, len(costs), 20, False))

    def case(costs, n_stages, limit, want):
        def thunk():
            with calls_to(*_SOLVERS) as seen:
                got = fn(list(costs), n_stages, limit)
            refuse(seen, "write the greedy pass yourself")
            assert bool(got) == want, (f"fits({costs}, n_stages={n_stages}, limit={limit}) returned {got!r}, "
                                       f"expected {want}")
        return thunk

    return run_cases("fits(costs, n_stages, limit)",
                     [(f"{c}, n_stages={n}, limit={lim}", case(c, n, lim, w)) for c, n, lim, w in cases],
                     hint="walk the layers once; start a new stage when adding the next layer would pass the "
                          "limit; a single layer above the limit makes it impossible")


def tour(world_size: int = 2, measured: bool = True) -> list[dict]:
    """The lab's quick path: exact partitioners vs brute force; then (``measured``) sleeping layers and a
    ``world_size``-rank GPipe run of a time-balanced ResNet split against the single process."""
    from ..pipeline import ModelStages, max_grad_error, reference_step, run_pipeline

    lab, n_stages = lab_name(__package__), world_size

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

    rows = [run_check(lab, "exact partitioners (DP, search) == brute force, 200 cases", exact)]
    if not measured:
        return rows
    ms = [10, 20, 30, 40, 50, 60]

    def sleeping():
        t0 = time.perf_counter()
        prof = profile_layers(sleep_layers(ms), torch.zeros(2, 3), repeats=1, warmup=0)
        split = balance_by_time(prof, min(n_stages, len(ms)))
        want = min_max_partition(ms, min(n_stages, len(ms))).sizes
        return split.sizes == want, (f"sizes {split.sizes} (known costs give {want}), stages "
                                     f"{[round(c) for c in split.stage_costs]} ms ({time.perf_counter() - t0:.1f} s)")

    def pipeline():
        prof = profile_layers(lab_model("small"), micro_sample("small", 4), repeats=2)
        cuts = balance_by_time(prof, n_stages).cuts
        mem = balance_by_memory(memory_costs(prof), n_stages)
        x, y = micro_sample("small", 8, 1), torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
        make = ModelStages("small", cuts=cuts)
        run = run_pipeline(make, n_stages, (x, y), 2, schedule="gpipe", timeout=120, pool=False)
        ref = reference_step(make, n_stages, (x, y), 2)
        err = max_grad_error(run.grads, ref["grads"])
        return (err < 1e-4 and abs(run.loss - ref["loss"]) < 1e-5,
                f"cuts {cuts}: max grad err {err:.1e}; memory balance would cut at {mem.cuts}; "
                f"step {run.seconds * 1e3:.0f} ms")

    rows.append(run_check(lab, f"layers sleeping 10..60 ms -> the known best {min(n_stages, len(ms))}-stage split",
                          sleeping))
    rows.append(run_check(lab, f"time-balanced ResNet split, {n_stages}-rank GPipe == single process", pipeline))
    return rows
