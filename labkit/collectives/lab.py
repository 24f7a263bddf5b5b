"""Lab 01 on real ranks: equivalence with torch's collectives, message recording, the standard collectives
shown rank by rank, the exercise checks and the headless tour.

Rank functions (``*_rank``, ``ctx`` first) run on every rank through :func:`labkit.launch`. The algorithms
themselves are in :mod:`.algorithms` and their pure schedules in :mod:`.schedules`. The module is long because
it holds the rank functions beside the exercise checks and the tour that launch them.
"""
from __future__ import annotations

from collections import Counter

from .. import checks, distops
from .._compat import moved_names
from ..checks import calls_to, rng_for
from ..devices import now
from ..runtime import launch
from ..tour import lab_name, run_check
from .algorithms import _finish_avg, all_gather, all_reduce, reduce_scatter
from .schedules import (
    ALGORITHMS,
    OPS,
    SCHEDULE_NAMES,
    _check_algorithm,
    final_owners,
    log_matches_schedule,
    ring_traffic_problems,
    schedule,
    simulate_messages,
)
from .validation import _op_name, watch_p2p


def _sample(numel: int, dtype, rank: int, device, seed: int = 0):
    """Rank ``rank``'s test data on ``device``: drawn on the CPU from a seeded generator (the same numbers on every
    machine), then moved."""
    import torch

    g = torch.Generator().manual_seed(1000 * seed + rank)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return torch.randint(-1000, 1000, (numel,), generator=g, dtype=torch.int64).to(device=device, dtype=dtype)


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
            x = _sample(numel, dtype, rank, ctx.device)
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
                        ref = torch.empty(numel // n, dtype=dtype, device=ctx.device)
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

    _check_algorithm(algorithm, SCHEDULE_NAMES)
    log: list = []
    x = _sample(numel, getattr(torch, dtype), ctx.rank, ctx.device)
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
    mine = lambda: torch.arange(1, numel + 1, device=ctx.device) + 10 * rank  # noqa: E731
    res = {}
    x = mine()
    before = x.tolist()
    if n > 1:  # point to point: rank 0 sends to rank 1
        if rank == 0:
            distops.send(x, 1)  # dist.send as a batch of one (dist.batch_isend_irecv): the form NCCL needs
        elif rank == 1:
            distops.recv(x, 0)
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
    piece = torch.empty(numel // n, dtype=x.dtype, device=ctx.device)
    dist.scatter(piece, list(x.chunk(n)) if rank == 0 else None, src=0)
    res["scatter"] = {"before": x.tolist(), "after": piece.tolist()}
    piece = torch.empty(numel // n, dtype=x.dtype, device=ctx.device)
    dist.reduce_scatter(piece, list(x.clone().chunk(n)))
    res["reduce_scatter"] = {"before": x.tolist(), "after": piece.tolist()}
    return res


# --------------------------------------------------------------------------------------- exercise checks
def _ring_check_rank(ctx, fn, numels, dtypes, seed):
    """Run the learner's ``fn(tensor)`` on each case while :func:`.validation.watch_p2p` records every message
    (torch's collectives refused), then compare the result with ``dist.all_reduce`` and the traffic with a
    ring's (:func:`.schedules.ring_traffic_problems`). Returns ``[(case, ok, detail), ...]``."""
    import torch
    import torch.distributed as dist

    wants = []
    for dname in dtypes:  # references first, while the library collectives still work
        for numel in numels:
            x = _sample(numel, getattr(torch, dname), ctx.rank, ctx.device, seed=seed)
            want = x.clone()
            dist.all_reduce(want)
            wants.append((dname, numel, x, want))
    dist.barrier()
    out = []
    for dname, numel, x, want in wants:
        case = f"{ctx.world_size} ranks, {numel} {dname} elements"
        t, log = x.clone(), []
        try:
            with watch_p2p(log):
                got = fn(t)
        except NotImplementedError:
            return "not attempted"
        except AssertionError as e:  # a refused collective: every rank stops here alike
            out.append((case, False, str(e)))
            break
        problems = []
        via = sorted({m["via"] for m in log if m["via"]})
        if via:
            problems.append(f"your messages were sent by labkit.collectives.{via[0]}, labkit's own implementation: "
                            f"write the ring yourself with dist.P2POp and dist.batch_isend_irecv")
        got = t if got is None else got
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            problems.append(f"got {type(got).__name__} of shape {getattr(got, 'shape', None)}, expected a tensor of "
                            f"shape {tuple(want.shape)} (return it or fill it in)")
        elif not (torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-4) if got.dtype.is_floating_point
                  else torch.equal(got, want)):
            diff = (got.double() - want.double()).abs()
            problems.append(f"rank {ctx.rank}: wrong sum, max abs error {float(diff.max()):.3g}; first wrong element "
                            f"at index {int((diff > 1e-4).nonzero()[0])}")
        if not via:
            problems += ring_traffic_problems(log, ctx.rank, ctx.world_size, numel, x.element_size())
        out.append((case, not problems, "; ".join(problems[:2])))
    return out


def check_ring_all_reduce(fn, world_sizes=(2, 3, 4), numels=(1, 4, 6, 1001), dtypes=("float32", "int64"),
                          timeout: float = 120.0, seed: int | None = None, random_size: bool = True):
    """Check a learner's ring all-reduce ``fn(tensor)`` (sum, in place or returned) on several world sizes and
    sizes (some that do not divide by the world size, and with ``random_size`` one drawn now), on data drawn
    from a seed chosen now (``seed`` fixes both, for tests). A case passes when the sum equals
    ``dist.all_reduce``'s *and* the messages really sent are a ring's: each rank sends only to its right
    neighbour and receives only from its left, one chunk per message, 2(n-1) chunks in all. Torch's collectives
    and labkit's own all-reduce fail the case. Returns a :class:`labkit.checks.CheckResult`
    naming each failing case (a deadlock shows as a time-out of that world size)."""
    if not callable(fn):
        raise TypeError(f"check_ring_all_reduce needs your function, e.g. check_ring_all_reduce(my_ring_all_reduce); "
                        f"got {type(fn).__name__}")
    rng = rng_for(seed)
    data_seed = rng.randrange(1 << 30)
    numels = tuple(numels) + ((rng.randrange(1500, 5000),) if random_size else ())
    runs: dict = {}

    def case(n, i):
        def thunk():
            if n not in runs:
                try:
                    runs[n] = launch(_ring_check_rank, world_size=n, timeout=timeout, pool=True, echo=False,
                                     kwargs=dict(fn=fn, numels=numels, dtypes=tuple(dtypes), seed=data_seed))
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
    return checks.run_cases("ring all-reduce: the sum of dist.all_reduce, with a ring's messages", cases,
                            hint="cut the tensor into n chunks (torch.tensor_split); n-1 reduce-scatter steps, then "
                                 "n-1 all-gather steps, each sending one chunk to the right neighbour and receiving "
                                 "one from the left; post both as dist.P2POp in one dist.batch_isend_irecv (the form "
                                 "NCCL needs), then wait for both")


# --------------------------------------------------------------------------------------- tour
def tour_rank(ctx) -> dict:
    """The tour's job on every rank: equivalence cases and three message logs."""
    cases = equivalence_rank(ctx, numels=(7, 1001), dtypes=("float32", "int64"))
    logs = {alg: record_messages_rank(ctx, alg, numel=12) for alg in ("ring", "halving_doubling", "tree")}
    return {"cases": cases, "logs": logs}


def tour(world_size: int = 2) -> list[dict]:
    """Lab 01's quick path (headless): schedules simulated for 1-8 ranks, then on ``world_size`` real ranks
    every algorithm against torch's collectives and the messages sent against the schedules."""
    lab, n = lab_name(__package__), world_size

    def schedules_ok():
        bad = []
        for alg in SCHEDULE_NAMES:
            for w in range(1, 9):
                s = schedule(alg, w)
                owners = final_owners(s)
                want = {r: ([r] if alg == "reduce_scatter" else list(range(s.n_chunks))) for r in range(w)}
                if alg == "all_gather":
                    end = simulate_messages(s)[-1]
                    good = all(end[r][k] == Counter({k: 1}) for r in range(w) for k in range(w))
                else:
                    good = all(r_ in owners[r] for r in range(w) for r_ in want[r])
                if not good:
                    bad.append(f"{alg}/{w}")
        return not bad, f"{len(SCHEDULE_NAMES)} algorithms x 8 world sizes" + (f"; wrong: {bad}" if bad else "")

    out = [run_check(lab, "schedules deliver every rank's data exactly once, 1-8 ranks", schedules_ok)]
    state = {}

    def ran():
        state["res"] = launch(tour_rank, world_size=n, timeout=120, echo=False, quiet=True)
        return True, f"{n} ranks"

    row = run_check(lab, f"algorithms on {n} ranks", ran)
    if not row["ok"]:
        return out + [row]

    def cases_of(prefix, need_some=False):
        def fn():
            cs = [c for c in state["res"][0]["cases"] if c["case"].startswith(prefix)]
            fails = [c["case"] for c in cs if not c["ok"]]
            return ((bool(cs) or not need_some) and not fails,
                    f"{len(cs)} cases" + (f"; failed: {fails[:2]}" if fails else ""))
        return fn

    for alg in ALGORITHMS:
        out.append(run_check(lab, f"{alg} all-reduce == dist.all_reduce, {n} ranks", cases_of(alg + " all-reduce")))
    for coll in ("reduce-scatter", "all-gather"):
        out.append(run_check(lab, f"ring {coll} == dist.{coll.replace('-', '_')}, {n} ranks",
                             cases_of("ring " + coll, need_some=True)))
    for alg in ("ring", "halving_doubling", "tree"):
        def logs_ok(alg=alg):
            res = state["res"]
            return (log_matches_schedule([r["logs"][alg] for r in res], alg, n),
                    f"{sum(len(r['logs'][alg]) for r in res)} messages in {schedule(alg, n).steps} steps")
        out.append(run_check(lab, f"{alg}: messages sent == schedule, {n} ranks", logs_ok))
    return out


def traced_all_reduce_rank(ctx, algorithm: str = "ring", numel: int = 1024, op: str = "sum") -> dict:
    """One all-reduce with the message log on, checked against ``dist.all_reduce`` on the same data.
    Returns ``{"log": [...], "max_error": float, "seconds": float}`` for this rank."""
    import torch
    import torch.distributed as dist

    x = _sample(numel, torch.float32, ctx.rank, ctx.device)
    want = x.clone()
    dist.all_reduce(want, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                              "avg": dist.ReduceOp.AVG}[_op_name(op)])
    log: list = []
    dist.barrier()
    t0 = now(ctx.device)
    all_reduce(x, op=op, algorithm=algorithm, log=log, check=False)
    seconds = now(ctx.device) - t0
    err = float((x - want).abs().max()) if numel else 0.0
    return {"log": log, "max_error": err, "seconds": seconds}


def _formula_functions() -> list:
    """labkit's functions that compute bytes or cost for you (the bytes exercise may not call them), with names."""
    from . import cost
    from .schedules import Schedule

    fns = {"Schedule.bytes_each_rank": Schedule.bytes_each_rank, "cost_terms": cost.cost_terms,
           "predict_time": cost.predict_time, "bus_factor": cost.bus_factor, "bandwidths": cost.bandwidths,
           "crossover_bytes": cost.crossover_bytes}
    fns.update({f"BUS_FACTOR[{k!r}]": f for k, f in cost.BUS_FACTOR.items()})
    return [(f, name) for name, f in fns.items()]


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x - round(x)) < 1e-6 else f"{x:,.2f}"


def _bytes_diagnosis(alg: str, got: float, S: float, n: int) -> str:
    """Name the usual wrong counts: the other ring's, one phase only, whole tensors where chunks go."""
    close = lambda v: abs(got - v) <= max(1.0, 1e-6 * v)  # noqa: E731
    if alg == "ring":
        if close((n - 1) * S):
            return "that is what the unchunked ring sends; the chunked ring's messages are chunks, not the whole tensor"
        if close(2 * (n - 1) * S):
            return "right number of steps, but each step sends one chunk of S/n bytes, not all S"
        if close((n - 1) / n * S):
            return "that counts one phase (reduce-scatter); the all-gather phase sends as many bytes again"
    elif close(2 * (n - 1) / n * S):
        return "that is the chunked ring's count; the unchunked ring sends the whole tensor at each of its steps"
    elif close(2 * (n - 1) * S):
        return "the unchunked ring has n-1 steps, not 2(n-1): it adds as it passes the tensors on"
    return "count a rank's messages (one per step) and the bytes in each"


def check_bytes_each_rank(fn, seed: int | None = None, cases_per_algorithm: int = 4):
    """Check a learner's ``fn(algorithm, nbytes, world_size)`` -> bytes each rank sends, for ``"ring"`` and
    ``"ring_unchunked"``, against the message schedules (whose bytes the tests match to real runs). World sizes
    (2-64) and sizes are drawn now (``seed`` fixes them, for tests), so no table of answers can pass; labkit's
    own byte and cost functions (``Schedule.bytes_each_rank``, ``cost_terms``, ``bus_factor``, ...) are refused."""
    if not callable(fn):
        raise TypeError(f"check_bytes_each_rank needs your function fn(algorithm, nbytes, world_size); got "
                        f"{type(fn).__name__}")
    rng = rng_for(seed)
    draws = [(alg, rng.randrange(1000, 1 << 30), 2 if k == 0 else rng.randrange(3, 65))
             for alg in ("ring", "ring_unchunked") for k in range(cases_per_algorithm)]
    watched = _formula_functions()

    def case(alg, S, n):
        want = schedule(alg, n).bytes_each_rank(S)[0]  # before the learner's code runs, with the hook off

        def thunk():
            with calls_to(*watched) as called:
                got = fn(alg, S, n)
            if called:
                raise AssertionError(f"you called labkit's {', '.join(sorted(called))}, which compute this for you; "
                                     f"work the count out from the algorithm's steps instead")
            try:
                value = float(got)
            except (TypeError, ValueError):
                raise AssertionError(f"return a number of bytes, got {got!r}") from None
            if abs(value - want) > max(1.0, 1e-6 * want):
                raise AssertionError(f"{alg} with {n} ranks and S={S} bytes: you said {_num(value)}, each rank sends "
                                     f"{_num(want)}; {_bytes_diagnosis(alg, value, S, n)}")
        return thunk

    cases = [(f"{alg}, {n} ranks, S={S}", case(alg, S, n)) for alg, S, n in draws]
    return checks.run_cases("bytes sent per rank", cases,
                            hint="follow one rank through the schedule (the figures above): how many steps, and how "
                                 "big is what it sends at each, for a tensor of S bytes cut into n chunks?")


__getattr__ = moved_names(__name__, {"check_bytes_per_rank": "labkit.collectives.lab:check_bytes_each_rank"})
