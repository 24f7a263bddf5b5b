"""ZeRO-3's prefetch, measured: how much of the all-gather time a step still waits for, with prefetch and without.

Each rank runs three models of the same MLP side by side, interleaved round by round (so they share the
machine's noise): :class:`~labkit.zero.Zero3` with prefetch, without it, and torch's FSDP2 (which prefetches the
next unit in both directions by default). Zero3 records its timeline (``record=True``): for every all-gather,
when it was issued, when the step started waiting for it and when it was ready. Summed over a step:

* ``gather ms``: issued to ready, the time the all-gathers were in flight;
* ``exposed ms``: waited to ready, the part the step could not hide behind compute;
* ``hidden``: 1 - exposed / gather. Without prefetch every gather is issued when it is needed, so nothing is
  hidden; with it, the next unit's gather travels while this one computes.

Times are each round's slowest rank, medians over the rounds. On two CPU cores the gloo thread that moves the
bytes competes with the compute for the same cores, so a hidden gather still slows the compute beside it: the
step time falls by less than the exposed time does. ``python -m labkit bench zero`` prints the table;
:func:`labkit.zero.plots.gather_timeline` draws one step.
"""
from __future__ import annotations

import statistics

import torch
import torch.distributed as dist
from torch import nn

from ..devices import now
from .measure import BENCH_WIDTHS, batches, mlp, rank_slice, validate_args
from .stage3 import Zero3
from .torch_impl import torch_fsdp2

__all__ = ["VARIANTS", "overlap_rank", "overlap_rows", "measure_overlap"]

#: What is compared: labkit's ZeRO-3 with and without prefetch, and FSDP2 (torch's, prefetching by default).
VARIANTS = ("zero3", "zero3 no prefetch", "fsdp2")


def _gathers(timeline) -> tuple[float, float]:
    g = [e for e in timeline if e["kind"] == "gather"]
    return sum(e["ready"] - e["issued"] for e in g), sum(e["ready"] - e["waited"] for e in g)


def overlap_rank(ctx, widths=BENCH_WIDTHS, rounds: int = 7, global_batch: int = 32, dtype: str = "float32",
                 warmup: int = 2) -> dict:
    """Time ``rounds`` interleaved steps of each of :data:`VARIANTS` on this rank's slice of each batch.

    Returns ``{"seconds", "gather", "exposed": {variant: [per round]}, "timeline": {variant: the last round's
    events, times from the step's start}}`` (``gather`` and ``exposed``: Zero3's variants only)."""
    world, rank = ctx.world_size, ctx.rank
    _, widths, rounds, global_batch = validate_args(("zero3",), widths, dtype, "adam", rounds, global_batch, world)
    device = getattr(ctx, "device", "cpu")
    data = rank_slice(batches(warmup + rounds, global_batch, widths, dtype, 0, device), rank, world)
    runs = {}
    for v in VARIANTS:
        model = mlp(widths, dtype, 0, device)
        wrapped = torch_fsdp2(model) if v == "fsdp2" else Zero3(model, prefetch=v == "zero3", record=True)
        runs[v] = (wrapped, torch.optim.Adam(wrapped.parameters(), lr=1e-3))

    def step(wrapped, opt, x, y):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(wrapped(x), y).backward()
        opt.step()

    for wrapped, opt in runs.values():
        for x, y in data[:warmup]:  # the first forward also teaches prefetch the order of the units
            step(wrapped, opt, x, y)
    out = {"seconds": {v: [] for v in VARIANTS}, "gather": {}, "exposed": {}, "timeline": {}}
    per_round = []
    for r in range(rounds):
        x, y = data[warmup + r]
        row = []
        for v, (wrapped, opt) in runs.items():
            if v != "fsdp2":
                wrapped.timeline.clear()
            dist.barrier()
            t0 = now(device)
            step(wrapped, opt, x, y)
            row.append(now(device) - t0)
            if v != "fsdp2":
                row += list(_gathers(wrapped.timeline))
                out["timeline"][v] = [{k: (val - t0 if k in ("issued", "waited", "ready", "start", "end") else val)
                                       for k, val in e.items()} for e in wrapped.timeline]
        per_round.append(row)
    times = torch.tensor(per_round, dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank's, per round and column
    cols = iter(times.cpu().T.tolist())
    for v in VARIANTS:
        out["seconds"][v] = next(cols)
        if v != "fsdp2":
            out["gather"][v], out["exposed"][v] = next(cols), next(cols)
    return out


def overlap_rows(res: list[dict]) -> list[dict]:
    """One row per variant: medians of the step, the gathers' time in flight and the exposed part."""
    r0, n = res[0], len(res)
    med = {v: statistics.median(s) for v, s in r0["seconds"].items()}
    rows = []
    for v in VARIANTS:
        g = statistics.median(r0["gather"][v]) if v in r0["gather"] else None
        e = statistics.median(r0["exposed"][v]) if v in r0["exposed"] else None
        rows.append({"ranks": n, "variant": v, "ms/step": med[v] * 1e3,
                     "gather ms": None if g is None else g * 1e3, "exposed ms": None if e is None else e * 1e3,
                     "hidden": None if not g else max(0.0, 1 - e / g), "time / FSDP2": med[v] / med["fsdp2"]})
    return rows


def measure_overlap(world_sizes=(2,), widths=BENCH_WIDTHS, rounds: int = 7, global_batch: int = 32,
                    pool: bool = False, timeout: float = 300) -> dict:
    """One launch per world size: ``{"rows": overlap_rows..., "raw": {N: results}}``."""
    from ..runtime import launch

    out = {"rows": [], "raw": {}}
    for n in world_sizes:
        res = launch(overlap_rank, world_size=n, kwargs=dict(widths=widths, rounds=rounds,
                                                              global_batch=-(-global_batch // n) * n),
                     pool=pool, echo=False, quiet=True, timeout=timeout)
        out["raw"][n] = list(res)
        out["rows"] += overlap_rows(list(res))
    return out
