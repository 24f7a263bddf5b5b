"""Lab 09's speed measurements: interleaved timing, the bf16 prediction, the training-step options (checked for
correctness, never for speed) and the bench's output."""
import time

import pytest
import torch

from labkit import hardware as hw
from labkit._validate import ArgumentError
from labkit.hardware import cpu as hwcpu
from labkit.hardware import speed, step
from labkit.hardware.timing import Timing, time_interleaved
from labkit.viz import table_html


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def test_time_interleaved_runs_rounds_in_order():
    calls = []
    variants = {n: (lambda n=n: calls.append(n)) for n in "ABC"}
    t = time_interleaved(variants, trials=4, warmup=2)
    assert calls == list("ABC") * 6  # 2 warm-up rounds then 4 timed ones, never all A first
    assert t.order == list("ABC") * 4
    assert t.names == ["A", "B", "C"] and all(len(v) == 4 for v in t.seconds.values())


def test_ratios_are_taken_within_each_round():
    t = Timing(seconds={"base": [1.0, 10.0, 100.0], "x": [2.0, 20.0, 200.0], "y": [3.0, 10.0, 50.0]})
    assert t.round_ratios("x") == [2.0, 2.0, 2.0]
    assert t.ratio("x") == 2.0 and t.speedup("x") == 0.5
    # the median of per-round medians would give 20 / 10 = 2 for y; per-round ratios are 3, 1, 0.5
    assert t.ratio("y") == 1.0
    assert t.ratio("x", against="y") == pytest.approx(2.0)
    rows = t.rows()
    assert [r["variant"] for r in rows] == ["base", "x", "y"] and rows[0]["speed-up"] == 1.0


def test_sleeping_variant_three_times_longer_gives_ratio_above_1_5():
    t = time_interleaved({"fast": lambda: time.sleep(0.02), "slow": lambda: time.sleep(0.06)}, trials=3, warmup=0)
    assert t.ratio("slow") > 1.5 and t.speedup("slow") < 0.67
    assert min(t.seconds["fast"]) >= 0.019


def test_time_interleaved_bad_input():
    with pytest.raises(ArgumentError, match="variants must be a non-empty dict"):
        time_interleaved({})
    with pytest.raises(ArgumentError, match=r"variants\['a'\] must be a zero-argument callable"):
        time_interleaved({"a": 3})
    with pytest.raises(ArgumentError, match="trials must be an int >= 1"):
        time_interleaved({"a": lambda: None}, trials=0)
    with pytest.raises(ArgumentError, match="device must be one of"):
        time_interleaved({"a": lambda: None}, device="tpu")


# ---------------------------------------------------------------------------------------------
# cpu
# ---------------------------------------------------------------------------------------------
def _has_flag(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


@pytest.mark.skipif(not _has_flag("avx512_bf16"), reason="this CPU has no AVX512-BF16 (the course machine has)")
def test_cpu_info_on_this_machine_reports_avx512_bf16_and_predicts_fast():
    info = hwcpu.cpu_info()
    assert info.flags["avx512_bf16"] is True and info.flags["avx2"] is True
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert hwcpu.predict_bf16(info)[0] == "fast"
    assert "avx512_bf16" in info.summary()


def test_predict_bf16_on_fake_flags():
    none = {f: False for f in hwcpu.FLAGS}
    assert hwcpu.predict_bf16({**none, "avx2": True, "amx_bf16": True, "amx_tile": True})[0] == "fast"
    assert hwcpu.predict_bf16({**none, "avx2": True, "avx512f": True, "avx512_bf16": True})[0] == "fast"
    verdict, reason = hwcpu.predict_bf16({**none, "avx2": True})
    assert verdict == "slow" and "#86270" in reason and "#146508" in reason
    assert hwcpu.predict_bf16({**none, "avx2": True, "avx512f": True})[0] == "slow"
    assert hwcpu.predict_bf16(none)[0] == "unknown"
    assert hwcpu.predict_bf16({f: None for f in hwcpu.FLAGS})[0] == "unknown"
    with pytest.raises(ArgumentError, match="info must be a CpuInfo"):
        hwcpu.predict_bf16("avx2")


def test_cpu_info_reads_a_cpuinfo_file_and_falls_back_without_one(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Fake CPU 9000\nflags\t\t: fpu sse avx2 fma\n")
    info = hwcpu.cpu_info(str(f))
    assert info.model == "Fake CPU 9000" and info.flags["avx2"] and not info.flags["avx512_bf16"]
    assert hwcpu.predict_bf16(info)[0] == "slow"
    missing = hwcpu.cpu_info(str(tmp_path / "absent"))
    assert missing.source.startswith("torch") and missing.flags["avx512_bf16"] is None


def test_gpu_info_is_none_without_cuda():
    if torch.cuda.is_available():
        assert set(hwcpu.gpu_info()) >= {"name", "capability", "bf16", "tf32_matmul"}
    else:
        assert hwcpu.gpu_info() is None


# ---------------------------------------------------------------------------------------------
# the step and its options
# ---------------------------------------------------------------------------------------------
def test_step_trains_and_bf16_loss_is_close_to_fp32():
    torch.set_num_threads(1)
    fp32 = hw.make_step("small", 8)
    bf16 = hw.make_step("small", 8, precision="autocast-bf16")
    a, b = fp32(), bf16()
    assert a.dtype == torch.float32 and abs(float(b) - float(a)) <= step.LOSS_RTOL * float(a)
    for _ in range(4):
        fp32()
    assert fp32.losses[-1] < fp32.losses[0]  # a real step on a fixed batch lowers its loss


def test_mixed_precision_result_on_cpu():
    r = hw.mixed_precision(batch=4, trials=1)
    rows = {row["variant"]: row for row in r.rows()}
    assert rows["autocast-bf16"]["loss close"] is True
    assert rows["autocast-fp16"].get("median ms") is None and "GPU only" in rows["autocast-fp16"]["note"]
    assert rows["autocast-fp16"]["speed-up"] == "not on CPU" and "None" not in table_html(r.rows())
    assert r.extra["prediction"] in ("fast", "slow", "unknown") and "predicted" in r.verdict
    assert r.as_dict()["timing"]["seconds"].keys() == {"fp32", "autocast-bf16"}


def test_cuda_without_gpu_runs_cpu_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = hw.channels_last_speed(batch=2, trials=1, device="cuda")
    assert r.device == "cpu" and any("no CUDA GPU" in n for n in r.notes)
    assert {row["variant"] for row in r.rows()} == {"fp32", "fp32 + channels_last", "bf16", "bf16 + channels_last"}


def test_channels_last_step_uses_nhwc():
    s = hw.make_step("small", 2, channels_last=True)
    assert s.x.is_contiguous(memory_format=torch.channels_last)
    assert s.layers.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain = hw.make_step("small", 2)
    assert torch.allclose(s.forward_loss(), plain.forward_loss(), rtol=1e-4)


def test_checkpointed_gradients_equal_and_memory_is_smaller():
    plain = hw.make_step("small", 4)
    ref = plain.gradients()
    for k in (2, 3):
        ck = hw.make_step("small", 4, checkpoint=k)
        got = ck.gradients()
        assert got.keys() == ref.keys()
        for name in ref:
            assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-6), name
        assert ck.activation_bytes() < plain.activation_bytes()


def test_checkpointing_result_rows():
    r = hw.checkpointing(segments=(2,), batch=2, trials=1)
    rows = r.rows()
    assert [row["segments"] for row in rows] == [0, 2]  # the un-checkpointed baseline is always there
    assert all(row["grads equal"] for row in rows)
    assert rows[1]["kept MB"] < rows[0]["kept MB"] and rows[1]["backward peak MB"] >= rows[1]["kept MB"]
    assert r.extra["n_layers"] == 11 and "sqrt(n)" in r.verdict


def test_backward_peak_arithmetic():
    # kept 100; segments (input, saved): recomputing segment 1 holds inputs 10 + 20 and its 90 saved bytes
    assert speed._backward_peak(100, [(10, 50), (20, 90)]) == 120
    assert speed._backward_peak(100, []) == 100


def test_batch_sweep_activation_bytes_scale_with_batch():
    r = hw.batch_sweep(batches=(2, 4), trials=1)
    a, b = r.rows()
    assert b["activation MB"] == pytest.approx(2 * a["activation MB"], rel=0.01)
    assert a["images/s"] > 0 and b["images/s"] > 0


def test_input_pipeline_timeline_is_well_formed():
    r = hw.input_pipeline(workers=(0, 1), batches=3, batch=2, item_ms=1.0, trials=1)
    assert any("no-op" in n for n in r.notes)
    for name, timeline in r.extra["timelines"].items():
        assert [row["batch"] for row in timeline] == [0, 1, 2]
        for row in timeline:
            assert (row["load_start"] <= row["load_end"] <= row["copy_start"] <= row["copy_end"]
                    <= row["compute_start"] <= row["compute_end"]), (name, row)
    rows = {row["variant"]: row for row in r.rows()}
    assert rows["workers=0"]["load during step"] == 0.0  # loading in the main process cannot run during a step
    assert all(0.0 <= rows[n]["load during step"] <= 1.0 for n in ("workers=0", "workers=1"))
    assert rows["workers=0"]["loading hidden"] == 0.0  # the reference saves nothing against itself
    # "loading hidden" is the time saved: its sign follows the speed-up, whatever share ran during a step
    w1 = rows["workers=1"]
    assert (w1["loading hidden"] > 0) == (w1["speed-up"] > 1)
    assert "GPU only" in rows["cudnn.benchmark"]["note"] and rows["cudnn.benchmark"]["speed-up"] == "not on CPU"
    assert "None" not in table_html(r.rows())


def test_hidden_share_is_the_time_saved_over_the_loading_time():
    from labkit.hardware.loading import _hidden

    assert _hidden(2.0, 2.0 / 1.5, 1.0) == pytest.approx(0.5)  # 2 s -> 1.5 s: half the loading second saved
    assert _hidden(2.0, 2.0, 1.0) == pytest.approx(1.0)  # 2 s -> 1 s: the epoch took only the compute
    assert _hidden(2.0, 2.0 / 2.3, 1.0) == pytest.approx(-0.3)  # slower than loading in the loop
    assert _hidden(2.0, 1.0, 1.0) == 0.0 and _hidden(2.0, 1.5, 0.0) == 0.0


def test_decode_like_dataset_is_deterministic():
    d = hw.DecodeLikeDataset(3, side=8, passes=2)
    a, la, _, _ = d[1]
    b, lb, s, e = d[1]
    assert a.shape == (3, 8, 8) and torch.equal(a, b) and la == lb and e >= s


def test_bad_input_errors():
    with pytest.raises(ArgumentError, match="precision must be one of"):
        hw.make_step("small", 2, precision="fp8")
    with pytest.raises(ArgumentError, match="autocast-fp16.*CUDA GPU only"):
        hw.make_step("small", 2, precision="autocast-fp16")
    with pytest.raises(ArgumentError, match="batch must be an int >= 1"):
        hw.make_step("small", 0)
    with pytest.raises(ArgumentError, match="model must be one of"):
        hw.make_step("vgg", 2)
    with pytest.raises(ArgumentError, match="checkpoint must be at most the 11 layers"):
        hw.make_step("small", 2, checkpoint=12)
    with pytest.raises(ArgumentError, match="checkpoint must be 0 with compiled=True"):
        hw.make_step("small", 2, checkpoint=2, compiled=True)
    with pytest.raises(ArgumentError, match="optimizer must be one of"):
        hw.make_step("small", 2, optimizer="lbfgs")
    with pytest.raises(ArgumentError, match="device must be one of"):
        hw.mixed_precision(device="tpu")
    with pytest.raises(ArgumentError, match="batches must be a non-empty list"):
        hw.batch_sweep(batches=())
    with pytest.raises(ArgumentError, match="workers\\[\\] must be an int >= 0"):
        hw.input_pipeline(workers=(-1,))
    with pytest.raises(ArgumentError, match="pin_memory must be None"):
        hw.input_pipeline(pin_memory="yes")


# ---------------------------------------------------------------------------------------------
# slow: torch.compile and the bench
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compile_matches_eager_or_skips_with_a_reason():
    r = hw.compile_speed(trials=1)
    rows = {row["variant"]: row for row in r.rows()}
    if "eager" not in rows:  # no compiler, or inductor failed: a skipped row with its reason, not a crash
        assert rows["compiled"].get("median ms") is None and "skipped" in rows["compiled"]["note"]
        pytest.skip(rows["compiled"]["note"])
    assert rows["compiled"]["loss matches eager"] is True
    assert r.extra["max_rel_loss_diff"] < 1e-3 and rows["compiled"]["first call s"] > 0


@pytest.mark.slow
def test_bench_quick_prints_its_tables(capsys):
    from labkit.hardware.bench import main

    assert main(["--quick", "--trials", "1", "--only", "precision,checkpoint,input"]) == 0
    out = capsys.readouterr().out
    assert "CPU:" in out and "== mixed precision ==" in out and "== checkpointing ==" in out
    assert "== input pipeline ==" in out and out.count("published:") >= 3 and "measured:" in out
    with pytest.raises(SystemExit):
        main(["--only", "nonsense"])


def test_compile_without_a_compiler_is_a_skipped_row(monkeypatch):
    monkeypatch.setattr(speed, "_cxx", lambda: None)
    r = hw.compile_speed(trials=1)
    (row,) = r.rows()
    assert row["variant"] == "compiled" and "no C++ compiler" in row["note"] and "not measured" in r.verdict


def test_cuda_home_line_is_silenced_only_while_compiling_for_the_cpu(monkeypatch):
    # a CUDA toolkit on a machine without a GPU: torch logs "No CUDA runtime is found, using CUDA_HOME=..." when
    # inductor imports its C++ builder; the CPU compile silences that logger's warnings, nothing else, and restores it
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    before = log.level
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with speed._quiet_cuda_home("cpu") as quiet:
        assert quiet and not log.isEnabledFor(logging.WARNING) and log.isEnabledFor(logging.ERROR)
        assert logging.getLogger("torch._inductor").isEnabledFor(logging.WARNING)  # other loggers untouched
    assert log.level == before
    with speed._quiet_cuda_home("cuda:0") as quiet:
        assert not quiet and log.level == before
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: False)  # a CPU-only build never logs the line
    with speed._quiet_cuda_home("cpu") as quiet:
        assert not quiet
