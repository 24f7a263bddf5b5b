"""Load balancing for pipelines: profile each layer, then cut the layers into stages so that the
slowest stage (which sets the pace of the whole pipeline) is as fast as it can be.

    model = balance.sleep_layers([10, 20, 30, 40, 50, 60])   # six layers that sleep 10..60 ms
    prof = balance.profile_layers(model, torch.ones(2, 3))   # forward+backward ms, parameter and activation bytes
    split = balance.balance_by_time(prof, 2)                 # exact: minimises the slowest stage
    split.cuts, split.sizes                                  # [4], [4, 2]: 100 ms | 110 ms

Vocabulary (docs/glossary.md). ``n`` layers are cut into ``n_stages`` contiguous stages by ``n_stages - 1``
*cuts*: a cut ``c`` means "a new stage starts at layer ``c``", so the cuts are strictly increasing integers in
``1 .. n-1`` (:mod:`labkit.partition`, shared with :mod:`labkit.sliced` and :class:`labkit.pipeline.ModelStages`).
``sizes`` (layers per stage, what torchgpipe calls a
*balance*) say the same thing: ``cuts [4]`` of 6 layers is ``sizes [4, 2]``.

The problem. Given non-negative layer costs ``c_0 .. c_{n-1}``, choose the cuts minimising
``max_s sum(c in stage s)``: the "linear partition" or "block partition" problem. It is solved
exactly here in two ways (they agree; the tests check both against brute force):

* dynamic programming, ``best[j][i] = min_s max(best[j-1][s], c_s + ... + c_{i-1})``, O(n_stages n^2);
* binary search over the answer: the optimum is one of the O(n^2) sums of a contiguous block,
  and "can every stage stay under L?" is answered exactly by a greedy pass that packs layers into
  a stage until the next one would exceed L. The smallest feasible block sum is the optimum.

A greedy split that walks the layers once and starts a new stage when the running sum passes
``total / n_stages`` is *not* exact; :func:`greedy_split` exists only to show it losing.

The idea of profiling layers and solving a block partition comes from torchgpipe's
``balance_by_time`` / ``balance_by_size`` (kakaobrain/torchgpipe, ``torchgpipe/balance``), whose
tests use layers that sleep so that the optimum is known; this module is written from scratch.
Profiling is in :mod:`.profile`; measured stage times and pipeline runs in :mod:`.run`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

from .._compat import renamed_kwargs
from .._validate import validate_int
from ..partition import as_costs as _as_costs
from ..partition import cuts_to_sizes, stage_sums, validate_cuts, validate_stages


def _prefix(costs: list[float]) -> list[float]:
    return [0, *itertools.accumulate(costs)]


# --------------------------------------------------------------------------- exact partitioners
@dataclass
class Split:
    """A partition of the layers into stages, with what it costs."""

    cuts: list[int]
    sizes: list[int]
    stage_costs: list[float]

    @property
    def bottleneck(self) -> float:
        """The slowest (or largest) stage: it sets the pipeline's pace (or the memory it needs)."""
        return max(self.stage_costs)

    @property
    def imbalance(self) -> float:
        """bottleneck / mean stage cost: 1.0 is perfect balance; 1.5 means the slowest stage is 50% above average."""
        mean = sum(self.stage_costs) / len(self.stage_costs)
        return self.bottleneck / mean if mean > 0 else 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "bottleneck": self.bottleneck, "imbalance": self.imbalance}


def evaluate_split(costs, cuts) -> Split:
    """The :class:`Split` that ``cuts`` gives for these costs."""
    costs = _as_costs(costs)
    cuts = validate_cuts(cuts, len(costs))
    return Split(cuts, cuts_to_sizes(cuts, len(costs)), stage_sums(costs, cuts))


def _greedy_cuts(p: list[float], n: int, limit: float) -> list[int] | None:
    """Pack layers into stages while the stage sum stays <= limit; the cuts, or None if a layer alone exceeds it."""
    cuts, start = [], 0
    for i in range(1, n + 1):
        if p[i] - p[start] > limit:  # layer i-1 does not fit in the current stage: start a new one there
            if i - 1 == start:
                return None
            cuts.append(i - 1)
            start = i - 1
            if p[i] - p[start] > limit:
                return None
    return cuts


@renamed_kwargs(k="n_stages")
def fits(costs, n_stages: int, limit: float) -> bool:
    """Can ``costs`` be cut into at most ``n_stages`` contiguous stages, each summing to at most ``limit``?

    Exact, by a greedy pass: put each layer in the current stage unless that would exceed the
    limit, in which case start a new stage. (Closing a stage any earlier can only push more
    layers into later stages, so the greedy pass uses the fewest stages possible.)
    """
    costs = _as_costs(costs)
    n_stages = validate_int("n_stages (the number of stages)", n_stages, minimum=1)
    cuts = _greedy_cuts(_prefix(costs), len(costs), limit)
    return cuts is not None and len(cuts) + 1 <= n_stages


def _fill_cuts(cuts: list[int], n: int, n_stages: int) -> list[int]:
    """Add cuts (at the earliest free places) until there are n_stages - 1; splitting a stage never raises the
    maximum."""
    have = set(cuts)
    for c in range(1, n):
        if len(have) >= n_stages - 1:
            break
        have.add(c)
    return sorted(have)


def _partition_search(costs: list[float], n_stages: int) -> list[int]:
    p, n = _prefix(costs), len(costs)
    candidates = sorted({p[j] - p[i] for i in range(n) for j in range(i + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1  # candidates[hi] (the total) is always feasible
    while lo < hi:
        mid = (lo + hi) // 2
        cuts = _greedy_cuts(p, n, candidates[mid])
        if cuts is not None and len(cuts) + 1 <= n_stages:
            hi = mid
        else:
            lo = mid + 1
    return _fill_cuts(_greedy_cuts(p, n, candidates[lo]), n, n_stages)


def _partition_dp(costs: list[float], n_stages: int) -> list[int]:
    p, n = _prefix(costs), len(costs)
    inf = float("inf")
    # best[j][i]: the smallest possible slowest stage when the first i layers form j stages
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    arg = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for j in range(1, n_stages + 1):
        for i in range(j, n - (n_stages - j) + 1):
            for s in range(j - 1, i):  # the last stage is layers s .. i-1
                v = max(best[j - 1][s], p[i] - p[s])
                if v < best[j][i]:
                    best[j][i], arg[j][i] = v, s
    cuts, i = [], n
    for j in range(n_stages, 1, -1):
        i = arg[j][i]
        cuts.append(i)
    return cuts[::-1]


@renamed_kwargs(k="n_stages")
def min_max_partition(costs, n_stages: int, method: str = "dp") -> Split:
    """Cut ``costs`` into ``n_stages`` contiguous non-empty stages minimising the largest stage sum (exact).

    ``method="dp"`` (dynamic programming) or ``"search"`` (binary search over the answer with the
    greedy :func:`fits` test). Both return an optimal split; when several splits are optimal they
    may pick different ones.
    """
    costs = _as_costs(costs)
    validate_stages(n_stages, len(costs))
    if method == "dp":
        cuts = _partition_dp(costs, n_stages)
    elif method == "search":
        cuts = _partition_search(costs, n_stages)
    else:
        raise ValueError(f"method must be 'dp' or 'search', got {method!r}")
    return evaluate_split(costs, cuts)


@renamed_kwargs(k="n_stages")
def brute_force_partition(costs, n_stages: int) -> Split:
    """Try every way to place n_stages - 1 cuts (C(n-1, n_stages-1) of them): the reference for small cases."""
    costs = _as_costs(costs)
    n = len(costs)
    validate_stages(n_stages, n)
    if math.comb(n - 1, n_stages - 1) > 200_000:
        raise ValueError(f"brute force over C({n - 1}, {n_stages - 1}) splits would take too long; "
                         f"use min_max_partition")
    best = min((evaluate_split(costs, list(c)) for c in itertools.combinations(range(1, n), n_stages - 1)),
               key=lambda s: s.bottleneck)
    return best


@renamed_kwargs(k="n_stages")
def greedy_split(costs, n_stages: int) -> Split:
    """NOT exact: one left-to-right pass that closes a stage once it reaches total/n_stages. Shown to lose."""
    costs = _as_costs(costs)
    n = len(costs)
    validate_stages(n_stages, n)
    target, cuts, acc = sum(costs) / n_stages, [], 0.0
    for i, c in enumerate(costs):
        acc += c
        left_layers, left_stages = n - (i + 1), n_stages - 1 - len(cuts)
        if left_stages and (acc >= target or left_layers == left_stages) and left_layers >= left_stages:
            cuts.append(i + 1)
            acc = 0.0
    return evaluate_split(costs, cuts)


# --------------------------------------------------------------------------- what the split predicts
@renamed_kwargs(m="n_micro")
def gpipe_timeline(forward_ms: Sequence[float], backward_ms: Sequence[float], n_micro: int,
                   comm_ms: float = 0.0) -> tuple[float, list[dict]]:
    """Predict a GPipe step: stage s spends forward_ms[s] / backward_ms[s] per micro-batch; ``n_micro`` of them.

    Every forward of micro-batch i on stage s waits for stage s-1 to finish it (plus ``comm_ms``)
    and for stage s to finish micro-batch i-1; backwards run after the last forward, in reverse.
    Played by :func:`labkit.pipeline.simulate` on the GPipe schedule. Returns
    ``(makespan_ms, events)``, events in the :func:`labkit.viz.gantt` format (seconds). In the
    steady state one micro-batch leaves every ``max_s(forward_ms[s] + backward_ms[s])``: the
    slowest stage sets the pace, and with equal stages the step is ``(n_micro + n_stages - 1)(f + b)``.
    """
    from ..pipeline.schedules import gpipe, simulate

    f, b = _as_costs(forward_ms, "forward_ms"), _as_costs(backward_ms, "backward_ms")
    if len(f) != len(b):
        raise ValueError(f"forward_ms has {len(f)} stages but backward_ms has {len(b)}; give one time per stage")
    n_micro = validate_int("n_micro (micro-batches)", n_micro, minimum=1)
    sim = simulate(gpipe(len(f), n_micro), forward=list(f), backward=list(b), comm=comm_ms)
    events = [dict(e, start=e["start"] / 1e3, end=e["end"] / 1e3,
                   label=("F" if e["kind"] == "forward" else "B") + str(e["micro"])) for e in sim["events"]]
    return sim["makespan"], events
