"""Load balancing for pipelines: profile each layer, then cut the layers into stages so that the
slowest stage (which sets the pace of the whole pipeline) is as fast as it can be.

    model = balance.sleep_layers([10, 20, 30, 40, 50, 60])   # six layers that sleep 10..60 ms
    prof = balance.profile_layers(model, torch.ones(2, 3))   # forward+backward ms, parameter and activation bytes
    split = balance.balance_by_time(prof, 2)                 # exact: minimises the slowest stage
    split.cuts, split.sizes                                  # [4], [4, 2]: 100 ms | 110 ms

Vocabulary. ``n`` layers are cut into ``k`` contiguous stages by ``k - 1`` *cuts*: a cut ``c``
means "a new stage starts at layer ``c``", so the cuts are strictly increasing integers in
``1 .. n-1`` (the same convention as the ``boundaries`` of :mod:`labkit.sliced` and
:class:`labkit.pipeline.SplitModel`). ``sizes`` (layers per stage, what torchgpipe calls a
*balance*) say the same thing: ``cuts [4]`` of 6 layers is ``sizes [4, 2]``.

The problem. Given non-negative layer costs ``c_0 .. c_{n-1}``, choose the cuts minimising
``max_s sum(c in stage s)``: the "linear partition" or "block partition" problem. It is solved
exactly here in two ways (they agree; the tests check both against brute force):

* dynamic programming, ``best[j][i] = min_s max(best[j-1][s], c_s + ... + c_{i-1})``, O(k n^2);
* binary search over the answer: the optimum is one of the O(n^2) sums of a contiguous block,
  and "can every stage stay under L?" is answered exactly by a greedy pass that packs layers into
  a stage until the next one would exceed L. The smallest feasible block sum is the optimum.

A greedy split that walks the layers once and starts a new stage when the running sum passes
``total / k`` is *not* exact; :func:`greedy_split` exists only to show it losing.

The idea of profiling layers and solving a block partition comes from torchgpipe's
``balance_by_time`` / ``balance_by_size`` (kakaobrain/torchgpipe, ``torchgpipe/balance``), whose
tests use layers that sleep so that the optimum is known; this module is written from scratch.
Measured stage times and pipeline runs live in :mod:`labkit.balance_run`.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .pipeline_stages import _Sleep  # one sleeping autograd function for labs 04 and 05

__all__ = [
    "LayerProfile", "Split", "SleepLayer", "as_layers", "profile_layers", "check_cuts", "cuts_to_sizes",
    "sizes_to_cuts", "even_cuts", "stage_sums", "fits", "min_max_partition", "brute_force_partition",
    "greedy_split", "evaluate_split", "balance_by_time", "balance_by_memory", "memory_costs",
    "sleep_layers", "gpipe_timeline", "check_hand_split", "check_fits", "tour",
]


# --------------------------------------------------------------------------- cuts and sizes
def _as_costs(costs, what: str = "costs") -> list[float]:
    if hasattr(costs, "tolist"):
        costs = costs.tolist()
    if isinstance(costs, (str, bytes)) or not isinstance(costs, Sequence):
        raise TypeError(f"{what} must be a list of non-negative numbers (one per layer), got {type(costs).__name__}")
    out = []
    for i, c in enumerate(costs):
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise TypeError(f"{what}[{i}] is {c!r}; pass plain numbers (milliseconds, bytes, ...)")
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"{what}[{i}] = {c!r}: every cost must be a finite number >= 0")
        out.append(c)
    if not out:
        raise ValueError(f"{what} is empty: pass one cost per layer")
    return out


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"the number of stages must be an int, got {k!r}")
    if k < 1:
        raise ValueError(f"the number of stages must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"cannot cut {n} layer(s) into {k} stages: every stage needs at least one layer; "
                         f"use at most {n} stages (or profile a finer-grained model)")
    return k


def check_cuts(cuts, n_layers: int, n_stages: int | None = None) -> list[int]:
    """Validate cut points for ``n_layers`` layers (and ``n_stages`` stages if given); return them as a list."""
    if isinstance(cuts, (str, bytes)) or not isinstance(cuts, (list, tuple)) and not hasattr(cuts, "tolist"):
        raise TypeError(f"cuts must be a list of ints (the index where each stage after the first starts), "
                        f"got {type(cuts).__name__}")
    cuts = list(cuts.tolist() if hasattr(cuts, "tolist") else cuts)
    for c in cuts:
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"cut {c!r} is not an int; cuts are layer indices such as [4] or [3, 7]")
    if n_stages is not None and len(cuts) != n_stages - 1:
        raise ValueError(f"{n_stages} stages need {n_stages - 1} cut(s), got {len(cuts)}: {cuts}")
    for c in cuts:
        if not 1 <= c <= n_layers - 1:
            raise ValueError(f"cut {c} is out of range: with {n_layers} layers a cut must be in 1..{n_layers - 1} "
                             f"(a cut at 0 or {n_layers} would leave a stage empty)")
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cuts must be strictly increasing (each stage needs at least one layer), got {cuts}; "
                         f"try sorted(set(cuts))")
    return cuts


def cuts_to_sizes(cuts, n_layers: int) -> list[int]:
    """``[4]`` with 6 layers -> ``[4, 2]`` (layers per stage)."""
    cuts = check_cuts(cuts, n_layers)
    edges = [0, *cuts, n_layers]
    return [b - a for a, b in zip(edges, edges[1:])]


def sizes_to_cuts(sizes) -> list[int]:
    """``[4, 2]`` -> ``[4]``; every size must be >= 1."""
    sizes = list(sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of ints >= 1 (layers per stage), got {sizes}")
    return list(itertools.accumulate(sizes))[:-1]


def even_cuts(n_layers: int, k: int) -> list[int]:
    """The naive split: the same number of layers per stage (the first stages take the remainder)."""
    _check_k(k, n_layers)
    q, r = divmod(n_layers, k)
    return sizes_to_cuts([q + (1 if s < r else 0) for s in range(k)])


def _prefix(costs: list[float]) -> list[float]:
    return [0, *itertools.accumulate(costs)]


def stage_sums(costs, cuts) -> list[float]:
    """The cost of each stage: the sum of its layers' costs."""
    costs = _as_costs(costs)
    cuts = check_cuts(cuts, len(costs))
    p = _prefix(costs)
    edges = [0, *cuts, len(costs)]
    return [p[b] - p[a] for a, b in zip(edges, edges[1:])]


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
    cuts = check_cuts(cuts, len(costs))
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


def fits(costs, k: int, limit: float) -> bool:
    """Can ``costs`` be cut into at most ``k`` contiguous stages, each summing to at most ``limit``?

    Exact, by a greedy pass: put each layer in the current stage unless that would exceed the
    limit, in which case start a new stage. (Closing a stage any earlier can only push more
    layers into later stages, so the greedy pass uses the fewest stages possible.)
    """
    costs = _as_costs(costs)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (the number of stages), got {k!r}")
    cuts = _greedy_cuts(_prefix(costs), len(costs), limit)
    return cuts is not None and len(cuts) + 1 <= k


def _fill_cuts(cuts: list[int], n: int, k: int) -> list[int]:
    """Add cuts (at the earliest free places) until there are k - 1; splitting a stage never raises the maximum."""
    have = set(cuts)
    for c in range(1, n):
        if len(have) >= k - 1:
            break
        have.add(c)
    return sorted(have)


def _partition_search(costs: list[float], k: int) -> list[int]:
    p, n = _prefix(costs), len(costs)
    candidates = sorted({p[j] - p[i] for i in range(n) for j in range(i + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1  # candidates[hi] (the total) is always feasible
    while lo < hi:
        mid = (lo + hi) // 2
        cuts = _greedy_cuts(p, n, candidates[mid])
        if cuts is not None and len(cuts) + 1 <= k:
            hi = mid
        else:
            lo = mid + 1
    return _fill_cuts(_greedy_cuts(p, n, candidates[lo]), n, k)


def _partition_dp(costs: list[float], k: int) -> list[int]:
    p, n = _prefix(costs), len(costs)
    inf = float("inf")
    # best[j][i]: the smallest possible slowest stage when the first i layers form j stages
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):  # the last stage is layers s .. i-1
                v = max(best[j - 1][s], p[i] - p[s])
                if v < best[j][i]:
                    best[j][i], arg[j][i] = v, s
    cuts, i = [], n
    for j in range(k, 1, -1):
        i = arg[j][i]
        cuts.append(i)
    return cuts[::-1]


def min_max_partition(costs, k: int, method: str = "dp") -> Split:
    """Cut ``costs`` into ``k`` contiguous non-empty stages minimising the largest stage sum (exact).

    ``method="dp"`` (dynamic programming) or ``"search"`` (binary search over the answer with the
    greedy :func:`fits` test). Both return an optimal split; when several splits are optimal they
    may pick different ones.
    """
    costs = _as_costs(costs)
    _check_k(k, len(costs))
    if method == "dp":
        cuts = _partition_dp(costs, k)
    elif method == "search":
        cuts = _partition_search(costs, k)
    else:
        raise ValueError(f"method must be 'dp' or 'search', got {method!r}")
    return evaluate_split(costs, cuts)


def brute_force_partition(costs, k: int) -> Split:
    """Try every way to place k - 1 cuts (C(n-1, k-1) of them): the reference for small cases."""
    costs = _as_costs(costs)
    n = len(costs)
    _check_k(k, n)
    if math.comb(n - 1, k - 1) > 200_000:
        raise ValueError(f"brute force over C({n - 1}, {k - 1}) splits would take too long; use min_max_partition")
    best = min((evaluate_split(costs, list(c)) for c in itertools.combinations(range(1, n), k - 1)),
               key=lambda s: s.bottleneck)
    return best


def greedy_split(costs, k: int) -> Split:
    """NOT exact: one left-to-right pass that closes a stage once it reaches total/k. Shown to lose."""
    costs = _as_costs(costs)
    n = len(costs)
    _check_k(k, n)
    target, cuts, acc = sum(costs) / k, [], 0.0
    for i, c in enumerate(costs):
        acc += c
        left_layers, left_stages = n - (i + 1), k - 1 - len(cuts)
        if left_stages and (acc >= target or left_layers == left_stages) and left_layers >= left_stages:
            cuts.append(i + 1)
            acc = 0.0
    return evaluate_split(costs, cuts)


# --------------------------------------------------------------------------- profiling
def as_layers(model) -> list:
    """The layers of an ``nn.Sequential`` (or a list/tuple of modules), as a list."""
    if isinstance(model, nn.Sequential):
        layers = list(model)
    elif isinstance(model, (list, tuple)) and all(isinstance(m, nn.Module) for m in model):
        layers = list(model)
    elif isinstance(model, nn.Module):
        raise TypeError(f"{type(model).__name__} is not a sequence of layers: pass an nn.Sequential or a list of "
                        f"modules (for a ResNet, labkit.sliced.flatten_resnet(model) gives one)")
    else:
        raise TypeError(f"pass an nn.Sequential or a list of nn.Module layers, got {type(model).__name__}")
    if not layers:
        raise ValueError("the model has no layers to profile")
    return layers


@dataclass
class LayerProfile:
    """What one layer costs: time per training step (median of repeats) and memory."""

    index: int
    name: str
    forward_ms: float
    backward_ms: float
    param_bytes: int
    activation_bytes: int  # tensors autograd saves for the backward pass (parameters excluded)
    output_bytes: int      # the tensor handed to the next layer (what a pipeline stage would send)

    @property
    def time_ms(self) -> float:
        return self.forward_ms + self.backward_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "time_ms": self.time_ms}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"a layer returned {type(out).__name__}; balancing needs layers that take and return one tensor")


def profile_layers(model, sample, repeats: int = 5, warmup: int = 1) -> list[LayerProfile]:
    """Time each layer's forward and backward (median of ``repeats``) and measure its memory.

    Each layer runs on the previous layer's output (detached, so its backward is timed alone),
    with a random output gradient. Parameter bytes are counted from the layer's parameters;
    activation bytes are the tensors autograd keeps for the layer's backward (found with
    ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded, each storage once).
    The layers run in their current mode (``train()`` for training costs) on the sample's device
    (synchronised on CUDA). The model's parameters, gradients and buffers (BatchNorm statistics)
    are left as they were.
    """
    layers = as_layers(model)
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be an input tensor (a batch), got {type(sample).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    params = [p for m in layers for p in m.parameters()]
    saved_grads = [p.grad for p in params]
    saved_buffers = [(b, b.detach().clone()) for m in layers for b in m.buffers()]
    fwd = [[] for _ in layers]
    bwd = [[] for _ in layers]
    act_bytes, out_bytes = [0] * len(layers), [0] * len(layers)
    _warm_autograd()
    try:
        for it in range(warmup + repeats):
            x = sample.detach()
            for i, layer in enumerate(layers):
                leaf = x.detach().requires_grad_(x.is_floating_point())
                inp = leaf.clone() if leaf.requires_grad else leaf  # a clone lets in-place layers (ReLU) run
                param_ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters()}
                storages: dict[int, int] = {}

                def pack(t, storages=storages, param_ptrs=param_ptrs):
                    try:
                        st = t.untyped_storage()
                        if st.data_ptr() not in param_ptrs:
                            storages[st.data_ptr()] = st.nbytes()
                    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, ...)
                        storages[id(t)] = _nbytes(t)
                    return t

                _sync(x)
                t0 = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = _first_tensor(layer(inp))
                _sync(out)
                t1 = time.perf_counter()
                if out.requires_grad:
                    grad = torch.randn_like(out)
                    _sync(grad)
                    t2 = time.perf_counter()
                    torch.autograd.backward(out, grad)
                    _sync(out)
                    t3 = time.perf_counter()
                else:
                    t2 = t3 = 0.0
                if it >= warmup:
                    fwd[i].append(t1 - t0)
                    bwd[i].append(t3 - t2)
                    act_bytes[i] = sum(storages.values())
                    out_bytes[i] = _nbytes(out)
                x = out.detach()
    finally:
        with torch.no_grad():
            for p, g in zip(params, saved_grads):
                p.grad = g
            for b, v in saved_buffers:
                b.copy_(v)
    names = [type(m).__name__ for m in layers]
    return [LayerProfile(i, names[i], 1e3 * statistics.median(fwd[i]), 1e3 * statistics.median(bwd[i]),
                         sum(_nbytes(p) for p in layers[i].parameters()), act_bytes[i], out_bytes[i])
            for i in range(len(layers))]


def _warm_autograd() -> None:
    """The first ``backward(out, grad)`` in a process imports torch's symbolic-shape machinery
    (sympy): a one-off second or more. Pay it here, before anything is timed."""
    x = torch.ones(2, requires_grad=True)
    y = _Sleep.apply(x * 1, torch.ones(()), 0.0, 0.0, False)
    torch.autograd.backward(y, torch.ones_like(y))


def _sync(t) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def _costs_from(profiles_or_costs, key: Callable[[LayerProfile], float]) -> list[float]:
    items = list(profiles_or_costs)
    if items and all(isinstance(p, LayerProfile) for p in items):
        return [key(p) for p in items]
    return _as_costs(items)


def balance_by_time(profiles_or_costs, k: int, method: str = "dp") -> Split:
    """The split minimising the slowest stage's forward+backward time (profiles, or a list of ms)."""
    return min_max_partition(_costs_from(profiles_or_costs, lambda p: p.time_ms), k, method)


def memory_costs(profiles: Sequence[LayerProfile], param_scale: float = 4.0, micro_batches: int = 1) -> list[float]:
    """Bytes each layer needs on its stage: parameters x ``param_scale`` + saved activations x ``micro_batches``.

    ``param_scale`` counts the copies kept per parameter: 1 (weights) + 1 (gradients) + the
    optimiser's state (2 for Adam's two moments): 4 by default. A GPipe stage keeps the
    activations of every micro-batch in flight until its backward (``micro_batches`` of them).
    """
    if not isinstance(param_scale, (int, float)) or param_scale < 0:
        raise ValueError(f"param_scale must be a number >= 0 (copies per parameter), got {param_scale!r}")
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
    if not all(isinstance(p, LayerProfile) for p in profiles):
        raise TypeError("memory_costs needs the LayerProfile list that profile_layers returns")
    return [float(p.param_bytes * param_scale + p.activation_bytes * micro_batches) for p in profiles]


def balance_by_memory(profiles_or_costs, k: int, param_scale: float = 4.0, micro_batches: int = 1,
                      method: str = "dp") -> Split:
    """The split minimising the largest stage's memory (see :func:`memory_costs`), from profiles or a list of bytes."""
    items = list(profiles_or_costs)
    if items and all(isinstance(p, LayerProfile) for p in items):
        items = memory_costs(items, param_scale, micro_batches)
    return min_max_partition(items, k, method)


# --------------------------------------------------------------------------- layers that sleep
class SleepLayer(nn.Module):
    """A layer whose forward sleeps ``forward_ms`` and whose backward sleeps ``backward_ms``: its cost is known."""

    def __init__(self, forward_ms: float, backward_ms: float = 0.0):
        super().__init__()
        for name, v in (("forward_ms", forward_ms), ("backward_ms", backward_ms)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number of milliseconds >= 0, got {v!r}")
        self.forward_ms, self.backward_ms = float(forward_ms), float(backward_ms)
        self.gain = nn.Parameter(torch.ones(()))  # 1.0: a parameter, so a pipeline of these has gradients

    def forward(self, x):
        return _Sleep.apply(x, self.gain, self.forward_ms / 1e3, self.backward_ms / 1e3, False)

    def extra_repr(self) -> str:
        return f"forward_ms={self.forward_ms:g}, backward_ms={self.backward_ms:g}"


def sleep_layers(forward_ms: Sequence[float], backward_ratio: float = 0.0) -> nn.Sequential:
    """An ``nn.Sequential`` of :class:`SleepLayer`; layer i sleeps forward_ms[i] (and backward_ratio times that)."""
    ms = _as_costs(forward_ms, "forward_ms")
    return nn.Sequential(*[SleepLayer(m, m * backward_ratio) for m in ms])


# --------------------------------------------------------------------------- what the split predicts
def gpipe_timeline(forward_ms: Sequence[float], backward_ms: Sequence[float], m: int,
                   comm_ms: float = 0.0) -> tuple[float, list[dict]]:
    """Predict a GPipe step: stage s spends forward_ms[s] / backward_ms[s] per micro-batch; m micro-batches.

    Every forward of micro-batch i on stage s waits for stage s-1 to finish it (plus ``comm_ms``)
    and for stage s to finish micro-batch i-1; backwards run after the last forward, in reverse.
    Played by :func:`labkit.schedules.simulate` on the GPipe schedule. Returns
    ``(makespan_ms, events)``, events in the :func:`labkit.viz.gantt` format (seconds). In the
    steady state one micro-batch leaves every ``max_s(forward_ms[s] + backward_ms[s])``: the
    slowest stage sets the pace, and with equal stages the step is ``(m + p - 1)(f + b)``.
    """
    from .schedules import gpipe, simulate

    f, b = _as_costs(forward_ms, "forward_ms"), _as_costs(backward_ms, "backward_ms")
    if len(f) != len(b):
        raise ValueError(f"forward_ms has {len(f)} stages but backward_ms has {len(b)}; give one time per stage")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (micro-batches) must be an int >= 1, got {m!r}")
    sim = simulate(gpipe(len(f), m), forward=list(f), backward=list(b), comm=comm_ms)
    events = [dict(e, start=e["start"] / 1e3, end=e["end"] / 1e3,
                   label=("F" if e["kind"] == "forward" else "B") + str(e["micro"])) for e in sim["events"]]
    return sim["makespan"], events


# --------------------------------------------------------------------------- exercise checks
EXERCISE_COSTS = [7, 2, 5, 8, 3, 6, 4, 9, 1, 5]
EXERCISE_STAGES = 3


def check_hand_split(cuts_or_fn, costs: Sequence[float] = EXERCISE_COSTS, k: int = EXERCISE_STAGES):
    """Exercise: give cuts (or a function returning them) that split ``costs`` into ``k`` stages optimally."""
    from .checks import run_cases

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

    from .checks import run_cases

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


def tour(measured: bool = True) -> list[dict]:
    """The lab's quick path: exact partitioners vs brute force; then (``measured``) sleeping layers and a
    2-rank GPipe run of a balanced ResNet split against the single process (:func:`labkit.balance_run.tour_measured`)."""
    import random

    rows = []
    rng = random.Random(0)
    bad = 0
    for _ in range(200):
        n = rng.randint(1, 9)
        costs = [rng.randint(0, 20) for _ in range(n)]
        k = rng.randint(1, n)
        ref = brute_force_partition(costs, k).bottleneck
        bad += (min_max_partition(costs, k, "dp").bottleneck != ref) + (min_max_partition(costs, k, "search").bottleneck != ref)
    rows.append({"lab": "05 load balancing", "check": "exact partitioners (DP, search) == brute force, 200 cases",
                 "ok": bad == 0, "detail": f"{bad} mismatches"})
    if measured:
        from .balance_run import tour_measured

        rows.extend(tour_measured())
    return rows
