"""Lab 10's measured memory per rank (labkit.zero.measure) and ``python -m labkit bench zero``: shapes and bytes,
never timings. One launch of ``memory_rank`` at N = 2 on the lab's small MLP serves the memory tests."""
from __future__ import annotations

import math

import pytest

import labkit
from labkit._validate import ArgumentError
from labkit.zero import bench
from labkit.zero.lab import memory_rank
from labkit.zero.measure import MEASURED_METHODS, mlp, validate_args

WIDTHS = (6, 11, 7, 3)  # the lab's MLP: P = 185, odd, so ZeRO's flat buffer is padded at N = 2
P, N = 185, 2
_CACHE: dict = {}


def _memory() -> list[dict]:
    if "res" not in _CACHE:
        _CACHE["res"] = labkit.launch(memory_rank, world_size=N, kwargs=dict(widths=WIDTHS, steps=2),
                                      pool=True, echo=False, quiet=True, timeout=240)
    return _CACHE["res"]


def test_zero1_adam_state_is_exactly_ceil_p_over_n_times_8_per_rank():
    for r in _memory():
        assert r["P"] == P and r["world"] == N
        row = r["rows"]["zero1"]
        assert row["optimizer"] == math.ceil(P / N) * 8  # Adam in fp32: 2 buffers x 4 bytes, on the padded shard
        assert row["state_numel"] == 2 * math.ceil(P / N)
        assert r["rows"]["ddp"]["optimizer"] == P * 8     # plain data parallelism: everything on every rank


def test_bytes_held_follow_the_stage():
    for r in _memory():
        rows = r["rows"]
        totals = [rows[m]["total"] for m in ("ddp", "zero1", "zero2", "zero3")]
        assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1], totals
        # what each stage shards: optimiser state from stage 1, gradients from 2, parameters at 3
        assert rows["zero1"]["optimizer"] < rows["ddp"]["optimizer"]
        assert rows["zero2"]["grads"] < rows["zero1"]["grads"]
        assert rows["zero3"]["params"] < rows["zero2"]["params"]
        assert rows["fsdp2"]["params"] < rows["ddp"]["params"]
        # ZeRO-3 matches the paper's 16P/N up to the padding of its 3 units (at most N - 1 values each)
        pad = 3 * (N - 1) * 16
        assert rows["zero3"]["formula_total"] == 16 * P / N
        assert rows["zero3"]["formula_total"] <= rows["zero3"]["total"] <= rows["zero3"]["formula_total"] + pad
        assert rows["ddp"]["formula_total"] == 16 * P


def test_peak_is_measured_and_at_least_what_is_held():
    for r in _memory():
        for m in MEASURED_METHODS:
            row = r["rows"][m]
            assert row["peak"] is not None, row["peak_note"]
            assert row["peak"] >= row["total"], (m, row)


def test_peak_says_what_it_is_made_of():
    """The peak's breakdown adds up to the peak, and names the phase and the live storages (CPU, MemTracker)."""
    from labkit.zero.measure import PEAK_KINDS

    for r in _memory():
        for m in MEASURED_METHODS:
            row = r["rows"][m]
            assert row["peak_phase"] in ("forward", "backward", "optimiser step"), (m, row["peak_phase"])
            assert sum(row["peak_kinds"].values()) == row["peak"], (m, row["peak_kinds"], row["peak"])
            assert set(row["peak_kinds"]) <= set(PEAK_KINDS.values())
            sizes = [b for _, b in row["peak_live"]]
            assert sum(sizes) == row["peak"] and sizes == sorted(sizes, reverse=True), m
        # ZeRO-3 peaks in a backward, re-gathering a unit: the largest unit's full flat bytes are live then
        z3 = r["rows"]["zero3"]
        biggest = max((a + 1) * b for a, b in zip(WIDTHS, WIDTHS[1:]))
        unit_bytes = math.ceil(biggest / N) * N * 4
        assert z3["peak_phase"] == "backward" and (("backward temporaries", unit_bytes) in z3["peak_live"]), z3


def test_bench_main_prints_the_tables_with_the_ddp_column(capsys):
    assert bench.main(["--quick", "--world-sizes", "2", "--widths", "6,11,7,3", "--rounds", "1", "--pool"]) == 0
    out = capsys.readouterr().out
    assert "time / DDP" in out and "sent / Ψ" in out and "torch ZeRO state" in out and "peak / DDP" in out
    timing = out.split("== torch's")[0]
    rows = {ln[1]: ln for ln in map(str.split, timing.splitlines())
            if len(ln) > 3 and ln[0] == "2" and ln[1] in MEASURED_METHODS}
    assert set(rows) == set(MEASURED_METHODS)
    assert rows["ddp"][3] == "1"  # DDP against itself
    # the prefetch table: all three variants, each with its own row
    prefetch = out.split("== ZeRO-3's all-gathers")[1]
    assert all(v in prefetch for v in ("zero3 no prefetch", "fsdp2", "hidden", "exposed ms"))


def test_prefetch_overlap_is_measured_from_the_timeline():
    """Without prefetch every gather is waited for from the moment it is issued (nothing hidden, by construction);
    with it the timeline has gathers issued before the step waited for them. No timing is asserted."""
    import matplotlib

    matplotlib.use("Agg")
    from labkit.zero import plots
    from labkit.zero.overlap import VARIANTS, measure_overlap

    got = measure_overlap((2,), WIDTHS, rounds=2, pool=True)
    rows = {r["variant"]: r for r in got["rows"]}
    assert set(rows) == set(VARIANTS)
    assert rows["zero3 no prefetch"]["hidden"] == 0.0
    assert rows["zero3 no prefetch"]["exposed ms"] == pytest.approx(rows["zero3 no prefetch"]["gather ms"])
    for r in got["raw"][2]:
        on, off = r["timeline"]["zero3"], r["timeline"]["zero3 no prefetch"]
        assert any(e["issued"] < e["waited"] for e in on if e["kind"] == "gather")
        assert all(e["issued"] == e["waited"] for e in off if e["kind"] == "gather")
        ax = plots.gather_timeline(on)
        assert ax.exposed == pytest.approx(1e3 * sum(e["ready"] - e["waited"] for e in on if e["kind"] == "gather"))
        assert 0 <= ax.exposed <= ax.in_flight


def test_rows_from_results_without_processes():
    fake = {"P": 10, "world": 2, "esize": 4, "seconds": {"ddp": [0.2, 0.1, 0.1], "zero1": [0.3, 0.3, 0.3]},
            "volume_per_step": {"ddp": 80.0, "zero1": 80.0}, "psi": {"ddp": 10, "zero1": 10},
            "state_bytes": {"ddp": 80, "zero1": 40}, "memory": {}}
    rows = bench.timing_rows([fake, fake], "adam")
    assert [r["time / DDP"] for r in rows] == pytest.approx([1.0, 3.0])
    assert [r["sent / Ψ"] for r in rows] == [2.0, 2.0]
    assert all(r["every rank = formula"] for r in rows)
    assert bench.memory_rows([fake]) == [] and bench.uneven_rows([fake], "adam") == []


def test_bad_arguments_say_what_to_pass():
    with pytest.raises(ArgumentError, match="zero4"):
        validate_args(("zero4",), WIDTHS, "float32", "adam", 2, 4, 2)
    with pytest.raises(ArgumentError, match="global_batch=5.*multiple of 2"):
        validate_args(("ddp",), WIDTHS, "float32", "adam", 2, 5, 2)
    with pytest.raises(ArgumentError, match=r"widths.*\(256, 1024, 1024, 10\)"):
        mlp((7,))
    with pytest.raises(SystemExit):
        bench.main(["--world-sizes", "two"])
