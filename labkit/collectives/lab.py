"""Lab 01 on real ranks: equivalence with torch's collectives, message recording, the standard collectives
shown rank by rank, the exercise checks and the headless tour.

Rank functions (``*_rank``, ``ctx`` first) run on every rank through :func:`labkit.launch`. The algorithms
themselves are in :mod:`.algorithms` and their pure schedules in :mod:`.schedules`.
"""
from __future__ import annotations

import time
from collections import Counter

from .. import checks
from ..runtime import launch
from ..tour import check_row
from .algorithms import _finish_avg, all_gather, all_reduce, reduce_scatter
from .validation import _op_name
from .schedules import ALGORITHMS, OPS, SCHEDULES, _check_algorithm, final_owners, log_matches_schedule, schedule, simulate


def _sample(numel: int, dtype, rank: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(1000 * seed + rank)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-1000, 1000, (numel,), generator=g, dtype=torch.int64).to(dtype)


def equivalence_rank(ctx, algorithms=ALGORITHMS, numels=(0, 1, 7, 64, 1001), dtypes=("float32", "float64", "int64"),
                      ops=OPS, collectives=("reduce_scatter", "all_gather")) -> list[dict]:
    """Compare every algorithm with torch's own collectives on this world size. Returns a list of
    ``{"case", "ok", "detail"}`` (the same list on every rank)."""
    import torch
    import torch.distributed as dist

    n, rank = ctx.world_size, ctx.rank
    out = []

    def record(case, got, want):
        if got.dtype.is_floating_point:
            tol = 1e-5 if got.dtype == torch.float32 else 1e-12
            ok = torch.allclose(got.double(), want.double(), rtol=tol, atol=tol * 10)
        else:
            ok = torch.equal(got, want)
        err = float((got.double() - want.double()).abs().max()) if got.numel() and got.shape == want.shape else 0.0
        out.append({"case": case, "ok": bool(ok), "detail": "" if ok else f"max abs error {err:.3g} on rank {rank}"})

    lib_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    for dname in dtypes:
        dtype = getattr(torch, dname)
        for numel in numels:
            x = _sample(numel, dtype, rank)
            for op in ops:
                want = x.clone()
                if op == "avg" and not dtype.is_floating_point:  # gloo refuses AVG on integers: sum, then
                    dist.all_reduce(want)                        # divide rounding toward zero
                    _finish_avg(want, n)
                else:
                    dist.all_reduce(want, op={**lib_op, "avg": dist.ReduceOp.AVG}[op])
                for alg in algorithms:
                    got = all_reduce(x.clone(), op=op, algorithm=alg)
                    record(f"{alg} all-reduce, {n} ranks, {numel} {dname}, {op}", got, want)
                if "ring" in algorithms:
                    got = all_reduce(x.clone(), op=op, algorithm="ring", segments=3)
                    record(f"ring (3 pipelined segments) all-reduce, {n} ranks, {numel} {dname}, {op}", got, want)
                if "reduce_scatter" in collectives:
                    got = reduce_scatter(x, op=op)
                    if numel % n == 0 and op != "avg":
                        ref = torch.empty(numel // n, dtype=dtype)
                        dist.reduce_scatter(ref, list(torch.tensor_split(x.clone(), n)), op=lib_op[op])
                    else:  # gloo's reduce_scatter needs equal pieces: compare with all_reduce, then split
                        ref = torch.tensor_split(want, n)[rank]
                    record(f"ring reduce-scatter, {n} ranks, {numel} {dname}, {op}", got, ref)
            if "all_gather" in collectives:
                ref = [torch.empty_like(x) for _ in range(n)]
                dist.all_gather(ref, x)
                got = all_gather(x)
                record(f"ring all-gather, {n} ranks, {numel} {dname}", torch.stack(got), torch.stack(ref))
    return out


def record_messages_rank(ctx, algorithm: str = "ring", numel: int = 16, dtype: str = "float32",
                    segments: int = 1) -> list[dict]:
    """Run one all-reduce (or ``"reduce_scatter"`` / ``"all_gather"``) with logging on; return this rank's log."""
    import torch

    _check_algorithm(algorithm, SCHEDULES)
    log: list = []
    x = _sample(numel, getattr(torch, dtype), ctx.rank)
    if algorithm == "reduce_scatter":
        reduce_scatter(x, log=log)
    elif algorithm == "all_gather":
        all_gather(x, log=log)
    else:
        all_reduce(x, algorithm=algorithm, log=log, segments=segments)
    return log


COLLECTIVES = ("send/recv", "broadcast", "reduce", "all_reduce", "gather", "all_gather", "scatter", "reduce_scatter")


def demo_rank(ctx, numel: int = 4) -> dict:
    """Run torch's own point-to-point and standard collectives on small integer tensors; return, for
    each, this rank's tensor before and after: ``{name: {"before": [...], "after": [...]}}``.
    Rank r starts with ``[10r+1, 10r+2, ...]`` so each value says where it came from."""
    import torch
    import torch.distributed as dist

    n, rank = ctx.world_size, ctx.rank
    if not 1 <= numel <= 9 or numel % n:
        raise ValueError(f"numel must be between 1 and 9 (so 10r+j names its rank) and a multiple of the world size "
                         f"{n} (for scatter/reduce_scatter); pass e.g. {n if n <= 9 else 'a smaller world size'}")
    mine = lambda: torch.arange(1, numel + 1) + 10 * rank  # noqa: E731
    res = {}
    x = mine()
    before = x.tolist()
    if n > 1:  # point to point: rank 0 sends to rank 1
        if rank == 0:
            dist.send(x, 1)
        elif rank == 1:
            dist.recv(x, 0)
    res["send/recv"] = {"before": before, "after": x.tolist()}
    for name in ("broadcast", "reduce", "all_reduce"):
        x = mine()
        before = x.tolist()
        {"broadcast": lambda: dist.broadcast(x, src=0), "reduce": lambda: dist.reduce(x, dst=0),
         "all_reduce": lambda: dist.all_reduce(x)}[name]()
        res[name] = {"before": before, "after": x.tolist()}
    x = mine()
    bucket = [torch.empty_like(x) for _ in range(n)] if rank == 0 else None
    dist.gather(x, bucket, dst=0)
    res["gather"] = {"before": x.tolist(), "after": torch.cat(bucket).tolist() if rank == 0 else []}
    bucket = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(bucket, x)
    res["all_gather"] = {"before": x.tolist(), "after": torch.cat(bucket).tolist()}
    piece = torch.empty(numel // n, dtype=x.dtype)
    dist.scatter(piece, list(x.chunk(n)) if rank == 0 else None, src=0)
    res["scatter"] = {"before": x.tolist(), "after": piece.tolist()}
    piece = torch.empty(numel // n, dtype=x.dtype)
    dist.reduce_scatter(piece, list(x.clone().chunk(n)))
    res["reduce_scatter"] = {"before": x.tolist(), "after": piece.tolist()}
    return res


# --------------------------------------------------------------------------------------- exercise check
_FORBIDDEN = ("all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter", "all_gather_into_tensor",
              "reduce_scatter_tensor", "all_to_all")


def _ring_check_rank(ctx, fn, numels, dtypes):
    """Run the learner's ``fn(tensor)`` on each case with torch's collectives disabled (only send/recv
    allowed), and compare with ``dist.all_reduce``."""
    import torch
    import torch.distributed as dist

    wants = []
    for dname in dtypes:  # references first, while the library collectives still work
        for numel in numels:
            x = _sample(numel, getattr(torch, dname), ctx.rank, seed=7)
            want = x.clone()
            dist.all_reduce(want)
            wants.append((dname, numel, x, want))
    dist.barrier()
    saved = {name: getattr(dist, name) for name in _FORBIDDEN if hasattr(dist, name)}

    def refuse(*a, **k):
        raise AssertionError("this exercise builds all-reduce from dist.send/recv (or isend/irecv) only; "
                             "do not call torch's collectives inside it")

    out = []
    try:
        for name in saved:
            setattr(dist, name, refuse)
        for dname, numel, x, want in wants:
            case = f"{ctx.world_size} ranks, {numel} {dname} elements"
            t = x.clone()
            try:
                got = fn(t)
            except NotImplementedError:
                return "not attempted"
            except AssertionError as e:
                out.append((case, False, str(e)))
                break
            got = t if got is None else got
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                out.append((case, False, f"got {type(got).__name__} of shape {getattr(got, 'shape', None)}, "
                                         f"expected a tensor of shape {tuple(want.shape)} (return it or fill it in)"))
                continue
            if got.dtype.is_floating_point:
                ok = torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-4)
            else:
                ok = torch.equal(got, want)
            bad = "" if ok else (f"rank {ctx.rank}: max abs error {float((got.double() - want.double()).abs().max()):.3g}"
                                 f"; first wrong element at index "
                                 f"{int(((got.double() - want.double()).abs() > 1e-4).nonzero()[0])}")
            out.append((case, bool(ok), bad))
    finally:
        for name, f in saved.items():
            setattr(dist, name, f)
    return out


def check_ring_all_reduce(fn, world_sizes=(2, 3, 4), numels=(1, 4, 6, 1001), dtypes=("float32", "int64"),
                          timeout: float = 60.0):
    """Check a learner's ring all-reduce ``fn(tensor)`` (sum, in place or returned) against ``dist.all_reduce``
    on several world sizes and sizes, including sizes that do not divide by the world size. Torch's own
    collectives are disabled while ``fn`` runs. Returns a :class:`labkit.checks.CheckResult` naming each
    failing case (a deadlock shows as a time-out of that world size)."""
    if not callable(fn):
        raise TypeError(f"check_ring_all_reduce needs your function, e.g. check_ring_all_reduce(my_ring_all_reduce); "
                        f"got {type(fn).__name__}")
    runs: dict = {}

    def case(n, i):
        def thunk():
            if n not in runs:
                try:
                    runs[n] = launch(_ring_check_rank, world_size=n, kwargs=dict(fn=fn, numels=tuple(numels), dtypes=tuple(dtypes)),
                                     timeout=timeout, pool=True, echo=False)
                except Exception as e:  # keep the failure for this world size's other cases
                    runs[n] = e
            if isinstance(runs[n], Exception):
                raise runs[n]
            if any(per_rank == "not attempted" for per_rank in runs[n]):
                raise NotImplementedError
            mine = [r for per_rank in runs[n] for r in per_rank if r[0] == labels[n][i]]
            if not mine:
                raise AssertionError("not run: an earlier case on this world size stopped the check")
            failures = [r for r in mine if not r[1]]
            if failures:
                raise AssertionError(failures[0][2])
        return thunk

    labels = {n: [f"{n} ranks, {k} {d} elements" for d in dtypes for k in numels] for n in world_sizes}
    cases = [(labels[n][i], case(n, i)) for n in world_sizes for i in range(len(labels[n]))]
    return checks.run_cases("ring all-reduce == dist.all_reduce", cases,
                            hint="chunk the tensor with torch.tensor_split(t, n); n-1 reduce-scatter steps "
                                 "(send chunk (rank-s) % n right, add chunk (rank-s-1) % n from the left), then n-1 "
                                 "all-gather steps; post dist.irecv and dist.isend together, then wait both")


# --------------------------------------------------------------------------------------- tour
def tour_rank(ctx) -> dict:
    """The tour's job on every rank: equivalence cases and three message logs."""
    cases = equivalence_rank(ctx, numels=(7, 1001), dtypes=("float32", "int64"))
    logs = {alg: record_messages_rank(ctx, alg, numel=12) for alg in ("ring", "halving_doubling", "tree")}
    return {"cases": cases, "logs": logs}


def tour(world_size: int = 2) -> list[dict]:
    """Lab 01's quick path (headless): schedules simulated for 1-8 ranks, then on ``world_size`` real ranks
    every algorithm against torch's collectives and the messages sent against the schedules."""
    lab, n = "01 collectives", world_size

    def schedules_ok():
        bad = []
        for alg in SCHEDULES:
            for w in range(1, 9):
                s = schedule(alg, w)
                owners = final_owners(s)
                want = {r: ([r] if alg == "reduce_scatter" else list(range(s.n_chunks))) for r in range(w)}
                if alg == "all_gather":
                    end = simulate(s)[-1]
                    good = all(end[r][k] == Counter({k: 1}) for r in range(w) for k in range(w))
                else:
                    good = all(r_ in owners[r] for r in range(w) for r_ in want[r])
                if not good:
                    bad.append(f"{alg}/{w}")
        return not bad, f"{len(SCHEDULES)} algorithms x 8 world sizes" + (f"; wrong: {bad}" if bad else "")

    out = [check_row(lab, "schedules deliver every rank's data exactly once, 1-8 ranks", schedules_ok)]
    state = {}

    def ran():
        state["res"] = launch(tour_rank, world_size=n, timeout=120, echo=False, quiet=True)
        return True, f"{n} ranks"

    row = check_row(lab, f"algorithms on {n} ranks", ran)
    if not row["ok"]:
        return out + [row]

    def cases_of(prefix, need_some=False):
        def fn():
            cs = [c for c in state["res"][0]["cases"] if c["case"].startswith(prefix)]
            fails = [c["case"] for c in cs if not c["ok"]]
            return (bool(cs) or not need_some) and not fails, f"{len(cs)} cases" + (f"; failed: {fails[:2]}" if fails else "")
        return fn

    for alg in ALGORITHMS:
        out.append(check_row(lab, f"{alg} all-reduce == dist.all_reduce, {n} ranks", cases_of(alg + " all-reduce")))
    for coll in ("reduce-scatter", "all-gather"):
        out.append(check_row(lab, f"ring {coll} == dist.{coll.replace('-', '_')}, {n} ranks",
                             cases_of("ring " + coll, need_some=True)))
    for alg in ("ring", "halving_doubling", "tree"):
        def logs_ok(alg=alg):
            res = state["res"]
            return (log_matches_schedule([r["logs"][alg] for r in res], alg, n),
                    f"{sum(len(r['logs'][alg]) for r in res)} messages in {schedule(alg, n).steps} steps")
        out.append(check_row(lab, f"{alg}: messages sent == schedule, {n} ranks", logs_ok))
    return out


def traced_all_reduce_rank(ctx, algorithm: str = "ring", numel: int = 1024, op: str = "sum") -> dict:
    """One all-reduce with the message log on, checked against ``dist.all_reduce`` on the same data.
    Returns ``{"log": [...], "max_error": float, "seconds": float}`` for this rank."""
    import torch
    import torch.distributed as dist

    x = _sample(numel, torch.float32, ctx.rank)
    want = x.clone()
    dist.all_reduce(want, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.AVG}[_op_name(op)])
    log: list = []
    dist.barrier()
    t0 = time.perf_counter()
    all_reduce(x, op=op, algorithm=algorithm, log=log, check=False)
    seconds = time.perf_counter() - t0
    err = float((x - want).abs().max()) if numel else 0.0
    return {"log": log, "max_error": err, "seconds": seconds}


def check_bytes_per_rank(fn):
    """Check a learner's ``fn(algorithm, nbytes, world_size)`` -> bytes each rank sends, for ``"ring"`` and
    ``"ring_unchunked"``, against the message schedules (whose bytes the tests match to real runs)."""
    if not callable(fn):
        raise TypeError(f"check_bytes_per_rank needs your function fn(algorithm, nbytes, world_size); got "
                        f"{type(fn).__name__}")

    def case(alg, S, n):
        def thunk():
            want = schedule(alg, n).bytes_per_rank(S)[0]
            got = fn(alg, S, n)
            if got is None or abs(float(got) - want) > 1e-6 * max(1.0, want):
                raise AssertionError(f"{alg} with {n} ranks and S={S} bytes: you said {got}, each rank sends {want:g}")
        return thunk

    cases = [(f"{alg}, {n} ranks, S={S}", case(alg, S, n)) for alg in ("ring", "ring_unchunked")
             for n in (2, 3, 4, 8) for S in (1 << 20, 3000)]
    return checks.run_cases("bytes sent per rank", cases,
                            hint="count the messages a rank sends and the size of each: the ring sends one chunk "
                                 "of S/n per step for 2(n-1) steps; the unchunked ring sends the whole S each step")
