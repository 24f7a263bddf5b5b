"""Lab 01: all-reduce from point-to-point messages, checked against torch's own collectives on gloo.

Pure parts (schedules, cost model) run without processes; distributed parts share one pool of ranks
per world size (2, 3, 4) so start-up is paid once. World sizes 1 and 5-8 run in their own test (about a minute).
"""
import math
from collections import Counter

import pytest
import torch

import labkit
from labkit import collectives as C
from labkit.collectives import bench as B
from labkit.collectives import lab as L

WORLD_SIZES = (2, 3, 4)


# ------------------------------------------------------------------------------ pure: schedules
@pytest.mark.parametrize("numel", [0, 1, 5, 7, 8, 1001])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_chunk_bounds_matches_tensor_split(numel, parts):
    x = torch.arange(numel)
    pieces = torch.tensor_split(x, parts)
    assert [(int(p[0]), int(p[-1]) + 1) if len(p) else None for p in pieces] == \
        [(a, b) if b > a else None for a, b in C.chunk_bounds(numel, parts)]
    assert [b - a for a, b in C.chunk_bounds(numel, parts)] == [len(p) for p in pieces]


@pytest.mark.parametrize("alg", C.SCHEDULES)
@pytest.mark.parametrize("n", range(1, 17))
def test_schedule_delivers_every_contribution_exactly_once(alg, n):
    s = C.schedule(alg, n)
    end = C.simulate(s)[-1]
    full = Counter(range(n))
    if alg == "reduce_scatter":
        assert all(end[r][r] == full for r in range(n))
    elif alg == "all_gather":
        assert all(end[r][k] == Counter({k: 1}) for r in range(n) for k in range(n))
    else:
        assert all(c == full for row in end for c in row)


def test_step_counts_and_bytes_per_rank():
    for n in range(2, 9):
        L = math.ceil(math.log2(n))
        assert C.schedule("ring", n).steps == 2 * (n - 1)
        assert C.schedule("tree", n).steps == 2 * L
        assert C.schedule("naive", n).steps == 2 * (n - 1)
        assert C.schedule("ring_unchunked", n).steps == n - 1
        p = 1 << (n.bit_length() - 1)
        assert C.schedule("halving_doubling", n).steps == 2 * int(math.log2(p)) + (2 if p != n else 0)
        S = 1.0
        assert all(abs(b - 2 * (n - 1) / n * S) < 1e-12 for b in C.schedule("ring", n).bytes_per_rank(S))
        assert all(abs(b - (n - 1) * S) < 1e-12 for b in C.schedule("ring_unchunked", n).bytes_per_rank(S))


def test_simulate_catches_a_broken_schedule():
    """The exactly-once check can fail: drop one message, or send a chunk twice."""
    s = C.schedule("ring", 4)
    dropped = C.Schedule("ring", 4, 4, s.messages[1:])
    end = C.simulate(dropped)[-1]
    assert not all(c == Counter(range(4)) for row in end for c in row)
    m = s.messages[0]
    doubled = C.Schedule("ring", 4, 4, s.messages + [C.Message(m.step, m.src, m.dst, m.chunks, "reduce")])
    end = C.simulate(doubled)[-1]
    assert any(max(c.values()) > 1 for row in end for c in row)


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="must be one of"):
        C.schedule("butterfly", 4)
    with pytest.raises(ValueError, match="world_size"):
        C.schedule("ring", 0)
    with pytest.raises(ValueError, match="parts"):
        C.chunk_bounds(10, 0)


# ------------------------------------------------------------------------------ pure: cost model
def test_cost_terms_and_bandwidths():
    S, n = 1 << 20, 4
    assert C.cost_terms("ring", S, n) == (6.0, 1.5 * S)
    assert C.cost_terms("ring_unchunked", S, n) == (3.0, 3.0 * S)
    assert C.cost_terms("tree", S, n) == (4.0, 4.0 * S)
    assert C.cost_terms("halving_doubling", S, n) == (4.0, 1.5 * S)
    assert C.cost_terms("halving_doubling", S, 3) == (4.0, 3.0 * S)  # fold + 1 halving + 1 doubling + unfold
    assert C.cost_terms("ring", S, 1) == (0.0, 0.0)
    assert C.bus_factor("all_reduce", 4) == 1.5 and C.bus_factor("all_gather", 4) == 0.75
    bw = C.bandwidths(1e9, 2.0, "all_reduce", 4)
    assert bw["algbw"] == 5e8 and bw["busbw"] == 7.5e8
    with pytest.raises(ValueError, match="library"):
        C.cost_terms("library", S, n)
    with pytest.raises(ValueError, match="collective"):
        C.bus_factor("all_to_everyone", 4)


def test_fit_alpha_beta_recovers_known_parameters():
    alpha, beta = 50e-6, 1 / 2e9
    rows = [{"algorithm": a, "bytes": s, "world_size": n, "seconds": C.predict_time(a, s, n, alpha, beta)}
            for a in ("p2p", "ring", "tree") for s in (1 << 10, 1 << 16, 1 << 22) for n in (2, 4)]
    a, b = C.fit_alpha_beta(rows)
    assert abs(a - alpha) / alpha < 1e-6 and abs(b - beta) / beta < 1e-6
    with pytest.raises(ValueError, match="at least two"):
        C.fit_alpha_beta(rows[:1])


# ------------------------------------------------------------------------------ input errors (no processes)
def test_bad_input_is_refused_before_any_communication():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        C.all_reduce(torch.ones(4), algorithm="butterfly")
    with pytest.raises(ValueError, match="contiguous"):
        C.all_reduce(torch.ones(4, 3).t())
    with pytest.raises(TypeError, match="torch.Tensor"):
        C.all_reduce([1.0, 2.0])
    with pytest.raises(ValueError, match="'sum', 'max' or 'avg'"):
        C.all_reduce(torch.ones(4), op="product")
    with pytest.raises(TypeError, match="dtype"):
        C.all_reduce(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="segments must be"):
        C.all_reduce(torch.ones(4), segments=0)
    with pytest.raises(ValueError, match="ring' only"):
        C.all_reduce(torch.ones(4), algorithm="tree", segments=2)
    with pytest.raises(TypeError, match="log must be a list"):
        C.all_reduce(torch.ones(4), log="yes")
    with pytest.raises(ValueError, match="contiguous"):
        C.reduce_scatter(torch.ones(4, 3).t())
    with pytest.raises(TypeError, match="torch.Tensor"):
        C.all_gather(3.0)


# ------------------------------------------------------------------------------ distributed (gloo)
def _run(fn, n, *args, **kwargs):
    return labkit.launch(fn, world_size=n, args=args, kwargs=kwargs, pool=True, timeout=180, echo=False)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_every_algorithm_equals_torch(n):
    """All-reduce (5 algorithms), reduce-scatter and all-gather vs torch, for sum/max/avg, float32/float64/int64,
    sizes 0, 1, 7, 1001 (most do not divide by n)."""
    res = _run(L.equivalence_rank, n, numels=(0, 1, 7, 1001))
    cases = [c for per_rank in res for c in per_rank]
    assert len(res[0]) == 3 * 4 * (3 * (len(C.ALGORITHMS) + 2) + 1)  # + pipelined ring, reduce-scatter; + all-gather
    bad = [c for c in cases if not c["ok"]]
    assert not bad, bad[:5]


def _log_and_bytes(ctx, numel):
    out = {alg: L.record_messages_rank(ctx, alg, numel=numel) for alg in C.SCHEDULES}
    out["ring_pipelined"] = L.record_messages_rank(ctx, "ring", numel=numel, segments=2)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_messages_sent_equal_the_schedule(n):
    numel = 1024 * n  # divisible, so every ring chunk is S/n
    res = _run(_log_and_bytes, n, numel)
    for alg in C.SCHEDULES:
        assert C.log_matches_schedule([r[alg] for r in res], alg, n), alg
    assert C.log_matches_schedule([r["ring_pipelined"] for r in res], "ring", n)
    S = numel * 4
    for r in range(n):
        assert sum(m["bytes"] for m in res[r]["ring"]) == 2 * (n - 1) * S // n
        assert sum(m["bytes"] for m in res[r]["ring_unchunked"]) == (n - 1) * S
    # the animation is built from the real log, and replays to a complete all-reduce
    sched = C.schedule_from_logs([r["ring"] for r in res], "ring", n)
    assert all(c == Counter(range(n)) for row in C.simulate(sched)[-1] for c in row)


def _mismatched(ctx):
    """Every rank sees the same (dtype, shape) table, so every rank raises: no rank is left waiting."""
    out = []
    for t in (torch.ones(4 + ctx.rank), torch.ones(4, dtype=torch.float32 if ctx.rank else torch.float64)):
        try:
            C.all_reduce(t, algorithm="ring")
            out.append("no error")
        except ValueError as e:
            out.append(str(e))
    return out


@pytest.mark.timeout(300)
def test_mismatched_tensors_across_ranks_give_clear_errors():
    for shapes, dtypes in _run(_mismatched, 2):
        assert "shapes differ across ranks: {0: (4,), 1: (5,)}" in shapes
        assert "dtypes differ across ranks" in dtypes


def _timing(ctx):
    rows = B.time_collectives_rank(ctx, algorithms=("ring", "library", "ring_reduce_scatter", "library_all_gather"),
                              sizes=(1 << 12, 1 << 16), repeats=2, warmup=0)
    pp = B.pingpong_rank(ctx, sizes=(64, 1 << 16), repeats=2)
    return rows, pp


@pytest.mark.timeout(300)
def test_timing_rows_and_table():
    res = _run(_timing, 2)
    rows, pp = res[0]
    assert res[1] == (None, None)
    assert len(rows) == 8 and all(r["seconds"] > 0 for r in rows)
    table = B.table_rows(rows, *C.fit_alpha_beta(rows + pp))
    lib = [t for t in table if t["algorithm"] == "library"]
    assert all(t["vs_library"] == 1.0 for t in lib)
    assert {t["size"] for t in table} == {"4 KiB", "64 KiB"}


# ------------------------------------------------------------------------------ the exercise check
def good_ring(t):
    return C.all_reduce(t, algorithm="ring", check=False)  # only isend/irecv inside


def off_by_one_ring(t):
    import torch.distributed as dist

    n, r = dist.get_world_size(), dist.get_rank()
    chunks = list(torch.tensor_split(t, n))
    for s in range(n - 1):  # reduce-scatter only: forgets the all-gather
        buf = torch.empty_like(chunks[(r - s - 1) % n])
        reqs = [dist.irecv(buf, (r - 1) % n), dist.isend(chunks[(r - s) % n], (r + 1) % n)]
        for q in reqs:
            q.wait()
        chunks[(r - s - 1) % n] += buf
    return t


def cheating_ring(t):
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def stub_ring(t):
    raise NotImplementedError


@pytest.mark.timeout(300)
def test_exercise_check_passes_right_and_names_wrong_cases():
    ok = L.check_ring_all_reduce(good_ring, world_sizes=(2, 3), numels=(1, 7))
    assert ok.passed, ok.summary()
    wrong = L.check_ring_all_reduce(off_by_one_ring, world_sizes=(2, 3), numels=(1, 7))
    assert wrong.attempted and not wrong.passed
    assert any("3 ranks, 7 float32" in c.name for c in wrong.failed_cases)
    assert "max abs error" in wrong.failed_cases[0].detail
    cheat = L.check_ring_all_reduce(cheating_ring, world_sizes=(2,), numels=(4,))
    assert not cheat.passed and "send/recv" in cheat.failed_cases[0].detail
    stub = L.check_ring_all_reduce(stub_ring, world_sizes=(2,), numels=(4,))
    assert not stub.attempted and "not attempted" in stub.summary()
    with pytest.raises(TypeError, match="your function"):
        L.check_ring_all_reduce("ring")


def _demo(ctx):
    return L.demo_rank(ctx, numel=4)


@pytest.mark.timeout(300)
def test_demo_collectives_before_after():
    res = _run(_demo, 2)
    assert res[0]["all_reduce"]["after"] == [12, 14, 16, 18] == res[1]["all_reduce"]["after"]
    assert res[1]["broadcast"]["after"] == [1, 2, 3, 4]
    assert res[1]["send/recv"]["after"] == [1, 2, 3, 4]
    assert res[0]["all_gather"]["after"] == [1, 2, 3, 4, 11, 12, 13, 14]
    assert res[1]["scatter"]["after"] == [3, 4]
    assert res[1]["reduce_scatter"]["after"] == [16, 18]
    import matplotlib

    matplotlib.use("Agg")
    from labkit.collectives import plots as P

    for name in L.COLLECTIVES:
        P.plot_collective(res, name)
    P.animate(C.schedule("halving_doubling", 3)).to_jshtml()
    P.plot_steps(C.schedule("ring", 3))


def _mismatched_collective(ctx):
    import torch.distributed as dist

    if ctx.rank == 0:
        dist.all_reduce(torch.ones(3))  # rank 1 never joins
    return ctx.rank


@pytest.mark.timeout(120)
def test_mismatched_collective_ends_in_the_launchers_timeout():
    with pytest.raises(labkit.LaunchTimeout) as info:
        labkit.launch(_mismatched_collective, world_size=2, timeout=5, pool=True, echo=False)
    assert info.value.unfinished == [0]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("n", (1, 5, 6, 7, 8))
def test_every_algorithm_equals_torch_more_world_sizes(n):
    res = labkit.launch(L.equivalence_rank, world_size=n, timeout=600, echo=False,
                        kwargs=dict(numels=(0, 5, 1001)))
    bad = [c for per_rank in res for c in per_rank if not c["ok"]]
    assert not bad, bad[:5]
