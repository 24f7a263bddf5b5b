"""``python -m labkit bench zero``: time, traffic and memory per rank of DDP, ZeRO-1/2/3, torch's ZeRO and FSDP2.

One launch per world size runs :func:`bench_rank`: it builds every method on the same MLP (each rank its own
equal slice of each global batch), warms them up, then times them **interleaved** (round r: one step of each
method in turn, so they share the machine's noise), the slowest rank's time per step. It prints medians and each
method's time against DDP measured in the same run; the bytes each rank sends per step, in the ZeRO paper's
units, beside 2Ψ (DDP, ZeRO-1, ZeRO-2) and 3Ψ (ZeRO-3) (Rajbhandari et al. 2019, arXiv 1910.02054, section 7;
labkit's ZeRO-3 does not gather the first layer again in the backward, so it sends a little under 3Ψ); the
optimiser state per rank beside ⌈P/N⌉·8 bytes (Adam, fp32: two buffers of 4 bytes); torch's
``ZeroRedundancyOptimizer``'s state on each rank (it gives whole parameters to ranks, so its shards are uneven)
beside labkit's equal shards; and the memory each rank holds after a step and at its peak during one
(:mod:`labkit.zero.measure`), beside the paper's per-rank formula. A last launch per world size times ZeRO-3 with
prefetch, without it and FSDP2, and how much of the all-gather time each step still waited for
(:mod:`labkit.zero.overlap`).

The ranks run where ``backend="auto"`` puts them (NCCL with one GPU each when there are enough GPUs, else gloo
processes with one thread each), and every tensor a rank makes lives on its ``ctx.device``; the output says which
backend ran for each world size, read from the launch's results. On two CPU cores the times show what each method
costs in compute and copies here, not what it would gain on GPUs with a fast interconnect.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.distributed as dist

from .._compat import moved_names, renamed_kwargs, warn_renamed
from ..devices import now
from ..memory_model import OPTIMIZERS as STATES
from .measure import (
    BENCH_WIDTHS,
    MEASURED_METHODS,
    STAGE,
    Method,
    batches,
    memory_row,
    mlp,
    rank_slice,
    validate_args,
)

FULL_WIDTHS = (512, 2048, 2048, 10)  # the full run's MLP (--quick: measure.BENCH_WIDTHS, 1.3 M parameters)
PAPER = {"ddp": 2, "zero1": 2, "zero2": 2, "zero3": 3}  # Ψ per step, the paper's section 7


@renamed_kwargs(sizes="widths")
def bench_rank(ctx, methods=MEASURED_METHODS, widths=BENCH_WIDTHS, dtype: str = "float32", optimizer: str = "adam",
               rounds: int = 7, warmup: int = 2, global_batch: int = 32, bucket_mb: float = 25.0,
               memory: bool = True) -> dict:
    """Time ``rounds`` interleaved steps of each method, count its traffic and state, then measure its memory.

    Returns ``{"P", "world", "seconds": {method: [per round, slowest rank]}, "volume_per_step": {method: bytes or
    None}, "psi": {method: values}, "state_bytes": {method: this rank's}, "owned": torch ZeRO's parameters on this
    rank, "memory": {method: memory_row(...)}}``."""
    world, rank = ctx.world_size, ctx.rank
    methods, widths, rounds, global_batch = validate_args(methods, widths, dtype, optimizer, rounds, global_batch,
                                                          world)
    device = getattr(ctx, "device", "cpu")
    data = rank_slice(batches(warmup + rounds + 2, global_batch, widths, dtype, 0, device), rank, world)
    runs = {m: Method(m, mlp(widths, dtype, 0, device), optimizer, bucket_mb) for m in methods}
    for run in runs.values():
        for x, y in data[:warmup]:
            run.step(x, y)
        run.reset_volume()
    seconds = [[0.0] * len(methods) for _ in range(rounds)]
    for r in range(rounds):
        x, y = data[warmup + r]
        for j, m in enumerate(methods):
            dist.barrier()
            t0 = now(device)  # after a synchronise: the queued GPU work of the barrier is not this step's
            runs[m].step(x, y)
            seconds[r][j] = now(device) - t0
    # on the rank's device: an NCCL group has no backend for CPU tensors
    times = torch.tensor(seconds, dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step is done when the slowest rank is done
    times = times.cpu()
    out = {"P": next(iter(runs.values())).P, "world": world,
           "seconds": {m: times[:, j].tolist() for j, m in enumerate(methods)},
           "volume_per_step": {m: (None if run.volume() is None else run.volume() / rounds) for m, run in runs.items()},
           "psi": {m: run.psi for m, run in runs.items()}, "esize": next(iter(runs.values())).esize,
           "state_bytes": {m: run.held()["optimizer"] for m, run in runs.items()}, "memory": {}}
    if "zero-torch" in runs:
        out["owned"] = sum(p.numel() for p in runs["zero-torch"].opt.optim.param_groups[0]["params"])
    for m in methods:  # two more steps each, under the memory tracker
        dist.barrier()
        if memory:
            out["memory"][m] = memory_row(runs[m], data[-2:], world, optimizer, peak=True)
    return out


_UNIT = [1e6, "MB"]  # set by measure(): kB for models under 1 MB


def _mb(b) -> float | None:
    return None if b is None else b / _UNIT[0]


def _u(name: str) -> str:
    return name.replace("MB", _UNIT[1])


def _show(rows: list[dict]) -> list[dict]:
    """Missing figures as "-" rather than "None"."""
    return [{k: "-" if v is None else v for k, v in r.items()} for r in rows]


def timing_rows(res: list[dict], optimizer: str) -> list[dict]:
    r0, n = res[0], res[0]["world"]
    med = {m: statistics.median(s) for m, s in r0["seconds"].items()}
    base = med.get("ddp")
    per = STATES[optimizer] * r0["esize"]  # state bytes per parameter
    rows = []
    for m, s in r0["seconds"].items():
        vol, psi = r0["volume_per_step"][m], r0["psi"][m] * r0["esize"]
        want = r0["P"] * per if STAGE[m] == 0 else math.ceil(r0["P"] / n) * per
        states = [r["state_bytes"][m] for r in res]
        rows.append({"ranks": n, "method": m, "ms/step": med[m] * 1e3,
                     "time / DDP": med[m] / base if base else None,
                     "spread %": 100 * (max(s) - min(s)) / med[m],
                     _u("MB sent/step"): _mb(vol), "sent / Ψ": None if vol is None else vol / psi,
                     "paper": f"{PAPER[m]}Ψ" if m in PAPER else "-",
                     _u("state MB/rank (max)"): max(states) / _UNIT[0], _u("state formula MB"): want / _UNIT[0],
                     "every rank = formula": all(b == want for b in states)})
    return rows


def uneven_rows(res: list[dict], optimizer: str) -> list[dict]:
    if "zero-torch" not in res[0]["state_bytes"]:
        return []
    n, P = res[0]["world"], res[0]["P"]
    per = STATES[optimizer] * res[0]["esize"]
    return [{"ranks": n, "rank": i, "torch ZeRO params owned": r.get("owned"),
             _u("torch ZeRO state MB"): r["state_bytes"]["zero-torch"] / _UNIT[0],
             _u("labkit zero1 state MB"): r["state_bytes"].get("zero1", float("nan")) / _UNIT[0],
             _u(f"⌈P/N⌉·{per} MB"): math.ceil(P / n) * per / _UNIT[0]} for i, r in enumerate(res)]


def memory_rows(res: list[dict]) -> list[dict]:
    """Per method, the rank holding the most after a step: bytes by kind beside the formula, and the peak."""
    if not res[0]["memory"]:
        return []
    rows = []
    ddp_peak = max((r["memory"]["ddp"]["peak"] or 0) for r in res) if "ddp" in res[0]["memory"] else None
    for m in res[0]["memory"]:
        i, top = max(enumerate(r["memory"][m] for r in res), key=lambda t: t[1]["total"])
        peak = max((r["memory"][m]["peak"] or 0) for r in res) or None
        low = max((r["memory"][m]["peak_low"] or 0) for r in res) or None
        rows.append({"ranks": res[0]["world"], "method": m, "rank": i, _u("params MB"): _mb(top["params"]),
                     _u("grads MB"): _mb(top["grads"]), _u("optim MB"): _mb(top["optimizer"]),
                     _u("buffers MB"): _mb(top["buffers"]), _u("held MB"): _mb(top["total"]),
                     _u("formula MB"): _mb(top["formula_total"]), _u("peak MB"): _mb(peak),
                     "peak varies": f"{_mb(low):.3g}-{_mb(peak):.3g}" if peak and low and low != peak else "",
                     "peak / DDP": peak / ddp_peak if peak and ddp_peak else None})
    return rows


@renamed_kwargs(sizes="widths")
def measure(world_sizes=(2,), widths=BENCH_WIDTHS, rounds: int = 7, dtype: str = "float32", optimizer: str = "adam",
            global_batch: int = 32, memory: bool = True, pool: bool = False, timeout: float = 300) -> dict:
    """One launch per world size; ``{"timing": rows, "uneven": rows, "memory": rows, "raw": {N: results},
    "backend": {N: the backend that ran}}``."""
    from ..runtime import launch
    from ..viz import progress

    out = {"timing": [], "uneven": [], "memory": [], "raw": {}, "backend": {}}
    _UNIT[:] = [1e3, "kB"] if sum(p.numel() for p in mlp(widths).parameters()) * 4 < 1e6 else [1e6, "MB"]
    for n in progress(world_sizes, desc="zero bench: world sizes"):
        res = launch(bench_rank, world_size=n, kwargs=dict(widths=widths, rounds=rounds, dtype=dtype,
                     optimizer=optimizer, global_batch=-(-global_batch // n) * n, memory=memory),
                     pool=pool, echo=False, quiet=True, timeout=timeout)
        out["raw"][n] = list(res)
        out["backend"][n] = res.backend
        out["timing"] += timing_rows(res, optimizer)
        out["uneven"] += uneven_rows(res, optimizer)
        out["memory"] += memory_rows(res)
    return out


def ran_on(backends: dict) -> str:
    """What ran, from the launches' results: ``{world size: backend}`` as one line."""
    where = {"nccl": "NCCL, one GPU per rank", "gloo": "gloo, CPU processes with one thread each"}
    return "ran on: " + "; ".join(f"{n} rank(s) on {where.get(b, b)}" for n, b in backends.items())


def _ints(ap, flag: str, text: str, example: str) -> tuple:
    try:
        vals = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        vals = ()
    if not vals or min(vals) < 1:
        ap.error(f"{flag} takes comma-separated positive integers such as {example}, got {text!r}")
    return vals


def main(argv: list[str] | None = None) -> int:
    from ..viz import format_table

    ap = argparse.ArgumentParser(prog="python -m labkit bench zero", description=__doc__.splitlines()[0])
    ap.add_argument("--world-sizes", default="2,4", help="comma-separated numbers of ranks (default 2,4)")
    ap.add_argument("--widths", "--sizes", default=None, help="MLP layer widths, e.g. 256,1024,1024,10 (default: "
                    f"{','.join(map(str, FULL_WIDTHS))}; --quick {','.join(map(str, BENCH_WIDTHS))}); --sizes is "
                    "its old name")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default 7; --quick 5)")
    ap.add_argument("--batch", type=int, default=32, help="global batch per step (default 32)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--optimizer", choices=tuple(STATES), default="adam")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory tracker")
    ap.add_argument("--no-prefetch", action="store_true", help="skip the ZeRO-3 prefetch comparison")
    ap.add_argument("--pool", action="store_true", help="run on labkit's shared pool of ranks (no start-up when "
                    "called again from the same process, e.g. a notebook)")
    ap.add_argument("--quick", action="store_true", help="a short run: 2 ranks, the small MLP, 5 rounds")
    a = ap.parse_args(argv)
    if any(arg == "--sizes" or arg.startswith("--sizes=") for arg in (sys.argv[1:] if argv is None else argv)):
        warn_renamed("python -m labkit bench zero --sizes", "--widths", stacklevel=2)
    ranks = _ints(ap, "--world-sizes", a.world_sizes, "2,4")
    widths = _ints(ap, "--widths", a.widths, "256,1024,1024,10") if a.widths else (BENCH_WIDTHS if a.quick
                                                                                   else FULL_WIDTHS)
    if len(widths) < 2:
        ap.error(f"--widths needs at least two widths (input, ..., classes), got {a.widths!r}; e.g. 256,1024,1024,10")
    rounds = a.rounds if a.rounds is not None else (5 if a.quick else 7)
    if rounds < 1 or a.batch < 1:
        ap.error(f"--rounds and --batch must be >= 1, got {rounds} and {a.batch}")
    if a.quick and a.world_sizes == ap.get_default("world_sizes"):
        ranks = (2,)
    P = sum(p.numel() for p in mlp(widths).parameters())
    print(f"ZeRO bench: MLP {'-'.join(map(str, widths))} ({P:,} parameters, {P * 4 / 1e6:.1f} MB per fp32 copy), "
          f"{a.dtype}, {a.optimizer}, global batch {a.batch}, {rounds} interleaved rounds (medians), ranks "
          f"{list(ranks)}", flush=True)
    t0 = time.perf_counter()
    got = measure(ranks, widths, rounds, a.dtype, a.optimizer, a.batch, not a.no_memory, a.pool)
    print(ran_on(got["backend"]))
    print("\n== time per step (slowest rank), bytes sent per rank per step, optimiser state per rank ==")
    print(format_table(_show(got["timing"]), floatfmt="{:.3g}"))
    print("time / DDP: the method's median time over DDP's (lab 02's BucketedDDP), measured in the same rounds; "
          "sent / Ψ: bytes sent in the paper's units over Ψ (the padded flat buffer's bytes); '-' = torch's "
          "collectives, not counted; every rank = formula: False where the shards are uneven (torch's ZeRO gives "
          "whole parameters to ranks; FSDP2 splits each parameter by rows, unevenly when N does not divide them)")
    if got["uneven"]:
        print("\n== torch's ZeroRedundancyOptimizer: whole parameters per rank (uneven) against labkit's equal "
              "shards ==")
        print(format_table(_show(got["uneven"]), floatfmt="{:.4g}"))
    if got["memory"]:
        print("\n== memory per rank: held after a step (the rank holding most) and the peak during one ==")
        print(format_table(_show(got["memory"]), floatfmt="{:.3g}"))
        print("formula: zero_bytes_each_rank(P, N, stage, 'fp32', optimizer) (ZeRO, section 5; doubled in float64). "
              "labkit's ZeRO-1/2 also keep a flat copy of their shard (+P/N values); BucketedDDP keeps flat buckets "
              "(+P values); torch DDP's reducer buckets are not counted. peak: MemTracker on the CPU, the CUDA "
              "allocator on a GPU, from a step's start (no gradients) to its end, the highest over 2 steps and the "
              "ranks; peak varies: low-high where the 2 steps differed (a buffer freed when gloo's thread lets go of "
              "it); peak / DDP: against DDP's peak in the same launch")
        for row in got["memory"]:
            if row["method"] == "fsdp2" and row["ranks"] == 2 and row["peak / DDP"] is not None:
                verdict = "meets" if row["peak / DDP"] <= 0.6 else "misses"
                print(f"FSDP2 peak / DDP peak at 2 ranks: {row['peak / DDP']:.2f} ({verdict} the 0.6 target)")
    if not a.no_prefetch:
        from .overlap import measure_overlap

        ov = measure_overlap(ranks, widths, rounds, a.batch, a.pool)
        print("\n== ZeRO-3's all-gathers: prefetch against none, beside FSDP2 (interleaved rounds, medians) ==")
        print(format_table(_show(ov["rows"]), floatfmt="{:.3g}"))
        print("gather ms: the step's all-gathers in flight (issued to ready, summed); exposed ms: the part the step "
              "waited for; hidden: 1 - exposed / gather (labkit.zero.overlap; Zero3(record=True).timeline). On two "
              "CPU cores gloo's thread shares the cores with the compute it overlaps")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


# old names (issue 30): an MLP's layer widths are widths
__getattr__ = moved_names(__name__, {"QUICK_SIZES": "labkit.zero.measure:BENCH_WIDTHS",
                                     "FULL_SIZES": "labkit.zero.bench:FULL_WIDTHS"})

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
