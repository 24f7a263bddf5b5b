"""Pipeline schedules, tested without processes: orders, counts, dependencies, makespans, memory."""
import pytest

from labkit.pipeline import schedules as S
from labkit.pipeline.schedules import Action

PM = [(p, m) for p in (1, 2, 3, 4) for m in (1, 2, 3, 4, 8)]


@pytest.mark.parametrize("name", ["naive", "gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", PM)
def test_counts_and_forward_before_backward(name, p, m):
    sched = S.make_schedule(name, p, m)
    assert len(sched) == p
    for acts in sched:
        assert sorted(a for a in acts if a.kind == "F") == [Action("F", i) for i in range(m)]
        assert sorted(a for a in acts if a.kind == "B") == [Action("B", i) for i in range(m)]
        for i in range(m):
            assert acts.index(Action("F", i)) < acts.index(Action("B", i))
    S.validate(sched, m)


def _check_dependencies(sim, p, v=1, placement="loop"):
    end = {}
    for e in sim["events"]:
        s = S.stage_of(e["lane"], e["chunk"], p, placement)
        end[(e["kind"], e["micro"], s)] = (e["start"], e["end"])
    n_virtual = p * v
    for (kind, i, s), (start, _) in end.items():
        if kind == "forward" and s > 0:
            assert start >= end[("forward", i, s - 1)][1] - 1e-12
        if kind == "backward":
            assert start >= end[("forward", i, s)][1] - 1e-12
            if s < n_virtual - 1:
                assert start >= end[("backward", i, s + 1)][1] - 1e-12
    # a rank never runs two actions at once
    for r in range(p):
        evs = sorted((e["start"], e["end"]) for e in sim["events"] if e["lane"] == r)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(evs, evs[1:]))


@pytest.mark.parametrize("p,m", PM)
def test_makespans_match_theory(p, m):
    f, b = 1.0, 2.0
    for name in ("gpipe", "1f1b"):
        sim = S.simulate(S.make_schedule(name, p, m), f, b)
        _check_dependencies(sim, p)
        assert sim["makespan"] == pytest.approx((m + p - 1) * (f + b))
        assert sim["bubble"] == pytest.approx(S.bubble_fraction(p, m))
    naive = S.simulate(S.naive(p, m), f, b)
    _check_dependencies(naive, p)
    assert naive["makespan"] == pytest.approx(p * m * (f + b))
    assert naive["makespan"] / S.simulate(S.gpipe(p, m), f, b)["makespan"] == pytest.approx(S.ideal_speedup(p, m))


@pytest.mark.parametrize("p,m", PM)
def test_memory_1f1b_holds_at_most_p_gpipe_holds_m(p, m):
    assert S.peak_in_flight(S.gpipe(p, m)) == [m] * p
    assert S.peak_in_flight(S.one_f_one_b(p, m)) == [min(p - s, m) for s in range(p)]
    assert S.peak_in_flight(S.naive(p, m)) == [1] * p


def test_1f1b_known_order():
    got = " ".join(map(str, S.one_f_one_b_stage(0, 4, 8)))
    assert got == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7"
    got = " ".join(map(str, S.one_f_one_b_stage(3, 4, 8)))
    assert got == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"
    assert " ".join(map(str, S.one_f_one_b_stage(1, 4, 2))) == "F0 F1 B0 B1"


def test_table_in_docstring_is_what_simulate_draws():
    table = S.format_schedule(S.one_f_one_b(4, 8))
    lines = table.splitlines()
    assert lines[0] == "rank 0  F0 F1 F2 F3 .. .. .. B0 F4 B1 F5 B2 F6 B3 F7 B4 .. B5 .. B6 .. B7"
    assert lines[3] == "rank 3  .. .. .. F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 .. .. .."
    for line in lines[0], lines[3]:
        assert line.split("  ", 1)[1] in S.__doc__


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 4, 2), (2, 8, 3), (3, 6, 2), (4, 4, 2), (4, 8, 2), (4, 16, 4)])
def test_interleaved_shrinks_the_bubble(p, m, v):
    sched = S.interleaved(p, m, v)
    S.validate(sched, m)
    f, b = 1.0 / v, 2.0 / v  # each chunk does 1/v of a stage's work
    sim = S.simulate(sched, f, b)
    _check_dependencies(sim, p, v)
    assert sim["makespan"] == pytest.approx((m + (p - 1) / v) * 3.0)
    assert sim["makespan"] < S.simulate(S.one_f_one_b(p, m), 1.0, 2.0)["makespan"] or p == 1


def test_deadlock_and_bad_orders_are_reported():
    F, B = (lambda i: Action("F", i)), (lambda i: Action("B", i))
    with pytest.raises(ValueError, match="deadlock"):
        S.simulate([[F(0), B(0), F(1), B(1)], [F(1), B(1), F(0), B(0)]])
    with pytest.raises(ValueError, match="before its forward"):
        S.validate([[B(0), F(0)]], 1)
    with pytest.raises(ValueError, match="expected 4"):
        S.validate([[F(0), B(0)]], 2)


@pytest.mark.parametrize("bad", [dict(name="zigzag"), dict(p=0), dict(m=0), dict(m=1.5),
                                 dict(name="interleaved", p=2, m=3)])
def test_bad_input(bad):
    kw = dict(name="1f1b", p=2, m=4) | bad
    with pytest.raises(ValueError) as e:
        S.make_schedule(kw["name"], kw["p"], kw["m"])
    assert "pass" in str(e.value) or "must be" in str(e.value)
    with pytest.raises(ValueError, match="stage must be"):
        S.one_f_one_b_stage(4, 4, 8)


def test_theory_values():
    assert S.bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert S.ideal_speedup(2, 4) == pytest.approx(1.6)
    assert S.ideal_speedup(4, 1) == pytest.approx(1.0)
    assert S.bubble_fraction(4, 8, v=2) == pytest.approx(3 / 19)


# the exercise checks (check_1f1b_order, check_bubble_prediction) are tested in test_pipeline.py


def test_single_process_baseline_and_reference_agree():
    import torch

    from labkit.pipeline import ModelStages, reference_step, time_in_process

    model = ModelStages("mlp", n_stages=3)
    batch = (torch.randn(6, 32), torch.randn(6, 10))
    assert time_in_process(model, 3, batch, repeats=2) > 0
    a, b = reference_step(model, 3, batch, 1), reference_step(model, 3, batch, 3)
    assert abs(a["loss"] - b["loss"]) < 1e-5
    for ga, gb in zip(a["grads"], b["grads"]):
        for k in ga:
            assert torch.allclose(ga[k], gb[k], atol=1e-6)


# ----------------------------------------------------------------------------- zero bubble (issue 27, item 7)
def _check_w_dependencies(sim, p, v=1, placement="loop"):
    end = {(e["kind"], e["micro"], S.stage_of(e["lane"], e["chunk"], p, placement)): (e["start"], e["end"])
           for e in sim["events"]}
    for (kind, i, s), (start, _) in end.items():
        if kind == "weight":
            assert start >= end[("backward", i, s)][1] - 1e-12


@pytest.mark.parametrize("p,m", PM)
def test_zb_h1_runs_f_b_w_once_each_with_1f1b_memory(p, m):
    sched = S.make_schedule("zb-h1", p, m)
    assert sched == S.zb_h1(p, m) and S.splits_backward(sched) and not S.splits_backward(S.one_f_one_b(p, m))
    S.validate(sched, m)
    for acts in sched:
        for kind in "FBW":
            assert sorted(a for a in acts if a.kind == kind) == [Action(kind, i) for i in range(m)]
        for i in range(m):
            assert acts.index(Action("F", i)) < acts.index(Action("B", i)) < acts.index(Action("W", i))
    # without the W's it is 1F1B's order: the same F/B dependencies, so no new deadlock
    assert [[a for a in acts if a.kind != "W"] for acts in sched] == S.one_f_one_b(p, m)
    # same peak memory as 1F1B (a micro-batch is held until its W): every rank holds at most 1F1B's peak
    assert S.peak_in_flight(sched) == [min(p, m)] * p
    assert max(S.peak_in_flight(sched)) == max(S.peak_in_flight(S.one_f_one_b(p, m)))
    sim = S.simulate(sched, 1.0, 2.0, weight=1.0)
    _check_dependencies(sim, p)
    _check_w_dependencies(sim, p)
    assert sim["makespan"] <= S.simulate(S.one_f_one_b(p, m), 1.0, 2.0)["makespan"] + 1e-12


@pytest.mark.parametrize("f,b,w", [(1, 1, 1), (1, 1.5, 0.5), (2, 1, 1), (1, 2, 1), (1, 1, 0), (1.5, 1, 0.5)])
@pytest.mark.parametrize("p,m", [(1, 3), (2, 2), (2, 5), (3, 3), (3, 7), (4, 4), (4, 8), (5, 12)])
def test_zb_h1_bubble_formula_is_what_simulate_gives(f, b, w, p, m):
    """The paper's (p-1)(F+B-W) idle per rank (section 3.1), beside 1F1B's (p-1)(F+B+W), for m >= p, W <= F, B."""
    sim = S.simulate(S.zb_h1(p, m), f, b + w, weight=w)
    assert sim["makespan"] == pytest.approx(m * (f + b + w) + (p - 1) * (f + b - w))
    assert sim["bubble"] == pytest.approx(S.zb_h1_bubble(p, m, f, b + w, weight=w))
    one = S.simulate(S.one_f_one_b(p, m), f, b + w)  # 1F1B: B and W in one backward
    assert one["bubble"] == pytest.approx(S.bubble_fraction(p, m))


def test_zb_h1_bubble_is_a_third_of_1f1b_idle_time_with_equal_f_b_w():
    for p, m in [(2, 4), (4, 8), (8, 32)]:
        zb = S.simulate(S.zb_h1(p, m), 1.0, 2.0, weight=1.0)
        one = S.simulate(S.one_f_one_b(p, m), 1.0, 2.0)
        work = 3 * m
        assert (zb["makespan"] - work) * 3 == pytest.approx(one["makespan"] - work)
        assert S.zb_h1_bubble(p, m) == pytest.approx((p - 1) / (3 * m + p - 1))
    # outside the formula's conditions it refuses and names the simulator
    with pytest.raises(ValueError, match="n_micro >= n_stages"):
        S.zb_h1_bubble(4, 2)
    with pytest.raises(ValueError, match="W <= F"):
        S.zb_h1_bubble(4, 8, forward=1.0, backward=4.0, weight=2.0)
    # strict=False: the expression as written (a table of measured times a little off the conditions)
    assert S.zb_h1_bubble(4, 8, 1.0, 4.0, 2.0, strict=False) == pytest.approx(3 * 1 / (8 * 5 + 3 * 1))


def test_zb_h1_table_in_docstring_is_what_simulate_draws():
    zb = S.format_schedule(S.zb_h1(4, 8), 1.0, 2.0, weight=1.0).splitlines()
    one = S.format_schedule(S.one_f_one_b(4, 8), 1.0, 2.0).splitlines()
    assert zb[0] == "rank 0  F0 F1 F2 F3 .. .. .. B0 W0 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 B5 W5 B6 W6 B7 W7"
    for line in zb[0], zb[3], one[0], one[3]:
        assert line.split("  ", 1)[1] in S.__doc__
    assert len(zb[0].split()) - 2 == 27 and len(one[0].split()) - 2 == 33


def test_old_schedules_ignore_weight_and_bad_w_orders_are_reported():
    F, B, W = (lambda i: Action("F", i)), (lambda i: Action("B", i)), (lambda i: Action("W", i))
    assert S.simulate(S.one_f_one_b(3, 4), 1.0, 2.0, weight=0.5)["makespan"] == pytest.approx(18.0)
    with pytest.raises(ValueError, match="before its backward"):
        S.validate([[F(0), W(0), B(0)]], 1)
    with pytest.raises(ValueError, match="expected 3"):
        S.validate([[F(0), B(0), W(0)], [F(0), B(0)]], 1)
    with pytest.raises(ValueError, match="'F', 'B' or 'W'"):
        S.validate([[F(0), Action("X", 0)]], 1)
    with pytest.raises(ValueError, match="weight <= backward"):
        S.simulate(S.zb_h1(2, 2), 1.0, 1.0, weight=2.0)
    with pytest.raises(ValueError, match="stage must be"):
        S.zb_h1_stage(2, 2, 4)


# ----------------------------------------------------------------------------- ZB-V (two chunks per rank in a V)
@pytest.mark.parametrize("p,m", PM)
def test_zb_v_runs_every_f_b_w_of_both_chunks_within_1f1b_memory(p, m):
    sched = S.make_schedule("zb-v", p, m)
    assert sched == S.zb_v(p, m) and S.placement_of(sched) == "v" and S.n_chunks(sched) == 2
    S.validate(sched, m)
    # the V: rank r holds stages r and 2p-1-r; the last rank holds p-1 and p, so the turn costs no message
    assert [[S.stage_of(r, c, p, "v") for c in (0, 1)] for r in range(p)] == [[r, 2 * p - 1 - r] for r in range(p)]
    assert all(S.rank_of_stage(S.stage_of(r, c, p, "v"), p, "v") == r for r in range(p) for c in (0, 1))
    # a chunk is half a stage: 2p chunk micro-batches held is 1F1B's activation memory (p whole micro-batches)
    assert max(S.peak_in_flight(sched)) <= 2 * p
    sim = S.simulate(sched, 0.5, 1.0, weight=0.5)   # F = B = W, each half of a whole stage's
    _check_dependencies(sim, p, v=2, placement="v")
    _check_w_dependencies(sim, p, v=2, placement="v")
    zb, one = (S.simulate(S.zb_h1(p, m), 1.0, 2.0, weight=1.0), S.simulate(S.one_f_one_b(p, m), 1.0, 2.0))
    assert sim["makespan"] <= zb["makespan"] + 1e-12 <= one["makespan"] + 1e-12


def test_zb_v_bubble_against_zb_h1_and_1f1b():
    """The greedy V idles (p-1)·F per rank for m >= p here (F the time of one chunk's forward), half of ZB-H1's
    (p-1)(F+B-W) of whole stages when F = B = W; printed by ``python -m labkit bench pipeline --zb-only``."""
    for p, m in [(2, 4), (4, 8), (4, 16), (8, 32)]:
        v = S.simulate(S.zb_v(p, m), 0.5, 1.0, weight=0.5)
        zb = S.simulate(S.zb_h1(p, m), 1.0, 2.0, weight=1.0)
        work = 3 * m
        assert v["makespan"] - work == pytest.approx((p - 1) * 0.5)
        assert zb["makespan"] - work == pytest.approx((p - 1) * 1.0)
    # with a message delay the turn at the last rank is free, every other edge pays it
    slow = S.simulate(S.zb_v(2, 4), 0.5, 1.0, comm=0.25, weight=0.5)
    assert slow["makespan"] > S.simulate(S.zb_v(2, 4), 0.5, 1.0, weight=0.5)["makespan"]
    with pytest.raises(ValueError, match="placement must be one of"):
        S.Schedule([], placement="w")
