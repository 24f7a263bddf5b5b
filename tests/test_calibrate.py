"""labkit.capstone.calibrate: the simulator's inputs for this machine's runs (arithmetic), and one tiny measured
comparison that asserts nothing about accuracy (a loaded machine must not fail it)."""
import math
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
    assert len(out["rows"]) == len(out["rows_collective_alpha"]) == 3
    for r in out["rows"] + out["rows_collective_alpha"]:
        for k in ("predicted s", "measured s", "ratio"):
            assert math.isfinite(r[k]) and r[k] > 0, r
    assert "ratio" in cal.format_rows(out["rows"])
