"""Lab 11's planner on the simulator: every layout of a model on a cluster, ranked by predicted step time (pure).

:func:`rank_layouts` tries every (dp, tp, pp) whose product is the GPU count, each ZeRO stage and each pipeline
schedule asked for, on top of a ``base`` :class:`~labkit.capstone.simulator.Layout` that fixes the rest (precision,
recomputation, micro-batch handling, flash attention, ...). A layout is discarded, with the reason in words:

- when a rule of the simulator refuses it (:func:`~labkit.capstone.simulator.problems`: tp larger than a node or
  not dividing the heads, more stages than layers, a global batch that does not split over dp, fewer
  micro-batches than stages for a 1F1B-like schedule, ...);
- when its first pipeline stage does not fit the card: the simulator's memory
  (:func:`~labkit.capstone.simulator.memory_each_gpu`, lab 09's formulas) above ``(1 - headroom)`` of
  ``hardware.memory_bytes``; ``headroom`` is kept for what the formulas leave out (the CUDA context, NCCL's
  buffers, the allocator's fragmentation).

The memory is checked before the step is simulated, so discarded layouts cost little. The rest are ranked by
:func:`~labkit.capstone.simulator.predict`'s step time, fastest first; among equal times (ZeRO 1 and 2 move the
same bytes) the lower stage comes first. :func:`planner.plan <labkit.capstone.planner.plan>` is the first-order
version of the same question, by hand (bandwidth only, no latency, no schedule): lab 11's section 5 and its
exercise use it; this is what the simulator says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .._validate import ArgumentError, validate_int, validate_number
from ..viz import format_table
from .simulator import (
    SCHEDULES,
    Hardware,
    Layout,
    StepResult,
    Transformer,
    in_flight,
    memory_each_gpu,
    predict,
    problems,
)

__all__ = ["Ranked", "rank_layouts", "ranking_table", "grids", "megatron_145b"]

GiB = 2 ** 30


@dataclass
class Ranked:
    """One layout and what the simulator says of it: ``result`` (None when discarded before simulating),
    ``memory_bytes`` of the first stage (NaN when a rule refused it first) and ``reasons`` (empty: feasible)."""

    layout: Layout
    result: StepResult | None = None
    memory_bytes: float = math.nan
    reasons: list = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.reasons

    @property
    def step_seconds(self) -> float:
        return self.result.step_seconds if self.result is not None else math.nan

    def as_row(self) -> dict:
        L, r = self.layout, self.result
        return {"dp": L.dp, "tp": L.tp, "pp": L.pp, "cp": L.cp, "ZeRO": L.zero,
                "schedule": L.schedule + (f"×{L.chunks}" if L.chunks > 1 else ""),
                "m": r.n_micro if r else "", "memory GiB": self.memory_bytes / GiB,
                "step s": r.step_seconds if r else math.nan, "MFU": r.mfu if r else math.nan,
                "bubble": r.bubble if r else math.nan, "verdict": "ok" if self.feasible else self.reasons[0]}


def grids(gpus: int, cp: int = 1) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) with dp·tp·pp·cp = ``gpus``, tp then pp ascending."""
    gpus, cp = validate_int("gpus", gpus, minimum=1), validate_int("cp", cp, minimum=1)
    if gpus % cp:
        raise ArgumentError(f"cp must divide gpus={gpus}, got cp={cp}")
    n = gpus // cp
    return [(n // (t * p), t, p) for t in range(1, n + 1) if n % t == 0
            for p in range(1, n // t + 1) if (n // t) % p == 0]


def _candidates(gpus, base, zero, schedules, chunks):
    for dp, tp, pp in grids(gpus, base.cp):
        for s in schedules if pp > 1 else ("1f1b",):  # one stage: no schedule to choose
            for v in (chunks if s == "interleaved" else (1,)):
                # ZeRO innermost: stages 0-2 play the same pipeline, which the simulator then finds in its cache
                for z in zero if dp > 1 else (0,):  # without data parallelism the stages are all the same
                    yield replace(base, dp=dp, tp=tp, pp=pp, zero=z, schedule=s, chunks=v)


def rank_layouts(model: Transformer, hardware: Hardware, gpus: int, *, base: Layout = Layout(),
                 zero=(0, 1, 2, 3), schedules=None, chunks=(2,), headroom: float = 0.1,
                 even_layers: bool = True, progress=None) -> list[Ranked]:
    """Every layout of ``model`` on ``gpus`` GPUs of ``hardware`` (see the module docstring): the feasible ones
    first, fastest predicted step first, then the discarded ones (fewest reasons, then by the first). ``base``
    fixes what is not searched (its dp, tp, pp, zero, schedule and chunks are replaced); ``schedules`` defaults to
    ``(base.schedule,)``; ``chunks``: the model chunks a GPU tries under the interleaved schedule;
    ``even_layers``: refuse a layout whose pp·chunks does not divide the layers, as Megatron-LM does.
    ``progress``: called with (done, total) after each layout."""
    if not isinstance(model, Transformer):
        raise ArgumentError(f"model must be a simulator.Transformer, got {type(model).__name__}")
    if not isinstance(base, Layout):
        raise ArgumentError(f"base must be a simulator.Layout, got {type(base).__name__}; pass Layout(recompute=, "
                            "precision=, dtype=, ...) with what the search should not change")
    hardware.validate(base.dtype)
    gpus = validate_int("gpus", gpus, minimum=1, hint="the number of GPUs in the cluster")
    headroom = validate_number("headroom", headroom, minimum=0, maximum=1, open_high=True,
                               hint="the share of each GPU's memory kept free, e.g. 0.1")
    zero = tuple(validate_int("zero", z, minimum=0, maximum=3, hint="ZeRO stages among 0, 1, 2, 3") for z in zero)
    schedules = (base.schedule,) if schedules is None else tuple(schedules)
    bad = [s for s in schedules if s not in SCHEDULES]
    if not schedules or bad:
        raise ArgumentError(f"schedules must be a non-empty selection of {SCHEDULES}, got {schedules!r}")
    chunks = tuple(validate_int("chunks", v, minimum=2, hint="model chunks a GPU under 'interleaved'")
                   for v in chunks)
    if not chunks and "interleaved" in schedules:
        raise ArgumentError("chunks must name at least one count (e.g. (2,)) when schedules holds 'interleaved'")
    if not isinstance(even_layers, bool):
        raise ArgumentError(f"even_layers must be True or False, got {even_layers!r}")
    usable = hardware.memory_bytes * (1 - headroom)
    todo = list(_candidates(gpus, base, zero, schedules, chunks))
    out = []
    for i, layout in enumerate(todo):
        r = Ranked(layout, reasons=problems(model, hardware, layout, gpus))
        if even_layers and model.layers % (layout.pp * layout.chunks):
            r.reasons.append(f"pp·chunks={layout.pp * layout.chunks} does not divide layers={model.layers}: "
                             "Megatron-LM gives every model chunk the same number of layers (even_layers=False "
                             "allows one fewer on the end chunks, as Llama 3 did)")
        if not r.reasons:
            m = model.global_batch // (layout.dp * model.micro_batch)
            r.memory_bytes = memory_each_gpu(model, layout, in_flight(layout.schedule, layout.pp, m,
                                                                      layout.chunks))["total"]
            if r.memory_bytes > usable:
                r.reasons.append(f"does not fit: the first stage needs {r.memory_bytes / GiB:.1f} GiB of the "
                                 f"{usable / GiB:.1f} GiB usable ({hardware.memory_bytes / GiB:g} GiB less "
                                 f"{headroom:.0%} headroom)")
            else:
                r.result = predict(model, hardware, layout, gpus)
        out.append(r)
        if progress is not None:
            progress(i + 1, len(todo))

    def key(r):
        if r.feasible:
            return (0, r.step_seconds, r.layout.zero, 0, "")
        return (1, len(r.reasons), math.inf, 0, r.reasons[0])
    return sorted(out, key=key)


def ranking_table(ranked: list[Ranked], top: int = 10) -> str:
    """The first ``top`` layouts of :func:`rank_layouts` as a plain-text table; the verdict is "ok" or the first
    reason."""
    if not isinstance(ranked, (list, tuple)) or not all(isinstance(r, Ranked) for r in ranked):
        raise ArgumentError(f"ranked must be a list of Ranked, got {type(ranked).__name__}; pass what "
                            "rank_layouts(model, hardware, gpus) returns")
    top = validate_int("top", top, minimum=1, hint="the number of rows to show")
    return format_table([r.as_row() for r in ranked[:top]], floatfmt="{:.3g}")


def megatron_145b(zero=(0,), schedules=("1f1b", "interleaved"), hardware: Hardware | None = None) -> list[Ranked]:
    """Lab 11's planner case ranked: the 145.6B GPT of Narayanan et al. 2021, Table 1, on 1,536 A100s under the
    row's own settings (:func:`labkit.capstone.published.megatron_run`: full recomputation, mixed fp16, micro-batch
    1, blocking pipeline messages), the paper's published layout being tp = 8, pp = 8, interleaved. ``zero=(0,)``
    is the paper's option set (Megatron-LM 2021 had no ZeRO); pass ``(0, 1, 2, 3)`` to let the search shard."""
    from .published import A100_SELENE, FIT_ROW, MEGATRON_TABLE1, megatron_run

    model, layout, gpus = megatron_run(MEGATRON_TABLE1[FIT_ROW])
    base = replace(layout, dp=1, tp=1, pp=1, schedule="1f1b", chunks=1)
    return rank_layouts(model, hardware or A100_SELENE, gpus, base=base, zero=zero, schedules=schedules,
                        chunks=(2,))
