"""Lab 05, load balancing: exact partitioners against brute force, the profiler on known layers,
bad input, and real 2-rank GPipe runs of even and balanced splits against the single process."""
import math
import random

import pytest
import torch
from torch import nn

from labkit import balance as B
from labkit import balance as R
from labkit.balance import lab as L
from labkit.partition import validate_cuts


# ----------------------------------------------------------------------------- partitioners
@pytest.mark.parametrize("method", ["dp", "search"])
def test_exact_partition_matches_brute_force_on_random_cases(method):
    rng = random.Random(42)
    for trial in range(400):
        n = rng.randint(1, 9)
        if trial % 2:
            costs = [rng.randint(0, 12) for _ in range(n)]
        else:
            costs = [round(rng.uniform(0, 5), 3) for _ in range(n)]
        k = rng.randint(1, n)
        ref = B.brute_force_partition(costs, k)
        got = B.min_max_partition(costs, k, method)
        assert len(got.cuts) == k - 1 and sum(got.sizes) == n and min(got.sizes) >= 1
        assert got.stage_costs == B.stage_sums(costs, got.cuts)
        assert math.isclose(got.bottleneck, ref.bottleneck, rel_tol=1e-12, abs_tol=1e-12), (costs, k, got, ref)


def test_known_optimum_and_edge_cases():
    s = B.min_max_partition([10, 20, 30, 40, 50, 60], 2)
    assert s.cuts == [4] and s.sizes == [4, 2] and s.stage_costs == [100, 110]
    assert B.min_max_partition([1, 2, 3], 1).cuts == []
    assert B.min_max_partition([1, 2, 3], 3).sizes == [1, 1, 1]
    assert B.min_max_partition([0, 0, 0, 0], 3).bottleneck == 0
    # a single huge layer dominates however we cut
    assert B.min_max_partition([1, 100, 1, 1], 2).bottleneck == 101
    assert B.min_max_partition([1, 100, 1, 1], 3).bottleneck == 100


def test_greedy_split_is_not_exact():
    greedy = B.greedy_split(L.EXERCISE_COSTS, 3)
    best = B.min_max_partition(L.EXERCISE_COSTS, 3)
    assert greedy.bottleneck > best.bottleneck  # 22 vs 19: why the solver is exact, not greedy


def test_fits_agrees_with_the_optimum():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 8)
        costs = [rng.randint(0, 9) for _ in range(n)]
        k = rng.randint(1, n)
        opt = B.brute_force_partition(costs, k).bottleneck
        assert B.fits(costs, k, opt)
        assert not B.fits(costs, k, opt - 0.5)


def test_cuts_sizes_even():
    assert B.cuts_to_sizes([4], 6) == [4, 2]
    assert B.sizes_to_cuts([4, 2]) == [4]
    assert B.sizes_to_cuts(B.cuts_to_sizes([2, 5, 7], 9)) == [2, 5, 7]
    assert B.even_cuts(11, 2) == [6] and B.even_cuts(6, 3) == [2, 4] and B.even_cuts(5, 1) == []
    from labkit.pipeline import ModelStages

    # one "even" rule for labs 03-05: the small ResNet (11 layers) in 3 stages is cut at [4, 8] by lab 04's
    # ModelStages and by lab 05's even baseline alike (they used to disagree: [4, 7] and [4, 8])
    for n_stages in range(1, 12):
        assert ModelStages("small", n_stages=n_stages).cuts == B.even_cuts(11, n_stages)
    assert B.even_cuts(11, 3) == [4, 8] and B.cuts_to_sizes([4, 8], 11) == [4, 4, 3]


def test_memory_balance_uses_param_scale_and_n_micro():
    mk = lambda p, a: B.LayerProfile(0, "x", 1.0, 1.0, p, a, 0)  # noqa: E731
    prof = [mk(0, 100), mk(10, 50), mk(40, 0)]
    assert B.memory_costs(prof, param_scale=4, n_micro=1) == [100, 90, 160]
    assert B.balance_by_memory(prof, 2, param_scale=4).cuts == [2]             # 190 | 160
    assert B.balance_by_memory(prof, 2, param_scale=1, n_micro=4).cuts == [1]  # 400 | 250
    assert B.balance_by_memory([5, 1, 1], 2).cuts == [1]  # plain byte counts work too


def test_gpipe_timeline_formula_and_slowest_stage():
    span, events = B.gpipe_timeline([1, 1, 1], [2, 2, 2], n_micro=4)
    assert span == pytest.approx((4 + 3 - 1) * 3)  # equal stages: (m + p - 1)(f + b)
    assert len(events) == 2 * 3 * 4
    slow, _ = B.gpipe_timeline([1, 5], [1, 5], n_micro=8)
    assert slow >= 8 * 10  # the slow stage must do all m micro-batches: it sets the pace
    assert slow < 8 * 10 + 2 * 2 + 1e-9


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="out of range"):
        validate_cuts([0], 5)
    with pytest.raises(ValueError, match="out of range"):
        validate_cuts([5], 5)
    with pytest.raises(ValueError, match="strictly increasing"):
        validate_cuts([3, 2], 5)
    with pytest.raises(ValueError, match="strictly increasing"):
        validate_cuts([2, 2], 5)
    with pytest.raises(ValueError, match="3 stages need 2"):
        validate_cuts([2], 5, n_stages=3)
    with pytest.raises(TypeError, match="not an int"):
        validate_cuts([1.5], 5)
    with pytest.raises(ValueError, match="at most 3 stages"):
        B.min_max_partition([1, 2, 3], 4)
    with pytest.raises(ValueError, match=">= 1"):
        B.min_max_partition([1, 2, 3], 0)
    with pytest.raises(ValueError, match=">= 0"):
        B.min_max_partition([1, -2, 3], 2)
    with pytest.raises(ValueError, match="finite"):
        B.min_max_partition([1, float("nan")], 1)
    with pytest.raises(TypeError, match="plain numbers"):
        B.min_max_partition([1, "2"], 1)
    with pytest.raises(ValueError, match="empty"):
        B.min_max_partition([], 1)
    with pytest.raises(ValueError, match="'dp' or 'search'"):
        B.min_max_partition([1, 2], 1, method="greedy")
    with pytest.raises(ValueError, match="n_micro .micro-batches."):
        B.gpipe_timeline([1], [1], 0)
    with pytest.raises(ValueError, match="one time per stage"):
        B.gpipe_timeline([1, 2], [1], 2)
    with pytest.raises(TypeError, match="nn.Sequential"):
        B.as_layers(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="input tensor"):
        B.profile_layers(nn.Sequential(nn.Linear(2, 2)), [1.0, 2.0])
    with pytest.raises(ValueError, match="divide into 4"):
        R.compare_splits("small", 2, batch=10, n_micro=4, pipeline=False)
    with pytest.raises(ValueError, match="n_micro .micro-batches."):
        R.compare_splits("small", 2, batch=8, n_micro=0, pipeline=False)
    with pytest.raises(ValueError, match="2 stages need 1"):  # a split for another number of stages than ranks
        R.compare_splits("small", 2, batch=8, n_micro=2, splits={"mine": [3, 6]}, pipeline=False)
    with pytest.raises(ValueError, match="milliseconds"):
        B.SleepLayer(-1)


# ----------------------------------------------------------------------------- profiling
@pytest.mark.timeout(60)
def test_sleeping_layers_10_to_60_ms_give_the_known_optimum():
    model = B.sleep_layers([10, 20, 30, 40, 50, 60], backward_ratio=0.5)
    prof = B.profile_layers(model, torch.ones(2, 3), repeats=1, warmup=0)
    for p, ms in zip(prof, [10, 20, 30, 40, 50, 60]):
        assert ms <= p.forward_ms < ms + 50  # sleep never returns early; a busy machine may add a little
        assert ms / 2 <= p.backward_ms < ms / 2 + 50
    for method in ("dp", "search"):
        split = B.balance_by_time(prof, 2, method=method)
        assert split.sizes == [4, 2], split   # 10+20+30+40 = 100 | 50+60 = 110 (x1.5 with backward)
    assert B.balance_by_time(prof, 3).sizes == [3, 2, 1]  # 60 | 90 | 60 (x1.5)


def test_profile_counts_memory_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 8)
    prof = B.profile_layers(model, x, repeats=2)
    assert [p.param_bytes for p in prof] == [(8 * 16 + 16) * 4, 32 * 4, 0, (16 * 4 + 4) * 4]
    assert prof[0].activation_bytes == 5 * 8 * 4       # Linear saves its input for the weight gradient
    assert prof[3].activation_bytes == 5 * 16 * 4
    assert prof[2].activation_bytes == 5 * 16 * 4       # ReLU saves its output
    assert [p.output_bytes for p in prof] == [5 * 16 * 4] * 3 + [5 * 4 * 4]
    assert all(p.forward_ms > 0 and p.backward_ms > 0 for p in prof)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"profiling changed {k}"
    assert all(p.grad is None for p in model.parameters())


def test_measured_stages_of_a_resnet_cover_every_layer():
    layers = R.lab_model("small")
    x = R.micro_sample("small", 2)
    stages = R.measure_stages(layers, [5], x, repeats=1)
    assert len(stages) == 2 and stages[0].output_bytes == 2 * 16 * 32 * 32 * 4
    assert stages[1].output_bytes == 2 * 10 * 4
    assert stages[0].param_bytes + stages[1].param_bytes == sum(p.numel() * 4 for p in layers.parameters())


# ----------------------------------------------------------------------------- real pipelines (gloo)
@pytest.mark.timeout(180)
def test_even_and_balanced_resnet_pipelines_equal_the_single_process():
    from labkit.pipeline import ModelStages, max_grad_error, reference_step

    # a made-up profile whose time-balanced cut is known ([8]), so the test does not depend on timing noise
    fake = [B.LayerProfile(i, "x", t, t, 0, 0, 0) for i, t in enumerate([1, 1, 1, 1, 1, 1, 1, 1, 6, 1, 1])]
    cmp = R.compare_splits("small", n_stages=2, batch=4, n_micro=2, repeats=1, profile=fake, stage_repeats=1)
    assert cmp.splits == {"even": [6], "balanced": [8]}
    even, bal = cmp.rows[0], cmp.rows[1]
    # the solver's split is never worse than the even one on the profile it solved
    assert max(bal["predicted_stage_ms"]) <= max(even["predicted_stage_ms"]) + 1e-9
    assert all(len(r["measured_stage_ms"]) == 2 and r["predicted_step_ms"] > 0 for r in cmp.rows)
    x, y = R.micro_sample("small", 4, 1), torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2))
    for name, cuts in cmp.splits.items():
        ref = reference_step(ModelStages("small", cuts=cuts), 2, (x, y), 2)
        run = cmp.runs[name]
        assert run.loss == pytest.approx(ref["loss"], abs=1e-5), name
        assert max_grad_error(run.grads, ref["grads"]) < 1e-4, name
        assert run.seconds > 0 and len(run.events) > 0
    # the same model, data and weights: every split computes the same loss
    assert cmp.rows[0]["loss"] == pytest.approx(cmp.rows[1]["loss"], abs=1e-5)


@pytest.mark.timeout(180)
def test_sleeping_pipeline_balanced_beats_even_as_predicted():
    cmp = R.sleep_pipeline([5, 10, 15, 20, 25, 30], n_stages=2, n_micro=4, backward_ratio=1.0)
    even, bal = cmp.rows
    assert even["cuts"] == [3] and bal["cuts"] == [4]
    assert even["predicted_step_ms"] == pytest.approx(660) and bal["predicted_step_ms"] == pytest.approx(540)
    for r in cmp.rows:  # sleeping uses no CPU: measured within a margin of the prediction
        assert r["predicted_step_ms"] <= r["pipeline_step_ms"] < r["predicted_step_ms"] * 1.35 + 40, r
    assert bal["pipeline_step_ms"] < even["pipeline_step_ms"]
    grads = cmp.runs["balanced"].grads  # y = x * gain per layer, loss = mse(x, 0) at x = 1: dL/dgain = 2
    assert all(float(g) == pytest.approx(2.0) for st in grads for g in st.values())


# ----------------------------------------------------------------------------- exercises and tour
def _stub(*args):
    raise NotImplementedError


def _brute(costs, k):
    import itertools
    return list(min(itertools.combinations(range(1, len(costs)), k - 1),
                    key=lambda c: max(B.evaluate_split(costs, list(c)).stage_costs)))


def _my_fits(costs, k, limit):
    stages, current = 1, 0
    for c in costs:
        if c > limit:
            return False
        if current + c > limit:
            stages, current = stages + 1, 0
        current += c
    return stages <= k


def test_hand_split_check():
    best = B.min_max_partition(L.EXERCISE_COSTS, L.EXERCISE_STAGES)
    assert L.check_hand_split(_brute).passed
    res = L.check_hand_split(_stub)
    assert not res.attempted and not res.passed
    res = L.check_hand_split(lambda costs, k: B.min_max_partition(costs, k).cuts)  # shortcut: the solver
    assert not res.passed and "min_max_partition" in res.summary() and "yourself" in res.summary()
    res = L.check_hand_split(lambda costs, k: B.balance_by_time(costs, k).cuts)
    assert not res.passed and "balance_by_time" in res.summary()
    res = L.check_hand_split(lambda costs, k: best.cuts)  # hard-codes the exercise's answer
    assert not res.passed and res.cases[0].ok and all("drawn now" in c.name for c in res.failed_cases)
    res = L.check_hand_split(best.cuts)  # a constant list: the check must try other costs
    assert not res.passed and "my_cuts(costs, n_stages)" in res.summary()
    res = L.check_hand_split(lambda: best.cuts)
    assert not res.passed and "my_cuts(costs, n_stages)" in res.summary()
    res = L.check_hand_split(lambda costs, k: B.even_cuts(len(costs), k))  # even, not balanced
    assert not res.passed and "a better split exists" in res.summary() and "hint:" in res.summary()
    res = L.check_hand_split(lambda costs, k: B.greedy_split(costs, k).cuts)  # the library's greedy pass
    assert not res.passed and "greedy_split" in res.summary()


def test_fits_check():
    assert L.check_fits(_my_fits).passed
    assert not L.check_fits(_stub).attempted
    res = L.check_fits(B.fits)  # shortcut: the library's own test
    assert not res.passed and "labkit.balance.solvers.fits" in res.summary() and "greedy pass" in res.summary()
    res = L.check_fits(lambda costs, k, limit: B.min_max_partition(costs, k).bottleneck <= limit)
    assert not res.passed and "min_max_partition" in res.summary()
    res = L.check_fits(lambda costs, k, limit: True)
    assert not res.passed and "expected False" in res.summary()
    fixed = {((10, 20, 30, 40, 50, 60), 2, 110): True, ((10, 20, 30, 40, 50, 60), 2, 109): False,
             ((5, 5, 5), 3, 5): True, ((5, 5, 5), 2, 5): False, ((1, 9, 1), 3, 8): False, ((4,), 1, 4): True}
    res = L.check_fits(lambda costs, k, limit: fixed.get((tuple(costs), k, limit), sum(costs) <= k * limit))
    assert not res.passed and all(c.ok for c in res.cases[:6])  # hard-coded edge cases, wrong rule elsewhere
    res = L.check_fits(lambda costs, k, limit: _my_fits(costs, k, limit) if max(costs) <= limit else True)
    assert not res.passed  # forgets that one layer above the limit makes it impossible


def test_tour_pure_part():
    rows = L.tour(measured=False)
    assert rows and all(r["ok"] for r in rows), rows


def test_old_names_still_work_and_warn():
    """Issue 30's renames keep working one release, each with a DeprecationWarning naming the new spelling."""
    with pytest.warns(DeprecationWarning, match="labkit.partition.validate_cuts"):
        assert B.check_cuts is validate_cuts
    with pytest.warns(DeprecationWarning, match="labkit.partition.validate_cuts"):
        assert B.validate_cuts is validate_cuts
    assert "validate_cuts" not in B.__all__
    with pytest.warns(DeprecationWarning, match=r"k=\) is now n_stages="):
        assert B.min_max_partition([10, 20, 30, 40, 50, 60], k=2).cuts == [4]
    with pytest.warns(DeprecationWarning, match="n_stages"):
        assert B.fits([1, 2, 3], k=2, limit=3)
    prof = [B.LayerProfile(0, "x", 1.0, 1.0, p, a, 0) for p, a in ((0, 100), (10, 50), (40, 0))]
    with pytest.warns(DeprecationWarning, match=r"micro_batches=\) is now n_micro="):
        assert B.memory_costs(prof, param_scale=1, micro_batches=4) == B.memory_costs(prof, param_scale=1, n_micro=4)
    with pytest.warns(DeprecationWarning, match="n_micro"):
        assert B.gpipe_timeline([1, 1], [2, 2], m=4) == B.gpipe_timeline([1, 1], [2, 2], n_micro=4)
    with pytest.warns(DeprecationWarning, match=r"Comparison\((k=\) is now n_stages|m=\) is now n_micro)="):
        cmp = B.Comparison("x", k=2, batch=4, m=2, profile=None, splits={})
    assert (cmp.n_stages, cmp.n_micro) == (2, 2)
    with pytest.warns(DeprecationWarning, match=r"Comparison.m is now Comparison.n_micro"):
        assert cmp.m == 2


def test_stage_profile_gap_times_layers_and_stages_together():
    layers = B.sleep_layers([2, 4, 6], backward_ratio=1.0)   # fwd + bwd: 4, 8, 12 ms
    gap = B.stage_profile_gap(layers, [1], torch.ones(2, 3), rounds=3)
    assert gap["n_layers"] == [1, 2] and len(gap["ratio"]) == 2
    for got, want in zip(gap["layer_sum_ms"] + gap["stage_ms"], (4, 20, 4, 20)):
        assert want * 0.98 <= got < want + 200, (gap, want)   # a sleep is never shorter; generous under load
    assert gap["overhead_ms"] > 0
    assert gap["fixed_excess_ms"] == [0.0, gap["overhead_ms"]]   # a stage of k layers pays the fixed cost k - 1 more
    assert all(r > 0 for r in gap["ratio"])


def test_stage_profile_gap_refuses_bad_input():
    layers = B.sleep_layers([1, 1, 1])
    with pytest.raises(ValueError, match="rounds"):
        B.stage_profile_gap(layers, [1], torch.ones(2, 3), rounds=0)
    with pytest.raises(ValueError):
        B.stage_profile_gap(layers, [5], torch.ones(2, 3))   # a cut past the last layer
    with pytest.raises(TypeError, match="sample"):
        B.stage_profile_gap(layers, [1], [1.0, 2.0])
