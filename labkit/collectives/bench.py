"""``python -m labkit bench collectives``: time every all-reduce built from send/recv next to the library's.

Timing runs on real ranks (:func:`time_collectives_rank`, :func:`pingpong_rank`); the figures are turned into
nccl-tests bandwidths and compared with the alpha-beta model of :mod:`.cost` (:func:`table_rows`). Every clock
read on a rank is :func:`labkit.devices.now`: NCCL calls and CUDA kernels return when they are queued, so a
time read without synchronising the device would measure the queueing and fit alpha and beta to nothing.
"""
from __future__ import annotations

import argparse
import statistics
import time

from ..devices import now
from .algorithms import all_gather, all_reduce, reduce_scatter
from .cost import LIBRARY, bandwidths, fit_alpha_beta, predict_time, usable_alpha_beta
from .pingpong import pingpong_rank  # noqa: F401  (notebooks 01 and 02 launch bench.pingpong_rank)
from .schedules import ALGORITHMS


# ------------------------------------------------------------------------------------ on the ranks
def _op_for(name: str, n: int):
    import torch.distributed as dist

    if name == LIBRARY:
        return "all_reduce", lambda x: dist.all_reduce(x)
    if name in ALGORITHMS:
        return "all_reduce", lambda x: all_reduce(x, algorithm=name, check=False)
    if name == "ring_pipelined":  # the same ring, each chunk in 2 pieces forwarded as soon as added
        return "all_reduce", lambda x: all_reduce(x, algorithm="ring", check=False, segments=2)
    if name == "ring_reduce_scatter":
        return "reduce_scatter", lambda x: reduce_scatter(x, check=False)
    if name == "library_reduce_scatter":
        def lib_rs(x):
            out = x.new_empty(x.numel() // n)
            dist.reduce_scatter(out, list(x.chunk(n)))
        return "reduce_scatter", lib_rs
    if name == "ring_all_gather":
        return "all_gather", lambda x: all_gather(x[: x.numel() // n], check=False)
    if name == "library_all_gather":
        def lib_ag(x):
            m = x.numel() // n
            out = x.new_empty(x.numel())
            dist.all_gather(list(out.split(m)), x[:m])
        return "all_gather", lib_ag
    raise ValueError(f"unknown algorithm {name!r}; pass one of {', '.join(ALGORITHMS + (LIBRARY,))}, ring_pipelined, "
                     f"ring_reduce_scatter, library_reduce_scatter, ring_all_gather, library_all_gather")


def _partner(name: str) -> str | None:
    """The library collective each hand-written one is paired with (None for the library's own)."""
    if name.startswith(LIBRARY):
        return None
    return {"ring_reduce_scatter": "library_reduce_scatter", "ring_all_gather": "library_all_gather"}.get(name, LIBRARY)


def time_collectives_rank(ctx, algorithms=("ring", LIBRARY), sizes=(1 << 20,), repeats: int = 5, warmup: int = 1,
                     dtype: str = "float32", paired: bool = True) -> list[dict] | None:
    """Time each algorithm at each size (bytes). Repeats are interleaved across algorithms (so load from
    other programs hits all of them alike); each run starts after a barrier and counts the slowest rank.
    With ``paired``, every run of a hand-written algorithm sits next to a run of the library's own
    collective (before it on even repeats, after it on odd ones), kept in ``"paired_samples"``.
    Rank 0 returns rows ``{"algorithm", "collective", "bytes", "world_size", "seconds" (median), "samples",
    "paired_samples"}``; other ranks return None. For reduce-scatter and all-gather, ``bytes`` is the full size."""
    import torch
    import torch.distributed as dist

    n = ctx.world_size
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats!r}, warmup={warmup!r}")
    ops = {name: _op_for(name, n) for name in algorithms}
    partners = {name: _partner(name) for name in algorithms} if paired else {}
    refs = {p: _op_for(p, n) for p in partners.values() if p is not None}
    dt = getattr(torch, dtype)
    item = torch.empty(0, dtype=dt).element_size()
    rows = []
    for nbytes in sizes:
        numel = max(n, int(nbytes) // item // n * n)  # a multiple of n, so library reduce-scatter works
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.rank)
        src = torch.randn(numel, generator=gen, device=ctx.device).to(dt)
        work = torch.empty_like(src)
        samples = {name: [] for name in algorithms}
        pair_samples = {name: [] for name in algorithms}

        def run(fn) -> float:
            work.copy_(src)
            dist.barrier()
            t0 = now(ctx.device)
            fn(work)
            return now(ctx.device) - t0

        for i in range(warmup + repeats):
            order = list(ops.items()) if i % 2 == 0 else list(ops.items())[::-1]  # alternate, to cancel drift
            for name, (_, fn) in order:
                partner = partners.get(name)
                if partner is not None and i % 2 == 0:
                    t_ref = run(refs[partner][1])
                t = run(fn)
                if partner is not None and i % 2 == 1:
                    t_ref = run(refs[partner][1])
                if i >= warmup:
                    samples[name].append(t)
                    if partner is not None:
                        pair_samples[name].append(t_ref)
        for name, (collective, _) in ops.items():
            t = torch.tensor(samples[name] + pair_samples[name], dtype=torch.float64, device=ctx.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a run lasts as long as its slowest rank
            mine, ref = t[:repeats].tolist(), t[repeats:].tolist()
            rows.append({"algorithm": name, "collective": collective, "bytes": numel * item, "world_size": n,
                         "seconds": statistics.median(mine), "samples": mine, "paired_samples": ref})
    return rows if ctx.rank == 0 else None


def ratio_to_library(row, lib_row) -> float:
    """busbw of ``row`` / busbw of the library's collective at the same size, as the ratio of the median
    times (``lib_row``'s median over ``row``'s)."""
    if lib_row is None:
        return float("nan")
    return lib_row["seconds"] / row["seconds"]


def paired_ratio(row) -> float:
    """Median over repeats of (library run time / this run time), each library run taken right next to the
    algorithm's run: on a shared, busy machine this cancels most of the load that drifts between repeats."""
    ref = row.get("paired_samples") or []
    if not ref:
        return 1.0 if row["algorithm"].startswith(LIBRARY) else float("nan")
    return statistics.median(r / t for r, t in zip(ref, row["samples"]))


def table_rows(rows, alpha: float | None = None, beta: float | None = None) -> list[dict]:
    """Measured rows -> display rows with time, algbw, busbw (GB/s) and the busbw ratio to the library's
    own collective at the same size (:func:`ratio_to_library`), and the model's prediction when alpha,
    beta are given. ``vs_library`` is the ratio of the medians; ``paired`` the median of adjacent-run ratios."""
    lib = {}
    for r in rows:
        if r["algorithm"].startswith(LIBRARY):
            lib[(r["collective"], r["bytes"])] = r
    out = []
    for r in rows:
        bw = bandwidths(r["bytes"], r["seconds"], r["collective"], r["world_size"])
        row = {"size": _human(r["bytes"]), "algorithm": r["algorithm"], "ranks": r["world_size"],
               "time_ms": r["seconds"] * 1e3, "algbw_GB/s": bw["algbw"] / 1e9, "busbw_GB/s": bw["busbw"] / 1e9,
               "vs_library": ratio_to_library(r, lib.get((r["collective"], r["bytes"]))),
               "paired": paired_ratio(r)}
        if alpha is not None:
            try:
                row["model_ms"] = predict_time(r["collective"] if r["collective"] != "all_reduce" else r["algorithm"],
                                               r["bytes"], r["world_size"], alpha, beta) * 1e3
            except ValueError:
                row["model_ms"] = float("nan")
        out.append(row)
    return out


def _human(nbytes: float) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= k:
            v = nbytes / k
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(nbytes)} B"


def _parse_size(text: str) -> int:
    t = text.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in "KMG" else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write e.g. 4096, 64K or 4M") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit bench collectives``: busbw of each all-reduce algorithm, and of ring reduce-scatter
    and all-gather, next to the library's own, measured in the same run."""
    import labkit

    from ..viz import format_table

    ap = argparse.ArgumentParser(prog="python -m labkit bench collectives", description=main.__doc__)
    ap.add_argument("--world-size", "-n", type=int, default=4, help="ranks (default 4)")
    ap.add_argument("--sizes", type=_parse_size, nargs="+", default=None,
                    help="message sizes, e.g. 64K 1M 4M (default 64K 1M 4M 16M 32M; --quick: 64K 4M)")
    ap.add_argument("--algorithms", nargs="+", default=None,
                    help=f"all-reduce algorithms among {', '.join(ALGORITHMS)}, ring_pipelined (default: all)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per point (default 15; --quick: 7)")
    ap.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    ap.add_argument("--no-rs-ag", action="store_true", help="skip the reduce-scatter and all-gather rows")
    ap.add_argument("--quick", action="store_true", help="a short run: two sizes, fewer repeats")
    args = ap.parse_args(argv)
    if args.world_size < 2:
        ap.error("--world-size must be >= 2")
    sizes = args.sizes or ([64 << 10, 4 << 20] if args.quick else [64 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20])
    repeats = args.repeats or (7 if args.quick else 15)
    algs = list(args.algorithms or ALGORITHMS + ("ring_pipelined",))
    for a in algs:
        if a not in ALGORITHMS + ("ring_pipelined",):
            ap.error(f"unknown algorithm {a!r}; choose among {', '.join(ALGORITHMS)}, ring_pipelined")
    algs.append(LIBRARY)
    if not args.no_rs_ag:
        algs += ["ring_reduce_scatter", "library_reduce_scatter", "ring_all_gather", "library_all_gather"]
    t0 = time.perf_counter()
    res = labkit.launch(time_collectives_rank, world_size=args.world_size, backend=args.backend,
                        kwargs=dict(algorithms=tuple(algs), sizes=tuple(sizes), repeats=repeats, warmup=2),
                        timeout=max(600.0, 60.0 * len(sizes)), echo=False)
    rows = res[0]
    alpha, beta, note = usable_alpha_beta(*fit_alpha_beta([r for r in rows if r["algorithm"] in ALGORITHMS]),
                                          source="alpha-beta model fitted to these all-reduce times")
    print(f"collectives on {args.world_size} ranks, backend {res.backend}; medians of {repeats} repeats "
          f"(each: barrier, then the slowest rank's time);\n"
          f"vs_library = busbw / the library's busbw at the same size (ratio of the medians); paired = median over "
          f"repeats of the same ratio, each run next to a library run (robust when the machine is busy).")
    print(format_table(table_rows(rows, alpha, beta)))
    print(note, "(model_ms column)")
    lib = {r["bytes"]: r for r in rows if r["algorithm"] == LIBRARY}
    for name in ("ring", "ring_pipelined"):
        big = [(r["bytes"], ratio_to_library(r, lib.get(r["bytes"])), paired_ratio(r)) for r in rows
               if r["algorithm"] == name and r["bytes"] >= 4 << 20]
        if big:
            print(f"{name} / library busbw at >= 4 MiB (medians | paired): "
                  + ", ".join(f"{_human(b)}: {x:.2f}x | {y:.2f}x" for b, x, y in big))
    print(f"({time.perf_counter() - t0:.1f} s in all)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
