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


def _check_dependencies(sim, p, v=1):
    end = {}
    for e in sim["events"]:
        s = e["chunk"] * p + e["lane"]
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
