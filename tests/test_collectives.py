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


@pytest.mark.parametrize("alg", C.SCHEDULE_NAMES)
@pytest.mark.parametrize("n", range(1, 17))
def test_schedule_delivers_every_contribution_exactly_once(alg, n):
    s = C.schedule(alg, n)
    end = C.simulate_messages(s)[-1]
    full = Counter(range(n))
    if alg == "reduce_scatter":
        assert all(end[r][r] == full for r in range(n))
    elif alg == "all_gather":
        assert all(end[r][k] == Counter({k: 1}) for r in range(n) for k in range(n))
    else:
        assert all(c == full for row in end for c in row)


def test_step_counts_and_bytes_each_rank():
    for n in range(2, 9):
        L = math.ceil(math.log2(n))
        assert C.schedule("ring", n).steps == 2 * (n - 1)
        assert C.schedule("tree", n).steps == 2 * L
        assert C.schedule("naive", n).steps == 2 * (n - 1)
        assert C.schedule("ring_unchunked", n).steps == n - 1
        p = 1 << (n.bit_length() - 1)
        assert C.schedule("halving_doubling", n).steps == 2 * int(math.log2(p)) + (2 if p != n else 0)
        S = 1.0
        assert all(abs(b - 2 * (n - 1) / n * S) < 1e-12 for b in C.schedule("ring", n).bytes_each_rank(S))
        assert all(abs(b - (n - 1) * S) < 1e-12 for b in C.schedule("ring_unchunked", n).bytes_each_rank(S))


def test_simulate_catches_a_broken_schedule():
    """The exactly-once check can fail: drop one message, or send a chunk twice."""
    s = C.schedule("ring", 4)
    dropped = C.Schedule("ring", 4, 4, s.messages[1:])
    end = C.simulate_messages(dropped)[-1]
    assert not all(c == Counter(range(4)) for row in end for c in row)
    m = s.messages[0]
    doubled = C.Schedule("ring", 4, 4, s.messages + [C.Message(m.step, m.src, m.dst, m.chunks, "reduce")])
    end = C.simulate_messages(doubled)[-1]
    assert any(max(c.values()) > 1 for row in end for c in row)


def test_old_names_still_work_and_warn():
    """Issue 30's renames keep the old names one release, each with a DeprecationWarning naming the new one."""
    from labkit.collectives import schedules

    for module, old, new in [(C, "SCHEDULES", C.SCHEDULE_NAMES), (C, "simulate", C.simulate_messages),
                             (schedules, "SCHEDULES", C.SCHEDULE_NAMES),
                             (L, "check_bytes_per_rank", L.check_bytes_each_rank)]:
        with pytest.warns(DeprecationWarning, match=f"{old} is now"):
            assert getattr(module, old) is new
    with pytest.warns(DeprecationWarning, match="Schedule.bytes_each_rank"):
        assert C.schedule("ring", 4).bytes_per_rank(8.0) == C.schedule("ring", 4).bytes_each_rank(8.0)
    with pytest.warns(DeprecationWarning):
        from labkit.collectives import simulate  # noqa: F401  (an old import line keeps working)


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


def test_degenerate_fits_say_so_and_fall_back_to_the_stated_default():
    """What broke notebook 01 on a busy machine: a noisy ping-pong fit with beta pinned at 0, so the ring
    never beat the tree. The fallback says why, and the default constants give a crossover in range."""
    a0, b0 = C.DEFAULT_ALPHA_BETA
    cross = ("ring", "tree", 16, 64, 1 << 26)
    for alpha, beta, why in ((1e-4, 0.0, "beta = 0"), (0.0, 1e-9, "alpha = 0"), (-1e-5, 1e-9, "alpha = -1e-05"),
                             (float("nan"), 1e-9, "alpha = nan"), (1e-4, 1 / 500e9, "outside 64 B to 64 MiB")):
        a, b, note = C.usable_alpha_beta(alpha, beta, "ping-pong fit", crossover=cross)
        assert (a, b) == (a0, b0) and "degenerate" in note and why in note and "stated default" in note, note
    a, b, note = C.usable_alpha_beta(1e-4, 1 / 3e9, "ping-pong fit", crossover=cross)
    assert (a, b) == (1e-4, 1 / 3e9) and "degenerate" not in note and "3 GB/s" in note
    assert 64 <= C.crossover_bytes("ring", "tree", 16, a0, b0) <= 1 << 26
    assert "no bandwidth term" in C.describe_alpha_beta(1e-4, 0.0)  # no division by zero when printing


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16, 64])
def test_crossover_bytes_is_where_the_model_lines_cross(n):
    alpha, beta = 80e-6, 1 / 3e9
    s = C.crossover_bytes("ring", "tree", n, alpha, beta)
    if n <= 3:  # the ring has no more latencies than the tree here, and fewer bytes: it never loses
        assert s == 0.0
        return
    t = lambda alg, size: C.predict_time(alg, size, n, alpha, beta)  # noqa: E731
    assert t("ring", 0.99 * s) > t("tree", 0.99 * s) and t("ring", 1.01 * s) < t("tree", 1.01 * s)
    assert C.crossover_bytes("ring", "tree", 64, alpha, beta) > C.crossover_bytes("ring", "tree", 16, alpha, beta)
    assert C.crossover_bytes("ring", "tree", n, alpha, 0.0) == float("inf")
    assert C.crossover_bytes("tree", "ring", n, alpha, beta) == float("inf")  # the tree never wins on bandwidth


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


@pytest.mark.slow
@pytest.mark.timeout(600)
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
    out = {alg: L.record_messages_rank(ctx, alg, numel=numel) for alg in C.SCHEDULE_NAMES}
    out["ring_pipelined"] = L.record_messages_rank(ctx, "ring", numel=numel, segments=2)
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_messages_sent_equal_the_schedule(n):
    numel = 1024 * n  # divisible, so every ring chunk is S/n
    res = _run(_log_and_bytes, n, numel)
    for alg in C.SCHEDULE_NAMES:
        assert C.log_matches_schedule([r[alg] for r in res], alg, n), alg
    assert C.log_matches_schedule([r["ring_pipelined"] for r in res], "ring", n)
    S = numel * 4
    for r in range(n):
        assert sum(m["bytes"] for m in res[r]["ring"]) == 2 * (n - 1) * S // n
        assert sum(m["bytes"] for m in res[r]["ring_unchunked"]) == (n - 1) * S
    # the animation is built from the real log, and replays to a complete all-reduce
    sched = C.schedule_from_logs([r["ring"] for r in res], "ring", n)
    assert all(c == Counter(range(n)) for row in C.simulate_messages(sched)[-1] for c in row)


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


@pytest.mark.timeout(600)
def test_mismatched_tensors_across_ranks_give_clear_errors():
    for shapes, dtypes in _run(_mismatched, 2):
        assert "shapes differ across ranks: {0: (4,), 1: (5,)}" in shapes
        assert "dtypes differ across ranks" in dtypes


def _timing(ctx):
    rows = B.time_collectives_rank(ctx, algorithms=("ring", "library", "ring_reduce_scatter", "library_all_gather"),
                              sizes=(1 << 12, 1 << 16), repeats=2, warmup=0)
    pp = B.pingpong_rank(ctx, sizes=(64, 1 << 16), repeats=2)
    return rows, pp


@pytest.mark.timeout(600)
def test_timing_rows_and_table():
    res = _run(_timing, 2)
    rows, pp = res[0]
    assert res[1] == (None, None)
    assert len(rows) == 8 and all(r["seconds"] > 0 for r in rows)
    table = B.table_rows(rows, *C.fit_alpha_beta(rows + pp))
    lib = [t for t in table if t["algorithm"] == "library"]
    assert all(t["vs_library"] == 1.0 for t in lib)
    assert {t["size"] for t in table} == {"4 KiB", "64 KiB"}


# ------------------------------------------------------------------------------ the exercise checks
def good_ring(tensor):
    """Written from send/recv as the exercise asks (the notebook's solution)."""
    import torch.distributed as dist

    n, rank = dist.get_world_size(), dist.get_rank()
    right, left = (rank + 1) % n, (rank - 1) % n
    chunks = torch.tensor_split(tensor.view(-1), n)
    for s in range(n - 1):
        out, inc = chunks[(rank - s) % n], chunks[(rank - s - 1) % n]
        buf = torch.empty_like(inc)
        for q in [dist.irecv(buf, left), dist.isend(out, right)]:
            q.wait()
        inc += buf
    for s in range(n - 1):
        out, inc = chunks[(rank + 1 - s) % n], chunks[(rank - s) % n]
        for q in [dist.irecv(inc, left), dist.isend(out, right)]:
            q.wait()
    return tensor


def batched_ring(tensor):
    """The same ring through dist.batch_isend_irecv and P2POp, which the recorder must see too."""
    import torch.distributed as dist

    n, rank = dist.get_world_size(), dist.get_rank()
    chunks = torch.tensor_split(tensor.view(-1), n)
    for s in range(2 * (n - 1)):
        if s < n - 1:
            out, inc = chunks[(rank - s) % n], chunks[(rank - s - 1) % n]
            buf = torch.empty_like(inc)
        else:
            out, inc = chunks[(rank + 1 - (s - n + 1)) % n], chunks[(rank - (s - n + 1)) % n]
            buf = inc
        ops = [dist.P2POp(dist.irecv, buf, (rank - 1) % n), dist.P2POp(dist.isend, out, (rank + 1) % n)]
        for q in dist.batch_isend_irecv(ops):
            q.wait()
        if s < n - 1:
            inc += buf
    return tensor


def reduce_scatter_only_ring(t):
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


def whole_tensor_ring(tensor):
    """Correct sum, but passes the whole tensor around the ring: (n-1)·S per rank."""
    import torch.distributed as dist

    n, rank = dist.get_world_size(), dist.get_rank()
    out, inc = tensor.clone(), torch.empty_like(tensor)
    for _ in range(n - 1):
        for q in [dist.irecv(inc, (rank - 1) % n), dist.isend(out, (rank + 1) % n)]:
            q.wait()
        tensor += inc
        out, inc = inc, out
    return tensor


def gather_to_rank0(tensor):
    """Correct sum from send/recv only, but everything goes to rank 0 and back."""
    import torch.distributed as dist

    n, rank = dist.get_world_size(), dist.get_rank()
    if rank == 0:
        buf = torch.empty_like(tensor)
        for k in range(1, n):
            dist.recv(buf, k)
            tensor += buf
        for k in range(1, n):
            dist.send(tensor, k)
    else:
        dist.send(tensor, 0)
        dist.recv(tensor, 0)
    return tensor


def cheating_ring(t):
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def labkit_ring(t):
    return C.all_reduce(t, algorithm="ring", check=False)  # labkit's own ring: real isend/irecv, not the learner's


def stub_ring(t):
    raise NotImplementedError


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ring_check_passes_a_ring_written_from_send_recv():
    for fn in (good_ring, batched_ring):
        ok = L.check_ring_all_reduce(fn, world_sizes=(2, 3), numels=(1, 7))
        assert ok.passed, ok.summary()
        assert len(ok.cases) == 2 * 3 * 2  # (1, 7, one size drawn at check time) x 2 dtypes x 2 world sizes
        drawn = {int(c.name.split()[2]) for c in ok.cases} - {1, 7}
        assert len(drawn) == 1 and 1500 <= drawn.pop() < 5000


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ring_check_fails_shortcuts_and_wrong_rings_with_helpful_messages():
    kw = dict(world_sizes=(2, 3), numels=(7,), seed=5)

    def details(fn, **over):
        res = L.check_ring_all_reduce(fn, **{**kw, **over})
        assert res.attempted and not res.passed, res.summary()
        return " | ".join(c.detail for c in res.failed_cases), res

    d, res = details(reduce_scatter_only_ring)
    assert any("3 ranks, 7 float32" in c.name for c in res.failed_cases)
    assert "wrong sum" in d and "all-gather phase missing" in d
    d, _ = details(cheating_ring, world_sizes=(2,))
    assert "dist.all_reduce" in d and "batch_isend_irecv" in d
    d, _ = details(labkit_ring)
    assert "labkit.collectives.all_reduce" in d and "yourself" in d
    d, _ = details(lambda t: C.all_reduce(t, algorithm="ring"), world_sizes=(2,))  # its shape check is refused too
    assert "labkit.collectives.all_reduce" in d
    d, res = details(whole_tensor_ring)  # the sum is right: only the traffic gives it away
    assert "wrong sum" not in d
    assert "more than one chunk" in d and "whole tensor passed around the ring" in d
    d, res = details(gather_to_rank0)
    assert "wrong sum" not in d and "right neighbour" in d and "left neighbour" in d
    assert all(not c.ok for c in res.cases if c.name.startswith("3 ranks"))
    assert "cut the tensor into n chunks" in res.summary()  # the hint
    assert "def " not in res.summary()  # and no code
    stub = L.check_ring_all_reduce(stub_ring, world_sizes=(2,), numels=(4,))
    assert not stub.attempted and "not attempted" in stub.summary()
    with pytest.raises(TypeError, match="your function"):
        L.check_ring_all_reduce("ring")


def _watched(ctx):
    """The recorder sees send/recv, isend/irecv and batch_isend_irecv, refuses collectives, and restores all."""
    import torch.distributed as dist

    from labkit.collectives.validation import watch_p2p

    n, r = ctx.world_size, ctx.rank
    log = []
    x = torch.ones(6)
    with watch_p2p(log):
        for q in [dist.irecv(torch.empty(3), (r - 1) % n), dist.isend(x[:3], (r + 1) % n)]:
            q.wait()
        for q in dist.batch_isend_irecv([dist.P2POp(dist.irecv, torch.empty(2), (r - 1) % n),
                                         dist.P2POp(dist.isend, x[:2], (r + 1) % n)]):
            q.wait()
        try:
            dist.broadcast(x, 0)
            refused = None
        except AssertionError as e:
            refused = str(e)
    dist.all_reduce(x)  # restored
    return log, refused, float(x[0])


@pytest.mark.timeout(600)
def test_watch_p2p_records_every_message_and_restores_torch():
    res = _run(_watched, 2)
    for rank, (log, refused, total) in enumerate(res):
        sends = [(m["dst"], m["bytes"]) for m in log if m["kind"] == "send"]
        recvs = [(m["src"], m["bytes"]) for m in log if m["kind"] == "recv"]
        assert sends == [(1 - rank, 12), (1 - rank, 8)] and recvs == [(1 - rank, 12), (1 - rank, 8)]
        assert all(m["via"] is None for m in log)
        assert "dist.broadcast" in refused and total == 2.0


def test_ring_traffic_problems_on_the_schedules_own_logs():
    """A ring's log has no problems; the tree's, naive's and unchunked ring's do, each named."""
    def log_of(alg, n, rank, numel):
        bounds = C.chunk_bounds(numel, C.schedule(alg, n).n_chunks)
        size = lambda m: sum(bounds[k][1] - bounds[k][0] for k in m.chunks) * 4  # noqa: E731
        return [{"src": m.src, "dst": m.dst, "bytes": size(m)} for m in C.schedule(alg, n).messages if m.src == rank]

    for n in range(2, 9):
        for numel in (1, n, 1001):
            assert all(C.ring_traffic_problems(log_of("ring", n, r, numel), r, n, numel, 4) == [] for r in range(n))
    p = C.ring_traffic_problems(log_of("ring_unchunked", 4, 0, 1000), 0, 4, 1000, 4)
    assert "more than one chunk" in p[0] and "whole tensor passed around the ring" in p[1]
    p = C.ring_traffic_problems(log_of("tree", 4, 0, 1000), 0, 4, 1000, 4)
    assert "right neighbour" in p[0]
    p = C.ring_traffic_problems(log_of("ring", 4, 0, 1000)[:3], 0, 4, 1000, 4)
    assert "phase missing" in p[0]
    p = C.ring_traffic_problems([{"kind": "recv", "src": None, "dst": 0, "bytes": 4}], 0, 4, 4, 4)
    assert "src=None" in p[0]
    assert C.ring_traffic_problems([], 0, 1, 10, 4) == []


def bytes_right(algorithm, S, n):
    return 2 * (n - 1) * S / n if algorithm == "ring" else (n - 1) * S


def test_bytes_check_passes_right_and_fails_wrong_answers_with_reasons():
    ok = L.check_bytes_each_rank(bytes_right)
    assert ok.passed, ok.summary()
    assert L.check_bytes_each_rank(lambda a, S, n: int(bytes_right(a, S, n)), seed=1).passed  # integer bytes are fine
    whole = L.check_bytes_each_rank(lambda a, S, n: (n - 1) * S, seed=1)
    assert not whole.passed and "unchunked ring sends" in whole.failed_cases[0].detail
    half = L.check_bytes_each_rank(lambda a, S, n: (n - 1) * S / n if a == "ring" else (n - 1) * S, seed=1)
    assert "one phase" in half.failed_cases[0].detail
    lib = L.check_bytes_each_rank(lambda a, S, n: C.schedule(a, n).bytes_each_rank(S)[0], seed=1)
    assert not lib.passed and all("Schedule.bytes_each_rank" in c.detail for c in lib.cases)
    lib2 = L.check_bytes_each_rank(lambda a, S, n: C.bus_factor("all_reduce", n) * S if a == "ring" else (n - 1) * S)
    assert not lib2.passed and "bus_factor" in lib2.failed_cases[0].detail
    table = {("ring", 2, 1 << 20): 1 << 20, ("ring", 4, 1 << 20): 3 << 19}  # an answer fitted to fixed cases
    hard = L.check_bytes_each_rank(lambda a, S, n: table.get((a, n, S), 0), seed=1)
    assert not hard.passed and "count a rank's messages" in hard.failed_cases[0].detail
    none = L.check_bytes_each_rank(lambda a, S, n: None, seed=1)
    assert "return a number" in none.failed_cases[0].detail
    stub = L.check_bytes_each_rank(lambda a, S, n: (_ for _ in ()).throw(NotImplementedError))
    assert not stub.attempted
    draws = {c.name for seed in (1, 2) for c in L.check_bytes_each_rank(bytes_right, seed=seed).cases}
    assert len(draws) == 16  # sizes and world sizes are drawn at check time
    with pytest.raises(TypeError, match="fn\\(algorithm"):
        L.check_bytes_each_rank(3)


def _demo(ctx):
    return L.demo_rank(ctx, numel=4)


@pytest.mark.timeout(600)
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


@pytest.mark.timeout(480)
def test_mismatched_collective_ends_in_the_launchers_timeout():
    with pytest.raises(labkit.LaunchTimeout) as info:
        labkit.launch(_mismatched_collective, world_size=2, timeout=5, pool=True, echo=False)
    assert info.value.unfinished == [0]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("n", (1, 8))  # 2-4 in the test above (3: a prime, uneven chunks); 7 dropped for CI time
def test_every_algorithm_equals_torch_more_world_sizes(n):
    res = labkit.launch(L.equivalence_rank, world_size=n, timeout=600, echo=False,
                        kwargs=dict(numels=(0, 5, 1001)))
    bad = [c for per_rank in res for c in per_rank if not c["ok"]]
    assert not bad, bad[:5]


@pytest.mark.parametrize("n", (2, 3, 4, 5, 8, 16))
def test_total_traffic_ring_and_tree_move_the_same_bytes_ring_sends_n_times_the_messages(n):
    S = 4096.0
    ring_msgs, ring_bytes = C.total_traffic("ring", S, n)
    tree_msgs, tree_bytes = C.total_traffic("tree", S, n)
    assert ring_bytes == pytest.approx(tree_bytes) == pytest.approx(2 * (n - 1) * S)
    assert (ring_msgs, tree_msgs) == (2 * (n - 1) * n, 2 * (n - 1))
    # the critical path (cost_terms) is a different count: the ring's is n times smaller in bytes per rank
    assert C.cost_terms("ring", S, n)[1] == pytest.approx(ring_bytes / n)
    assert C.total_traffic("ring", 0, n)[1] == 0
    with pytest.raises(ValueError, match="nbytes"):
        C.total_traffic("ring", -1, n)
    with pytest.raises(ValueError, match="algorithm|ring"):
        C.total_traffic("rign", S, n)


def test_published_links_predict_a_ring_tree_crossover_in_a_realistic_range():
    for name, link in C.PUBLISHED_LINKS.items():
        assert {"alpha", "beta", "world_size", "source"} <= set(link), name
        assert "nccl" in link["source"].lower() and "GB/s" in link["source"], name
        cross = C.crossover_bytes("ring", "tree", link["world_size"], link["alpha"], link["beta"])
        assert 64 << 10 <= cross <= 64 << 20, (name, cross)       # between 64 KiB and 64 MiB
        big, small = 1 << 28, 1 << 10
        n, a, b = link["world_size"], link["alpha"], link["beta"]
        assert C.predict_time("ring", big, n, a, b) < C.predict_time("tree", big, n, a, b)
        assert C.predict_time("tree", small, n, a, b) < C.predict_time("ring", small, n, a, b)


def test_every_chart_gives_an_algorithm_the_same_colour_whatever_the_row_order():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.collectives import plots as P

    rows = [{"algorithm": a, "bytes": s, "world_size": 4, "seconds": 1e-3 * (1 + i), "collective": "all_reduce"}
            for i, a in enumerate(("tree", "ring", "library")) for s in (1 << 12, 1 << 20)]
    for order in (rows, rows[::-1]):
        fig, ax = plt.subplots(1, 2)
        P.plot_busbw(order, ax[0])
        P.plot_predicted_vs_measured(order, 1e-4, 1 / 2e9, ax[1])
        for a in ax:
            for line in a.get_lines():
                name = line.get_label().split()[0]
                assert matplotlib.colors.to_hex(line.get_color()) == P.algorithm_colour(name), line.get_label()
        labels = [t.get_text() for t in ax[0].get_xticklabels()]
        assert labels[0] == "4 KiB" and labels[-1] == "1 MiB", labels
        plt.close(fig)
    assert P.algorithm_colour("ring") != P.algorithm_colour("tree")
    assert len(set(P.ALGORITHM_COLOURS.values())) == len(P.ALGORITHM_COLOURS)
    with pytest.raises(ValueError, match="lo="):
        P.size_axis(plt.gca(), 0, 10)
