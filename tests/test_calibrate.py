"""labkit.capstone.calibrate: the simulator's inputs for this machine's runs (arithmetic), and one tiny measured
comparison that asserts nothing about accuracy (a loaded machine must not fail it)."""
import math
import re
from dataclasses import replace

import pytest
import torch

from labkit._validate import ArgumentError
from labkit.capstone import calibrate as cal
from labkit.capstone.simulator import kernel_seconds, predict


def test_cpu_hardware_from_given_measurements():
    hw = cal.cpu_hardware(flops=2e10, alpha=2e-4, beta=3e-10, copy_bytes_per_s=1e10, layer_overhead=5e-4)
    assert hw.peak_flops == {"fp64": 2e10}
    assert (hw.intra_alpha, hw.intra_beta, hw.inter_alpha, hw.inter_beta) == (2e-4, 3e-10, 2e-4, 3e-10)
    assert hw.gemm_efficiency == hw.attention_efficiency == hw.memory_efficiency == 1.0
    assert hw.layer_overhead == 5e-4 and hw.hbm_bytes_per_s == 1e10
    assert all(k in hw.sources for k in ("peak_flops", "intra_alpha", "intra_beta", "layer_overhead"))
    with pytest.raises(ArgumentError, match="flops"):
        cal.cpu_hardware(flops=0, alpha=1e-4, beta=1e-9, copy_bytes_per_s=1e10)


def test_for_world_size_shares_the_cores():
    hw = cal.cpu_hardware(flops=2e10, alpha=2e-4, beta=3e-10, copy_bytes_per_s=1e10, layer_overhead=1e-3)
    assert cal.for_world_size(hw, 2, cores=2) == hw  # one core each: unchanged
    four = cal.for_world_size(hw, 8, cores=2)  # a quarter of a core each
    assert four.peak_flops["fp64"] == pytest.approx(5e9)
    assert four.hbm_bytes_per_s == pytest.approx(2.5e9)
    assert four.layer_overhead == pytest.approx(4e-3)
    assert four.intra_alpha == hw.intra_alpha  # messages keep the ping-pong's alpha and beta


def test_grid_inputs_map_a_grid_to_a_layout():
    model, layout, world = cal.grid_inputs(2, 2, 2)
    assert world == 8 and (layout.dp, layout.pp, layout.tp) == (2, 2, 2)
    assert layout.schedule == "1f1b" and layout.dtype == "fp64"
    # batch 16 over dp=2 replicas, 4 micro-batches each (choose_n_micro): 2 rows a micro-batch
    assert (model.global_batch, model.micro_batch, model.seq) == (16, 2, 16)
    assert (model.layers, model.width, model.heads, model.vocab, model.ffn_width) == (8, 64, 8, 16, 256)
    model1, layout1, world1 = cal.grid_inputs(1, 1, 1)
    assert world1 == 1 and model1.micro_batch == 4


def test_layer_overhead_is_added_per_layer_pass():
    hw = cal.cpu_hardware(flops=2e10, alpha=2e-4, beta=3e-10, copy_bytes_per_s=1e10)
    model, layout, _ = cal.grid_inputs(1, 1, 1)
    base = kernel_seconds(model, hw, layout)
    more = kernel_seconds(model, replace(hw, layer_overhead=1e-3), layout)
    assert more["layer_forward"] - base["layer_forward"] == pytest.approx(1e-3)
    assert more["layer_backward"] - base["layer_backward"] == pytest.approx(2e-3)
    # fitting it back on a made-up measured step returns it: 3 passes × 8 layers × 4 micro-batches
    t0 = predict(model, hw, layout, 1).step_seconds
    assert cal.fit_layer_overhead(hw, t0 + 96 * 1e-3) == pytest.approx(1e-3)
    assert cal.fit_layer_overhead(hw, t0 / 2) == 0.0  # never negative


def test_pipeline_inputs_by_hand():
    case = cal.PipelineCase(n_stages=2, n_micro=4, width=100, layers=4, rows=40)
    x = cal.pipeline_inputs(case, flops=1e9, alpha=1e-4, beta=1e-9, layer_overhead=1e-5, cores=2)
    per_layer = 2 * 10 * 100 ** 2 / 1e9 + 1e-5  # 10 rows a micro-batch
    assert x["forward"] == pytest.approx([2 * per_layer] * 2)
    assert x["backward"] == pytest.approx([4 * per_layer] * 2)
    assert x["comm"] == pytest.approx(1e-4 + 10 * 100 * 4 * 1e-9)
    # four stages on two cores: half a core each
    y = cal.pipeline_inputs(cal.PipelineCase(4, 4, 100, 4, 40), 1e9, 1e-4, 1e-9, 1e-5, cores=2)
    assert y["forward"][0] == pytest.approx(2 * 10 * 100 ** 2 / 5e8 + 2e-5)
    with pytest.raises(ArgumentError, match="divide"):
        cal.pipeline_inputs(cal.PipelineCase(3, 4, 100, 4, 40), 1e9, 1e-4, 1e-9)


def test_collective_alpha_is_the_ring_model_inverted(monkeypatch):
    import labkit
    monkeypatch.setattr(labkit, "launch", lambda fn, world_size, kwargs: [1.2e-3] + [None] * (world_size - 1))
    got = cal.measure_collective_alpha((2, 4))
    assert got[2] == pytest.approx(1.2e-3 / 2) and got[4] == pytest.approx(1.2e-3 / 6)  # 2(n-1) steps


def test_grid_shapes_need_the_one_process_row():
    m = cal.Machine(flops=1e10, flops32=1e10, copy_bytes_per_s=1e10, alpha=1e-4, beta=1e-9, cores=2)
    with pytest.raises(ArgumentError, match="1, 1, 1"):
        cal.compare(m, grid_shapes=[(2, 1, 1)], pipeline_cases=())


def test_a_tiny_measured_comparison_gives_finite_positive_numbers():
    m = cal.Machine(flops=cal.measure_matmul_rate(repeats=5, inner_loops=5), flops32=cal.measure_matmul_rate(
        64, 64, 64, torch.float32, repeats=5, inner_loops=5), copy_bytes_per_s=cal.measure_copy_rate(1 << 20, 3),
        alpha=2e-4, beta=3e-10, cores=2, collective_alpha={2: 4e-4})
    out = cal.compare(m, grid_shapes=[(1, 1, 1), (2, 1, 1)], rounds=1, steps=1,
                      pipeline_cases=(cal.PipelineCase(2, 2, width=32, layers=2, rows=16),))
    # the grid's two rows, the pipeline's case and its one-stage fit run
    assert len(out["rows"]) == len(out["rows_collective_alpha"]) == 4
    assert [r["fit"] for r in out["rows"]] == [True, False, False, True]
    for r in out["rows"] + out["rows_collective_alpha"]:
        for k in ("predicted s", "measured s", "ratio"):
            assert math.isfinite(r[k]) and r[k] > 0, r
    assert "ratio" in cal.format_rows(out["rows"])


def test_pipeline_overhead_fitted_on_a_one_stage_run():
    case = cal.PipelineCase(1, 8, width=64, layers=4, rows=64)
    base = cal.predict_pipeline(case, 1e9, 0.0, 0.0)
    assert base == pytest.approx(3 * 4 * 8 * (2 * 8 * 64 ** 2 / 1e9))  # 8 micro-batches of 8 rows, no messages
    assert cal.fit_pipeline_overhead(case, 1e9, base + 3 * 4 * 8 * 2e-4) == pytest.approx(2e-4)
    assert cal.fit_pipeline_overhead(case, 1e9, base / 2) == 0.0
    with pytest.raises(ArgumentError, match="one-stage"):
        cal.fit_pipeline_overhead(cal.PipelineCase(2, 8), 1e9, 0.1)


FAKE = cal.Machine(flops=3e10, flops32=8e10, copy_bytes_per_s=1.5e10, alpha=3e-4, beta=7e-10, cores=2,
                   collective_alpha={2: 3e-4, 4: 1e-3, 8: 2.5e-3})


def fake_measurements(monkeypatch, grid_overhead=1.5e-3, pipe_overhead=4e-4, slow=(2, 2, 2)):
    """Measured times made by the simulator itself at known overheads (ping-pong alpha), ``slow`` twice that."""
    true = cal.cpu_hardware(FAKE.flops, FAKE.alpha, FAKE.beta, FAKE.copy_bytes_per_s, layer_overhead=grid_overhead)
    monkeypatch.setattr(cal, "_measure_grid", lambda s, steps: cal.predict_grid(true, *s, cores=FAKE.cores)
                        * (2 if s == slow else 1))
    monkeypatch.setattr(cal, "_measure_pipeline", lambda c, steps: cal.predict_pipeline(
        c, FAKE.flops32, FAKE.alpha, FAKE.beta, pipe_overhead, FAKE.cores))


def test_compare_recovers_known_overheads_and_counts_the_rows(monkeypatch):
    fake_measurements(monkeypatch)
    lines = []
    out = cal.compare(FAKE, rounds=2, steps=1, log=lines.append)
    assert [re.sub(r"in \d+ s", "in T s", line) for line in lines] == [  # one progress line a round
        "round 1/2: 13 runs of 1 step(s) in T s", "round 2/2: 13 runs of 1 step(s) in T s"]
    assert out["hardware"].layer_overhead == pytest.approx(1.5e-3)
    assert out["pipeline_overhead"] == pytest.approx(4e-4)
    rows = {r["config"]: r for r in out["rows"]}
    assert rows["grid dp×pp×tp 1×1×1 (fit)"]["fit"] and rows["pipeline 1f1b p=1 m=8 (8×256) (fit)"]["fit"]
    assert rows["grid dp×pp×tp 2×2×2"]["ratio"] == pytest.approx(0.5)
    assert all(r["ratio"] == pytest.approx(1) for k, r in rows.items() if k != "grid dp×pp×tp 2×2×2")
    assert cal.count_within(out["rows"]) == (10, 11)  # 8 grids + 4 pipelines + 1 fit run, less the 2 fit rows
    text = cal.format_rows(out["rows"])
    assert "10 of 11 configurations within ±25%" in text
    assert "2×2×2" in text and text.count("  fit") == 2 and text.count("  no") == 1
    # the second table: the same measured times; a larger alpha where more ranks than cores share the machine
    coll = {r["config"]: r for r in out["rows_collective_alpha"]}
    assert all(coll[k]["measured s"] == rows[k]["measured s"] for k in rows)
    assert coll["grid dp×pp×tp 2×1×1"]["predicted s"] == pytest.approx(rows["grid dp×pp×tp 2×1×1"]["predicted s"])
    assert coll["grid dp×pp×tp 1×2×2"]["predicted s"] > rows["grid dp×pp×tp 1×2×2"]["predicted s"]
    described = cal.describe(out)
    assert "alpha from lab 01's ping-pong" in described and "alpha from a small all-reduce" in described
    assert "grid 1500 µs, pipeline 400 µs" in described


def test_compare_without_a_collective_alpha_prints_one_table(monkeypatch):
    fake_measurements(monkeypatch, slow=None)
    out = cal.compare(replace(FAKE, collective_alpha=None), rounds=1, steps=1)
    assert out["rows_collective_alpha"] == [] and cal.count_within(out["rows"]) == (11, 11)
    assert "all-reduce" not in cal.describe(out)
