"""The pipeline executor on real gloo ranks: gradients equal single-process training, timelines, memory."""
import pytest
import torch

import labkit
from labkit.pipeline import (
    ModelStages,
    SleepStage,
    SleepStages,
    bubble_fraction,
    max_grad_error,
    reference_step,
    run_pipeline,
    run_torch_pipelining,
    speedup_over_naive,
    split_batch,
)
from labkit.pipeline.lab import pipeline_rank


@pytest.fixture(scope="module", autouse=True)
def _stop_pools():
    yield
    labkit.shutdown_pools()


def _batch(rows=10, d_in=32, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d_in, generator=g), torch.randn(rows, d_out, generator=g)


@pytest.mark.timeout(180)
def test_every_schedule_gives_single_process_gradients_on_2_ranks():
    batch = _batch(10)  # 10 rows into 3 or 4 micro-batches: uneven sizes, weighted losses
    model2, model4 = ModelStages("mlp", n_stages=2), ModelStages("mlp", n_stages=4)
    for make_stage, sched, m in ((model2, "naive", 1), (model2, "naive", 3), (model2, "gpipe", 3),
                                 (model2, "1f1b", 3), (model2, "1f1b", 10), (model4, "interleaved", 4)):
        ref = reference_step(make_stage, make_stage.n_stages, batch)
        run = run_pipeline(make_stage, 2, batch, m, schedule=sched, repeats=2)
        assert max_grad_error(run.grads, ref["grads"]) < 1e-5, (sched, m)
        assert run.loss == pytest.approx(ref["loss"], rel=1e-5), (sched, m)
        # every forward and backward ran once per micro-batch (and chunk) on every rank, in the timeline
        for rank in range(2):
            kinds = [e["kind"] for e in run.events if e["lane"] == rank]
            assert kinds.count("forward") == kinds.count("backward") == m * run.chunks
    # a wrong gradient is caught: the check can fail
    wrong = [dict(g) for g in ref["grads"]]
    k = next(iter(wrong[0]))
    wrong[0][k] = wrong[0][k] + 1e-3
    assert max_grad_error(wrong, ref["grads"]) > 1e-4


@pytest.mark.timeout(180)
def test_same_gradients_as_torch_distributed_pipelining():
    batch = _batch(8)
    model = ModelStages("mlp", n_stages=2)
    for sched in ("gpipe", "1f1b"):
        ours = run_pipeline(model, 2, batch, 4, schedule=sched)
        theirs = run_torch_pipelining(model, 2, batch, 4, schedule=sched)
        assert max_grad_error(ours.grads, theirs["grads"]) < 1e-5
        assert ours.loss == pytest.approx(theirs["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="equal micro-batches"):
        run_torch_pipelining(model, 2, _batch(10), 4)


@pytest.mark.timeout(180)
def test_4_ranks_sleeping_stages_and_mlp():
    batch = _batch(8, d_in=4, d_out=4)
    sleepy = SleepStages([0.0, 0.001, 0.0, 0.001], [0.0, 0.0, 0.001, 0.0])
    ref = reference_step(sleepy, 4, batch)
    run = run_pipeline(sleepy, 4, batch, 4, schedule="1f1b")
    assert max_grad_error(run.grads, ref["grads"]) < 1e-6
    assert abs(float(ref["grads"][0]["gain"])) > 0  # the gain's gradient is real, not zero
    mlp4 = ModelStages("mlp", cuts=[3, 8, 10])  # uneven stages: 3, 5, 2 and 3 layers
    ref = reference_step(mlp4, 4, _batch(9))
    run = run_pipeline(mlp4, 4, _batch(9), 3, schedule="gpipe")
    assert max_grad_error(run.grads, ref["grads"]) < 1e-5


@pytest.mark.timeout(180)
def test_small_resnet_stages_match_micro_batch_accumulation():
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
    model = ModelStages("small", cuts=[5])
    run = run_pipeline(model, 2, batch, 2, schedule="1f1b")
    # BatchNorm normalises each micro-batch with its own statistics, so the reference accumulates the
    # same micro-batches one after another in one process
    ref = reference_step(model, 2, batch, n_micro=2)
    assert max_grad_error(run.grads, ref["grads"]) < 1e-4
    assert run.loss == pytest.approx(ref["loss"], rel=1e-5)


@pytest.mark.timeout(180)
def test_timeline_causality_memory_and_schedule_speedup():
    p, m = 2, 4
    sleepy = SleepStages(0.01, 0.02, n_stages=p)
    sp = speedup_over_naive(sleepy, p, m, repeats=3)
    # theory 1.6; a loaded 2-core box loses some to scheduling, but the pipeline must clearly win
    assert sp["speedup"] > 1.2, sp["speedup"]
    run = sp["pipelined"]
    assert abs(run.bubble - bubble_fraction(p, m)) < 0.15, (run.bubble, bubble_fraction(p, m))
    assert sp["naive"].bubble == pytest.approx(0.5, abs=0.1)  # naive: one rank works at a time
    ends = {(e["lane"], e["label"]): e for e in run.events if e["kind"] in ("forward", "backward")}
    for i in range(m):  # rank 1 starts F_i after rank 0 finished it; rank 0 starts B_i after rank 1's
        assert ends[(1, f"F{i}")]["start"] >= ends[(0, f"F{i}")]["end"]
        assert ends[(0, f"B{i}")]["start"] >= ends[(1, f"B{i}")]["end"]
    # memory, measured: GPipe holds all m micro-batches on rank 0, 1F1B at most p
    batch = _batch(8, d_in=4, d_out=4)
    gp = run_pipeline(SleepStages(0.0, 0.0, n_stages=2), 2, batch, 8, schedule="gpipe")
    ob = run_pipeline(SleepStages(0.0, 0.0, n_stages=2), 2, batch, 8, schedule="1f1b")
    assert gp.peak_live == [8, 8] and ob.peak_live == [2, 1]
    assert gp.peak_bytes[0] == 4 * ob.peak_bytes[0] > 0


@pytest.mark.timeout(120)
def test_bad_input_gives_clear_errors():
    batch = _batch(4)
    model = ModelStages("mlp", n_stages=2)
    with pytest.raises(ValueError, match="n_micro"):
        run_pipeline(model, 2, batch, 0)
    with pytest.raises(ValueError, match="cannot make 5 micro-batches"):
        run_pipeline(model, 2, batch, 5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        run_pipeline(model, 2, batch, 2, schedule="zigzag")
    with pytest.raises(ValueError, match="builds 2 stages"):
        run_pipeline(model, 3, batch, 2)
    with pytest.raises(ValueError, match="needs 4"):
        run_pipeline(model, 2, batch, 2, schedule="interleaved")
    with pytest.raises(ValueError, match="multiple of n_stages"):
        run_pipeline(ModelStages("mlp", n_stages=4), 2, batch, 3, schedule="interleaved")
    with pytest.raises(TypeError, match="pair"):
        split_batch(batch[0], 2)
    with pytest.raises(ValueError, match="out of range"):
        ModelStages("mlp", cuts=[0, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        ModelStages("mlp", cuts=[5, 3])
    with pytest.raises(ValueError, match="only 13 layers"):
        ModelStages("mlp", n_stages=20)
    with pytest.raises(ValueError, match="seconds per row"):
        SleepStage(-1.0, 0.0)
    # world size not equal to the number of stages, on real ranks
    with pytest.raises(labkit.RankError, match="launch with world_size=3"):
        labkit.launch(pipeline_rank, world_size=2, kwargs=dict(make_stage=model, batch=batch, n_micro=2, n_stages=3),
                      pool=True, echo=False)


@pytest.mark.timeout(120)
def test_bench_rows_and_arguments():
    from labkit.pipeline.bench import bench_simulated
    from labkit.pipeline.bench import main as bench_main

    rows = bench_simulated(ps=(2,), ms=(2,), forward_s=0.002, backward_s=0.004, repeats=1)
    assert len(rows) == 1 and rows[0]["theory pm/(m+p-1)"] == pytest.approx(4 / 3)
    assert rows[0]["ratio"] == pytest.approx(rows[0]["speed-up"] / rows[0]["theory pm/(m+p-1)"])
    with pytest.raises(SystemExit):
        bench_main(["--repeats", "0"])


@pytest.mark.timeout(120)
def test_bench_zero_bubble_rows_put_zb_h1_beside_1f1b():
    from labkit.pipeline import zb_h1_bubble
    from labkit.pipeline.bench import bench_zero_bubble
    from labkit.pipeline.bench import main as bench_main

    rows = bench_zero_bubble(ps=(2,), ms=(2,), forward_s=0.001, backward_s=0.002, weight_s=0.001, repeats=1)
    assert [(r["schedule"], r["p"], r["m"], r["peak held"]) for r in rows] == [("1f1b", 2, 2, 2), ("zb-h1", 2, 2, 2),
                                                                              ("zb-v", 2, 2, 4)]
    assert rows[2]["formula"] == ""   # no closed form for the greedy V: the simulator only
    assert rows[0]["formula"] == pytest.approx(bubble_fraction(2, 2)) and rows[0]["W ms"] == 0
    zb = rows[1]
    f, b, w = (zb[k] / 1e3 for k in ("F ms", "B ms", "W ms"))
    assert zb["formula"] == pytest.approx(zb_h1_bubble(2, 2, f, b + w, w, strict=False))
    assert all(0 <= r["bubble"] < 1 and 0 <= r["simulated"] < 1 for r in rows)
    with pytest.raises(SystemExit):
        bench_main(["--zb-only", "--repeats", "0"])


@pytest.mark.timeout(120)
def test_bench_real_pairs_naive_and_pipelined_runs():
    from labkit.pipeline.bench import bench_real, mlp_case

    rows = bench_real(*mlp_case(width=16, layers=2, rows=8), ms=(2, 4), repeats=2, label="tiny")
    assert [r["setup"] for r in rows] == ["1 process", "2 stages, naive", "2 stages, 1f1b", "2 stages, 1f1b"]
    assert [r["split size"] for r in rows[2:]] == [4, 2]
    assert all(r["ms"] > 0 and r["vs naive"] > 0 for r in rows)


# ----------------------------------------------------------------------------- zero bubble (issue 27, item 7)
@pytest.mark.timeout(300)
def test_zb_h1_gives_single_process_gradients_in_float64():
    """B (input gradient) and W (weight gradients) apart, on 2, 3 and 4 ranks: the gradients of one process."""
    import functools

    from labkit.models import mlp
    from labkit.pipeline.stages import MLP_WIDTHS

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(12, 32, generator=g, dtype=torch.float64),
             torch.randn(12, 10, generator=g, dtype=torch.float64))
    for p, ms in ((2, (1, 3, 5)), (3, (2, 3, 7)), (4, (4, 6))):  # m < p, m = p, m > p; uneven micro-batches
        model = ModelStages(functools.partial(mlp, MLP_WIDTHS, dtype=torch.float64), n_stages=p)
        ref = reference_step(model, p, batch)
        for m in ms:
            run = run_pipeline(model, p, batch, m, schedule="zb-h1")
            assert max_grad_error(run.grads, ref["grads"]) < 1e-12, (p, m)
            assert run.loss == pytest.approx(ref["loss"], rel=1e-12, abs=1e-15), (p, m)
            assert run.peak_live == [min(p, m)] * p  # held until W: 1F1B's peak on every rank
            for rank in range(p):
                kinds = [e["kind"] for e in run.events if e["lane"] == rank]
                assert kinds.count("forward") == kinds.count("backward") == kinds.count("weight") == m
    # a wrong weight gradient is caught in float64 too
    wrong = [dict(x) for x in ref["grads"]]
    k = next(iter(wrong[-1]))
    wrong[-1][k] = wrong[-1][k] + 1e-9
    assert max_grad_error(wrong, ref["grads"]) > 1e-10


@pytest.mark.timeout(180)
def test_zb_h1_sleeping_stages_timeline_and_resnet():
    p, m = 2, 4
    sleepy = SleepStages(0.002, 0.004, n_stages=p, weight_s=0.002)
    batch = _batch(4, d_in=4, d_out=4)
    ref = reference_step(sleepy, p, batch)
    run = run_pipeline(sleepy, p, batch, m, schedule="zb-h1")
    assert max_grad_error(run.grads, ref["grads"]) < 1e-6 and abs(float(ref["grads"][0]["gain"])) > 0
    ev = {(e["lane"], e["kind"], e["label"]): e for e in run.events if e["kind"] in ("forward", "backward", "weight")}
    for i in range(m):  # causality: B_i on rank 0 after rank 1's B_i; W_i after B_i on its own rank
        assert ev[(0, "backward", f"B{i}")]["start"] >= ev[(1, "backward", f"B{i}")]["end"]
        for r in range(p):
            assert ev[(r, "weight", f"W{i}")]["start"] >= ev[(r, "backward", f"B{i}")]["end"]
    # the last stage's W sleeps the gain's part of the backward (2 ms per row, 1 row), its B the rest
    assert ev[(1, "weight", "W0")]["end"] - ev[(1, "weight", "W0")]["start"] >= 0.002 * 0.98
    assert ev[(1, "backward", "B0")]["end"] - ev[(1, "backward", "B0")]["start"] >= 0.002 * 0.98
    assert run.bubble_theory == pytest.approx(1 / 13)  # (p-1)/(3m+p-1): F = B = W
    # BatchNorm (statistics per micro-batch) and in-place ReLUs after the modules whose outputs W starts from
    g = torch.Generator().manual_seed(1)
    images = (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
    model = ModelStages("small", cuts=[5])
    run = run_pipeline(model, 2, images, 2, schedule="zb-h1")
    assert max_grad_error(run.grads, reference_step(model, 2, images, n_micro=2)["grads"]) < 1e-4


def test_zb_split_refuses_tied_weights_and_modules_run_twice():
    from torch import nn

    from labkit.pipeline.executor import _outputs_of, _owners

    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(ValueError, match="tied"):
        _owners(nn.Sequential(a, b))
    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="ran twice"), _outputs_of([lin]):
        lin(lin(torch.randn(2, 3)))
    with _outputs_of(_owners(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))) as outs:
        nn.Sequential(nn.Linear(3, 3))(torch.randn(2, 3))  # not the hooked modules: nothing collected
    assert outs == []
    with pytest.raises(ValueError, match="weight_s <= backward_s"):
        SleepStage(0.0, 0.001, weight_s=0.002)


# ----------------------------------------------------------------------------- exercise checks
def _stub(*args):
    raise NotImplementedError


def _my_1f1b(stage, p, m):
    warm = min(p - stage - 1, m)
    order = [f"F{i}" for i in range(warm)]
    for k in range(m - warm):
        order += [f"F{warm + k}", f"B{k}"]
    return order + [f"B{i}" for i in range(m - warm, m)]


def test_1f1b_order_check_correct_stub_and_wrong_answers():
    from labkit.pipeline import schedules as S
    from labkit.pipeline.lab import check_1f1b_order

    assert check_1f1b_order(_my_1f1b).passed
    assert not check_1f1b_order(_stub).attempted

    res = check_1f1b_order(S.one_f_one_b_stage)  # shortcut: the library's own order
    assert not res.passed and "one_f_one_b_stage" in res.summary() and "yourself" in res.summary()
    res = check_1f1b_order(lambda s, p, m: [str(a) for a in S.one_f_one_b(p, m)[s]])
    assert not res.passed and "one_f_one_b" in res.summary()
    res = check_1f1b_order(lambda s, p, m: [str(a) for a in S.zb_h1_stage(s, p, m) if a.kind != "W"])
    assert not res.passed and "zb_h1_stage" in res.summary()  # ZB-H1 without its W's is 1F1B: refused too

    fixed = [(0, 4, 8), (3, 4, 8), (1, 4, 8), (0, 2, 1), (0, 4, 2), (2, 3, 5)]
    table = {c: _my_1f1b(*c) for c in fixed}  # hard-codes the fixed cases, GPipe order elsewhere
    res = check_1f1b_order(lambda s, p, m: table.get((s, p, m),
                                                     [f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)]))
    assert not res.passed and res.failed_cases and all("drawn now" in c.name for c in res.failed_cases)

    gpipe_order = lambda s, p, m: [f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)]
    res = check_1f1b_order(gpipe_order)
    assert not res.passed and "warm-up" in res.summary()
    res = check_1f1b_order(lambda s, p, m: _my_1f1b(s, p, m)[:-1])  # drops the last backward
    assert not res.passed and "once each" in res.summary()


def test_bubble_check_correct_stub_and_wrong_answers():
    from labkit.pipeline import schedules as S
    from labkit.pipeline.lab import check_bubble_prediction

    assert check_bubble_prediction(lambda p, m: (p - 1) / (m + p - 1)).passed
    assert not check_bubble_prediction(_stub).attempted
    res = check_bubble_prediction(S.bubble_fraction)  # shortcut: the library's formula
    assert not res.passed and "bubble_fraction" in res.summary() and "hint:" in res.summary()
    res = check_bubble_prediction(lambda p, m: S.simulate(S.gpipe(p, m))["bubble"])
    assert not res.passed and "simulate" in res.summary()
    res = check_bubble_prediction(lambda p, m: S.zb_h1_bubble(p, m, 1.0, 1.0, 0.0, strict=False))  # W = 0
    assert not res.passed and "zb_h1_bubble" in res.summary()
    table = {(2, 4): 1 / 5, (4, 8): 3 / 11, (4, 1): 3 / 4, (8, 32): 7 / 39, (1, 5): 0.0}
    res = check_bubble_prediction(lambda p, m: table.get((p, m), 0.5))  # hard-codes the fixed cases
    assert not res.passed and all("drawn now" in c.name for c in res.failed_cases) and res.failed_cases
    res = check_bubble_prediction(lambda p, m: (p - 1) / m)  # relative to ideal, not of the total
    assert not res.passed and "bubble for p=" in res.summary()
    assert "(p - 1)" not in res.hint  # the hint does not print the formula


# ----------------------------------------------------------------------------- issue 30: renamed, same numbers
def test_model_stages_mlp_is_the_old_mlp_weight_for_weight():
    """``ModelStages("mlp")`` builds labkit.models.mlp(MLP_WIDTHS): the same layers, drawn in the same order from
    the same seeded generator, as the pipeline's own mlp() it replaces."""
    from torch import nn

    from labkit.pipeline.stages import MLP_WIDTHS

    torch.manual_seed(3)
    layers = []
    for a, b in zip(MLP_WIDTHS, MLP_WIDTHS[1:]):  # the old pipeline.mlp(), as it was written
        layers += [nn.Linear(a, b), nn.ReLU()]
    old = nn.Sequential(*layers[:-1])
    new = ModelStages("mlp", n_stages=1, seed=3).full()
    assert [type(m) for m in new] == [type(m) for m in old] and len(new) == 13
    for (n1, p1), (n2, p2) in zip(old.named_parameters(), new.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_old_names_still_work_and_warn():
    import labkit.pipeline as P
    import labkit.pipeline.lab as L
    from labkit.models import mlp

    with pytest.warns(DeprecationWarning, match="labkit.pipeline.stages.ModelStages"):
        assert P.SplitModel is ModelStages
    with pytest.warns(DeprecationWarning, match="labkit.models.mlp"):
        assert P.mlp is mlp
    for name in ("pipeline_rank", "torch_pipelining_rank"):
        with pytest.warns(DeprecationWarning, match=rf"labkit.pipeline.lab.{name}"):
            assert getattr(P, name) is getattr(L, name)
        assert name not in P.__all__
    make, batch = ModelStages("mlp", n_stages=2), _batch(4)
    with pytest.warns(DeprecationWarning, match=r"n_pieces=\) is now n_stages="):
        old = reference_step(make, n_pieces=2, batch=batch)
    assert max_grad_error(old["grads"], reference_step(make, n_stages=2, batch=batch)["grads"]) == 0
    with pytest.warns(DeprecationWarning, match="n_stages"):
        assert P.time_in_process(make, n_pieces=2, batch=batch, repeats=1, warmup=0) > 0


def test_stage_times_times_each_stage_alone_and_predicts_the_schedule():
    from labkit.pipeline import make_schedule, simulate, stage_times

    stages = SleepStages([0.004, 0.008], [0.008, 0.016])   # per row; unequal, so a mixed-up order is caught
    batch = _batch(4, d_in=4, d_out=4)
    t = stage_times(stages, 2, batch, n_micro=2, repeats=2)
    assert t["rows"] == 2 and len(t["forward"]) == len(t["backward"]) == 2
    for got, want in zip(t["forward"] + t["backward"], (0.008, 0.016, 0.016, 0.032)):  # 2 rows each
        assert want * 0.98 <= got < want + 0.25, (t, want)   # a sleep is never shorter; generous under load
    assert t["forward"][1] > t["forward"][0] and t["backward"][1] > t["backward"][0]
    sim = simulate(make_schedule("1f1b", 2, 2), t["forward"], t["backward"])
    assert sim["makespan"] >= 0.98 * (0.008 + 2 * (0.016 + 0.032) + 0.016)   # F0 on stage 0, both micro-batches
    # through stage 1, B1 on stage 0: the slower stage sets the pace
    full = stage_times(stages, 2, batch, n_micro=1, repeats=1, warmup=0)
    assert full["rows"] == 4 and full["forward"][0] >= 0.98 * 0.016
    # a real model: every stage timed, the backward of stage 0 fed by stage 1's input gradient
    real = stage_times(ModelStages("mlp", n_stages=2), 2, _batch(8), n_micro=2, repeats=1)
    assert all(x > 0 for x in real["forward"] + real["backward"]) and real["rows"] == 4


def test_stage_times_refuses_bad_input():
    from labkit.pipeline import stage_times

    stages, batch = SleepStages(0.0, 0.0, n_stages=2), _batch(4)
    with pytest.raises(ValueError, match="n_stages"):
        stage_times(stages, 0, batch)
    with pytest.raises(ValueError, match="repeats"):
        stage_times(stages, 2, batch, repeats=0)
    with pytest.raises(TypeError, match="make_stage"):
        stage_times(42, 2, batch)
    with pytest.raises(ValueError, match="n_micro"):
        stage_times(stages, 2, batch, n_micro=5)   # 4 rows cannot make 5 micro-batches


@pytest.mark.timeout(300)
def test_zb_v_gives_single_process_gradients_in_float64():
    """ZB-V on real ranks: 2p stages, rank r holding r and 2p-1-r, the last rank handing its own stage p-1's output to
    stage p without a message; B and W apart; the gradients and loss of one process on 2, 3 and 4 ranks."""
    import functools

    from labkit.models import mlp
    from labkit.pipeline import peak_in_flight, zb_v

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(12, 32, generator=g, dtype=torch.float64),
             torch.randn(12, 10, generator=g, dtype=torch.float64))
    widths = [32, 24, 24, 24, 24, 24, 24, 24, 10]   # 8 linear layers: up to 8 stages
    for p, ms in ((2, (1, 4)), (3, (5,)), (4, (4,))):
        model = ModelStages(functools.partial(mlp, widths, dtype=torch.float64), n_stages=2 * p)
        ref = reference_step(model, 2 * p, batch)
        for m in ms:
            run = run_pipeline(model, p, batch, m, schedule="zb-v")
            assert run.chunks == 2 and len(run.grads) == 2 * p
            assert max_grad_error(run.grads, ref["grads"]) < 1e-12, (p, m)
            assert run.loss == pytest.approx(ref["loss"], rel=1e-12, abs=1e-15), (p, m)
            assert run.peak_live == peak_in_flight(zb_v(p, m))   # what the schedule holds, measured
            for rank in range(p):
                kinds = [e["kind"] for e in run.events if e["lane"] == rank]
                assert kinds.count("forward") == kinds.count("backward") == kinds.count("weight") == 2 * m
            # the last rank's turn is no message: it never waits to receive from itself
            labels = [e["label"] for e in run.events if e["lane"] == p - 1 and e["kind"] == "wait"]
            assert not any(lbl.startswith("rF") and lbl.endswith(".1") for lbl in labels), labels
