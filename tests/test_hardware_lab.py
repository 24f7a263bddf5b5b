"""Lab 09's exercise checks (they pass the answers, fail the shortcuts), its widget's bars, its tour, and the
bf16 experiment on one CPU held to older instruction sets."""
import platform

import pytest

from labkit.hardware import Setup, TransformerShape, bf16_by_isa, cpu_info, estimate, lab, predict_bf16
from labkit.hardware.cpu import CpuInfo
from labkit.memory_model import transformer_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # measured as the notebook measures: one thread


def predict_states(model, precision, optimizer):  # the notebook's answer
    n = sum(p.numel() for p in model.parameters())
    value = 2 if precision == "bf16" else 4
    buffers = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}[optimizer]
    return {"params": n * value, "grads": n * value, "optimizer": buffers * n * value}


def pick_batch(model, sample_shape, budget_bytes):  # the notebook's answer
    b = 1
    while estimate(model, Setup(), (b + 1, *sample_shape[1:])).peak <= budget_bytes:
        b += 1
    return b


def stub(*args):
    raise NotImplementedError


def test_state_check_passes_the_answer_and_fails_the_shortcuts():
    assert lab.check_state_bytes(predict_states).passed
    assert not lab.check_state_bytes(stub).attempted
    fixed = lab.check_state_bytes(lambda *a: {"params": 100_000, "grads": 100_000, "optimizer": 200_000})
    assert fixed.attempted and not fixed.passed

    def with_library(model, precision, optimizer):
        from labkit.memory_model import bytes_per_parameter
        n, b = sum(p.numel() for p in model.parameters()), bytes_per_parameter(precision, optimizer)
        return {"params": n * b["weights"], "grads": n * b["grads"], "optimizer": n * b["optimizer"]}

    refused = lab.check_state_bytes(with_library)
    assert not refused.passed and all("bytes_per_parameter" in c.detail for c in refused.failed_cases)
    # a common slip: the optimiser state of Adam counted once instead of twice
    once = lab.check_state_bytes(lambda m, p, o: {**predict_states(m, p, o), "optimizer": predict_states(m, p, "sgd")[
        "params"] if o != "sgd" else 0})
    assert not once.passed and any("optimizer" in c.detail for c in once.failed_cases)
    # the library is usable again afterwards
    from labkit.memory_model import bytes_per_parameter
    assert bytes_per_parameter("fp32", "adam")["total"] == 16


def test_batch_check_passes_the_answer_and_fails_the_shortcuts():
    assert lab.check_pick_batch(pick_batch, seed=1).passed
    assert not lab.check_pick_batch(stub).attempted
    assert not lab.check_pick_batch(lambda *a: 8, seed=1).passed
    off_by_one = lab.check_pick_batch(lambda m, s, b: pick_batch(m, s, b) + 1, seed=2)
    assert not off_by_one.passed and "the largest batch that fits is" in off_by_one.failed_cases[0].detail
    from labkit.hardware import largest_batch
    refused = lab.check_pick_batch(lambda m, s, b: largest_batch(m, s, b), seed=3)
    assert not refused.passed and all("largest_batch" in c.detail for c in refused.failed_cases)


def test_batch_cases_have_one_right_answer_each():
    for name, model, shape, budget in lab.batch_cases(seed=4):
        b = pick_batch(model, shape, budget)
        assert 3 <= b < 40, name
        assert estimate(model, Setup(), (b, *shape[1:])).peak <= budget < estimate(model, Setup(),
                                                                                   (b + 1, *shape[1:])).peak


def test_transformer_bars_shrink_with_each_zero_stage():
    shape = TransformerShape(layers=32, width=4096, heads=32, vocab=32000, seq=4096, micro_batch=1)
    bars = lab.transformer_bars(shape, {f"ZeRO-{z}": Setup(precision="mixed-bf16", dp=8, zero=z) for z in range(4)})
    totals = [sum(b.values()) for b in bars.values()]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    z0, z3 = bars["ZeRO-0"], bars["ZeRO-3"]
    assert z3["params"] == pytest.approx(z0["params"] / 8, rel=1e-6) and z3["activations"] == z0["activations"]
    psi = transformer_params(32, 4096, 32000)  # 6.6e9 with the head tied to the embedding
    assert z0["params"] + z0["grads"] + z0["optimizer"] == pytest.approx(16 * psi, rel=1e-6)  # ZeRO's 16 bytes


def test_tour_rows_all_pass():
    rows = lab.tour()
    assert len(rows) == 5 and all(r["ok"] for r in rows), rows


# --------------------------------------------------------------------------- one CPU, several instruction sets
def test_a_capped_isa_changes_the_prediction():
    fast = CpuInfo("x", "AVX512", {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False,
                                   "amx_tile": False})
    assert predict_bf16(fast)[0] == "fast"
    for isa in ("AVX2", "AVX512_CORE"):
        capped = CpuInfo("x", "AVX512", dict(fast.flags), max_isa=isa)
        assert predict_bf16(capped)[0] == "slow" and not capped.usable()["avx512_bf16"]
    assert predict_bf16(CpuInfo("x", "AVX512", dict(fast.flags), max_isa="AVX512_CORE_BF16"))[0] == "fast"
    assert CpuInfo("x", "AVX512", dict(fast.flags), max_isa="AVX10_1_512_AMX").usable() == fast.flags


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ONEDNN_MAX_CPU_ISA is for x86 CPUs")
def test_bf16_by_isa_runs_each_cap_in_its_own_process():
    r = bf16_by_isa(isas=("AVX2",), batch=2, trials=1)
    here, capped = r.rows()
    assert here["predicted"] == predict_bf16(cpu_info())[0]
    if cpu_info().flags.get("avx2"):
        assert capped["predicted"] == "slow" and capped["torch kernels"] == "AVX2", capped
        assert capped["fp32 ms"] > 0 and capped["bf16 ms"] > 0
    with pytest.raises(Exception, match="unknown oneDNN ISA"):
        bf16_by_isa(isas=("AVX3",))


def test_memory_stack_labels_are_the_bar_heights_and_peaks_are_marked():
    # one quantity behind each number: the label on a bar is its height, the peak its own line and label
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.hardware import plots

    bars = {"a": {"params": 2e6, "grads": 2e6, "activations": 4.91e6}, "b": {"params": 3e6, "optimizer": 7.2e6}}
    ax = plots.memory_stack(bars, unit=1e6, unit_name="MB", peaks={"a": 8.78e6})
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["8.91\npeak 8.78", "10.2"]
    assert plots.stack_total(bars["a"]) == pytest.approx(8.91e6)
    tops = {}
    for p in ax.patches:  # the stacked segments: the top of each bar is its label
        x = round(p.get_x() + p.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), p.get_y() + p.get_height())
    assert tops == {0: pytest.approx(8.91), 1: pytest.approx(10.2)}
    assert "peak (alive at once)" in [t.get_text() for t in ax.get_legend().get_texts()]
    with pytest.raises(ValueError, match="peaks for \\['c'\\]"):
        plots.memory_stack(bars, peaks={"c": 1.0})
    ax = plots.speedups({"fp32": 1.0, "bf16": 0.5})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["faster than the baseline",
                                                                   "slower than the baseline"]
    plt.close("all")
