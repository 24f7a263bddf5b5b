"""The GPU path's silent CPU branches and wrong labels (issue 25, finding 9), shown on the CPU.

No GPU is needed: the GPU count is monkeypatched where a decision depends on it, a launch's reported backend is
replaced where a label must come from the results, and the rank functions run under the device discipline
(``LABKIT_DEVICE_CHECK=1``, :mod:`labkit.runtime.placement`), which refuses what NCCL would refuse: a tensor made
on the CPU reaching a collective, or meeting one on ``ctx.device``."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import labkit
import labkit.runtime
from labkit.runtime import launcher

TINY = (8, 16, 4)  # a small MLP for lab 10's bench


def _one_gpu(monkeypatch, n=1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def _reporting(monkeypatch, backend: str):
    """``labkit.runtime.launch`` that runs for real and then reports ``backend`` as the one that ran."""
    real = labkit.runtime.launch

    def launch(*a, **kw):
        res = real(*a, **kw)
        res.backend = backend
        return res

    monkeypatch.setattr(labkit.runtime, "launch", launch)


# ---------------------------------------------------------------------------------------------- the doctor
def test_doctor_needs_nccl_wherever_auto_picks_it(monkeypatch):
    from labkit.runtime import doctor as D

    _one_gpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="Stand-in GPU", total_memory=80 * 2**30))
    asked = []

    def launch(fn, world_size, backend="auto", **kw):
        asked.append((backend, world_size))
        if backend == "nccl":
            raise launcher.LaunchError("NCCL error: unhandled system error (stand-in)")
        return launcher.Results([world_size * (world_size + 1) / 2] * world_size, backend=backend)

    monkeypatch.setattr(launcher, "launch", launch)
    report = D.doctor(echo=False)
    assert ("nccl", 1) in asked
    nccl = next(f for f in report.findings if f.what.startswith("nccl"))
    assert not nccl.ok and nccl.needed, nccl       # one GPU: a 1-rank launch is NCCL, so NCCL is needed
    assert not report.ok and "FAIL" in report.text() and "backend='gloo'" in nccl.fix
    assert report.info["backend='auto'"].startswith("1 rank(s) nccl, 2 rank(s) gloo, 4 rank(s) gloo")


def test_doctor_on_a_cpu_machine_does_not_ask_for_nccl(monkeypatch):
    from labkit.runtime import doctor as D

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launcher, "launch", lambda fn, ws, backend="auto", **kw:
                        launcher.Results([ws * (ws + 1) / 2] * ws, backend=backend))
    report = D.doctor(echo=False)
    assert not any(f.what.startswith("nccl") for f in report.findings)
    assert "gloo" in report.info["backend='auto'"] and "nccl" not in report.info["backend='auto'"]


# ---------------------------------------------------------------------------------------------- labels
def test_ddp_bench_backend_column_comes_from_the_results(monkeypatch):
    from labkit.ddp import bench

    _reporting(monkeypatch, "nccl")
    rows = bench.measure(world_sizes=(1,), steps=2, repeats=1, local_batch=8, width=4, algorithms=("naive", "torch"),
                         timeout=180)
    assert [r["backend"] for r in rows] == ["nccl", "nccl"]


def test_zero_bench_prints_the_backend_that_ran(monkeypatch, capsys):
    from labkit.zero import bench

    _reporting(monkeypatch, "nccl")
    assert bench.main(["--world-sizes", "1", "--widths", ",".join(map(str, TINY)), "--rounds", "1", "--batch", "4",
                       "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "ran on: 1 rank(s) on NCCL, one GPU per rank" in out and "gloo" not in out.split("ran on:")[0]
    assert bench.ran_on({2: "gloo", 4: "nccl"}) == ("ran on: 2 rank(s) on gloo, CPU processes with one thread "
                                                    "each; 4 rank(s) on NCCL, one GPU per rank")


def test_kmeans_bench_runs_the_distributed_part_for_cuda_and_says_where(monkeypatch):
    from labkit.kmeans import bench
    from labkit.kmeans.datasets import load

    _one_gpu(monkeypatch)  # one GPU: NCCL cannot hold 2 ranks, so auto gives gloo, and the one process follows
    data = {"name": "digits"}
    X = load(**data)
    init = X[:10].copy()
    row = bench.distributed("digits", data, X, 10, init, max_iter=5, tol=0.0, repeats=1, device="cuda")
    assert row["ran on"].startswith("2 gloo ranks, 1 process, on the CPU") and "only 1 GPU" in row["ran on"]
    assert row["numbers all-reduced / iter (measured)"] == row["k(d+1)"] == 10 * 65


# ---------------------------------------------------------------------------------------------- placement
@pytest.fixture()
def discipline(monkeypatch):
    """Ranks that refuse what a GPU would: a CPU-made tensor at a collective or beside a ctx.device tensor."""
    monkeypatch.setenv("LABKIT_DEVICE_CHECK", "1")


@pytest.mark.parametrize("world_size", [1, 2])
def test_ddp_bench_rank_builds_on_ctx_device(discipline, world_size):
    from labkit.ddp.bench import single_process_rank, throughput_rank

    res = labkit.launch(throughput_rank, world_size, kwargs=dict(steps=2, warmup=1, repeats=1, local_batch=8,
                                                                 width=4), echo=False, quiet=True, timeout=180)
    assert all(len(v) == 1 and v[0] > 0 for v in res[0]["seconds_per_step"].values())
    one = labkit.launch(single_process_rank, world_size, kwargs=dict(steps=2, warmup=1, repeats=1, local_batch=8,
                                                                     width=4), echo=False, quiet=True, timeout=180)
    assert len(one[0]) == 1


def test_zero_bench_rank_builds_on_ctx_device(discipline):
    from labkit.zero.bench import bench_rank

    res = labkit.launch(bench_rank, 2, kwargs=dict(methods=("ddp", "zero1"), widths=TINY, rounds=1, warmup=1,
                                                   global_batch=4, memory=False), echo=False, quiet=True,
                        timeout=180)
    assert set(res[0]["seconds"]) == {"ddp", "zero1"} and res[0]["seconds"] == res[1]["seconds"]  # all-reduced MAX


def test_kmeans_bench_rank_builds_on_ctx_device(discipline):
    from labkit.kmeans.bench import _dist_rank
    from labkit.kmeans.datasets import load

    init = load("digits")[:10].copy()
    res = labkit.launch(_dist_rank, 2, kwargs=dict(data={"name": "digits"}, k=10, init=init, max_iter=3, tol=0.0),
                        echo=False, quiet=True, timeout=180)
    assert res[0]["numbers"] == 10 * 65 and res[0]["inertia"] == pytest.approx(res[1]["inertia"])


# ---------------------------------------------------------------------------------------------- lab 05
def test_balance_profiles_where_its_pipeline_runs(monkeypatch):
    from labkit.balance import run as R

    _one_gpu(monkeypatch)  # one GPU, two stages: the pipeline's ranks are gloo on the CPU, so the profile is too
    cmp = R.compare_splits("small", 2, batch=8, n_micro=4, pipeline=False, repeats=1, stage_repeats=1)
    assert cmp.device == "cpu" and all(p.time_ms > 0 for p in cmp.profile)
    assert R._pipeline_device(None, 1) == (torch.device("cuda"), "auto")   # one stage: NCCL on the GPU
    assert R._pipeline_device("cpu", 1) == (torch.device("cpu"), "gloo")   # the CPU asked for: gloo ranks too
    assert R._pipeline_device("cuda", 2, pipeline=False) == (torch.device("cuda"), "auto")
    with pytest.raises(ValueError, match="runs its ranks on the CPU here"):
        R._pipeline_device("cuda", 2)


# ---------------------------------------------------------------------------------------------- lab 10's memory
def test_zero_peak_on_a_gpu_reads_the_cuda_allocator(monkeypatch):
    from labkit.zero import measure as M

    run = M.Method("single", M.mlp(TINY), "adam")
    x, y = torch.randn(4, TINY[0]), torch.randint(0, TINY[-1], (4,))
    run.step(x, y)  # Adam's state exists
    level = {"now": 10_000, "peak": 10_000}

    def step(xx, yy):  # the allocator sees 6,000 bytes more at the step's worst moment
        level["peak"] = level["now"] + 6_000
        return torch.tensor(0.0)

    monkeypatch.setattr(run, "step", step)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: level["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: level["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev=None: level.update(peak=level["now"]))
    run.opt.zero_grad(set_to_none=True)   # a step starts without gradients
    start = run.held()["total"] + M.storage_bytes([x, y])
    assert M._cuda_peak(run, x, y) == start + 6_000      # what the method held, plus the step's high-water mark

    monkeypatch.setattr(M, "_cuda_peak", lambda r, a, b: 123)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert M.peak_bytes(run, on_gpu, y) == (123, "CUDA allocator")       # not MemTracker on a GPU


# ---------------------------------------------------------------------------------------------- lab 09's bench
def test_hardware_bench_guards_each_experiment_and_sizes_them(monkeypatch, capsys):
    from labkit.hardware import bench, speed
    from labkit.hardware.step import Result

    seen = {}

    def ok(name):
        def fn(**kw):
            seen[name] = kw
            return Result(name, [{"variant": "x", "median ms": 1.0}], f"{name} measured", "cpu")
        return fn

    def oom(**kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")

    monkeypatch.setattr(speed, "channels_last_speed", oom)
    monkeypatch.setattr(speed, "batch_sweep", ok("batch"))
    monkeypatch.setattr(speed, "mixed_precision", ok("precision"))
    assert bench.main(["--only", "channels_last,batch,precision", "--model", "resnet18", "--batch", "64",
                       "--trials", "1"]) == 1
    out = capsys.readouterr().out
    assert "== channels_last: FAILED ==" in out and "OutOfMemoryError" in out
    assert "batch measured" in out and "precision measured" in out          # the next experiments still ran
    assert "experiments: 2 ran, 1 FAILED (channels_last)" in out
    assert seen["precision"]["model"] == "resnet18" and seen["precision"]["batch"] == 64
    assert seen["batch"]["batches"] == (16, 32, 64) and "batch" not in seen["batch"]
    assert bench._sized("memory", "resnet50", 256) == {}                    # fixed small models
    np.testing.assert_equal(bench.main(["--only", "batch", "--trials", "1"]), 0)
