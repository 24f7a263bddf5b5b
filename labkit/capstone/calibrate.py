"""The step-time simulator checked against the course's own runs on this machine (issue 28, item 3).

:func:`measure_machine` times a few things here and :func:`cpu_hardware` turns them into a
:class:`~labkit.capstone.simulator.Hardware` for "this CPU", each constant's source stated in its ``sources``:

- ``peak_flops``: a matrix product timed on one thread at the shape of the model's layers (TinyGPT's: T tokens ×
  width times width × 4·width, float64), so it is the rate those small products reach, not the core's peak;
  the efficiencies are then 1.0 (the rate already is the achieved one).
- ``intra_alpha``/``intra_beta`` (and ``inter_*``, the same: every rank is on this machine): lab 01's ping-pong
  over gloo (:func:`labkit.collectives.pingpong.pingpong_rank`, the function lab 01's bench runs) fitted by
  :func:`labkit.collectives.cost.fit_alpha_beta`.
- the copy rate (``hbm_bytes_per_s``: the memory-bound kernels) and, for the second table, a small all-reduce's
  alpha at 2, 4 and 8 ranks (below).

**What is fitted: only the two one-process rows.** TinyGPT's layers (and lab 04's Linear layers) are so small
that the fixed cost of each layer pass (Python, autograd, dispatch) outweighs its FLOPs, so ``layer_overhead`` is
fitted, once for each kind of run, on a run of one process: the grid's on ``run_grid(1, 1, 1)``
(:func:`fit_layer_overhead`), the pipeline's on a one-stage run of the same stack at the cases' largest
micro-batch count (:func:`fit_pipeline_overhead`; at m = 1 the step's fixed costs would be counted as per-pass
costs and multiplied by m in the runs predicted). Both rows are printed, marked "(fit)", and not counted among the
configurations within ±25%. Nothing else is fitted to a measured step: every other constant comes from the
micro-benchmarks above.

**Two alphas, two tables.** The ping-pong runs two ranks on two cores; a run of 4 or 8 ranks on 2 cores waits for
its peer to be scheduled at every message, which the ping-pong never sees. :func:`measure_collective_alpha`
times a small all-reduce at 2, 4 and 8 ranks and inverts the ring model (2(n-1) steps), and :func:`compare`
predicts every row twice from the same measured times: with the ping-pong's alpha (the issue's calibration) and
with the all-reduce's at the run's world size (the nearest measured). Neither is fitted to the rows compared.

**Shared cores.** The simulator assumes each rank owns its device; here ``world_size`` ranks share ``cores``
cores, so :func:`for_world_size` divides the rate, and multiplies the overhead, by ``max(1, world_size / cores)``:
each rank gets about cores / world_size of a core.

:func:`grid_inputs` maps a :func:`~labkit.capstone.grid.run_grid` configuration to the simulator's
``(Transformer, Layout, world_size)``; :func:`pipeline_inputs` maps a :func:`~labkit.pipeline.run_pipeline` run
of a Linear stack to the per-stage seconds and message of
:func:`~labkit.capstone.simulator.pipeline_makespan` (the simulator's pipeline part: an MLP is no transformer).
:func:`compare` measures the runs (interleaved over rounds, medians) and returns rows ``{config, predicted s,
measured s, ratio, within 25%, fit}``; :func:`format_rows` prints them side by side with the count within ±25%.
On a shared machine the measured times move with the load (the same run varies by 2x and more under a busy
neighbour), so the count is printed by the bench (``python -m labkit bench capstone --part measured``), never
asserted in a test. The machine's constants are measured once, before the rounds: a load that changes meanwhile
moves the predictions too (on the loaded 2-core machine the fp32 matmul rate read 82 and 16 GFLOP/s in two runs
minutes apart).

It is long because it holds the measurements, both mappings and the interleaved comparison together.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

import torch

from .._validate import ArgumentError, validate_int, validate_number
from ..collectives.cost import predict_time
from ..devices import now
from ..hardware.timing import time_interleaved
from .model import Config
from .simulator import Hardware, Layout, Transformer, pipeline_makespan, predict

__all__ = ["Machine", "measure_matmul_rate", "measure_copy_rate",
           "measure_alpha_beta", "allreduce_seconds_rank", "measure_collective_alpha", "measure_machine",
           "cpu_hardware", "for_world_size", "grid_inputs", "predict_grid", "fit_layer_overhead", "PipelineCase",
           "pipeline_inputs", "predict_pipeline", "fit_pipeline_overhead", "GRID_SHAPES", "PIPELINE_CASES",
           "compare", "count_within", "format_rows", "describe"]

GRID_SHAPES = ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2), (2, 1, 2), (2, 2, 2))
"""(dp, pp, tp) of the :func:`~labkit.capstone.grid.run_grid` runs compared (TinyGPT, float64, batch 16)."""


@dataclass(frozen=True)
class Machine:
    """What :func:`measure_machine` measured: ``flops`` (FLOP/s, one thread, float64 at the layer's shape),
    ``flops32`` (the same in float32 at the pipeline MLP's shape), ``copy_bytes_per_s``, the ping-pong's
    ``alpha`` (s) and ``beta`` (s/byte), ``cores``, ``rows`` (the ping-pong's timed rows) and optionally
    ``collective_alpha``: per world size, the alpha a small gloo all-reduce shows (compare's second table)."""

    flops: float
    flops32: float
    copy_bytes_per_s: float
    alpha: float
    beta: float
    cores: int
    rows: tuple = ()
    #: optional ``{world_size: alpha}`` from a small all-reduce on that many ranks (:func:`measure_collective_alpha`)
    collective_alpha: dict | None = None


def _median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up (lab 09's timer)."""
    return time_interleaved({"run": fn}, trials=repeats).median("run")


def _one_thread(fn):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def measure_matmul_rate(rows: int = 64, inner: int = 64, cols: int = 256, dtype=torch.float64,
                        repeats: int = 50, inner_loops: int = 20) -> float:
    """FLOP/s of ``rows × inner`` times ``inner × cols`` on one thread (median of ``repeats``, each
    ``inner_loops`` products): 2·rows·inner·cols FLOPs a product."""
    for name, v in (("rows", rows), ("inner", inner), ("cols", cols), ("repeats", repeats),
                    ("inner_loops", inner_loops)):
        validate_int(name, v, minimum=1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, inner, generator=g, dtype=dtype), torch.randn(inner, cols, generator=g, dtype=dtype)

    def run():
        for _ in range(inner_loops):
            a @ b
    return 2 * rows * inner * cols * inner_loops / _one_thread(lambda: _median_seconds(run, repeats))


def measure_copy_rate(nbytes: int = 1 << 24, repeats: int = 10) -> float:
    """Bytes/s a one-thread copy reads and writes (2 × ``nbytes`` a copy): the memory-bound kernels' rate."""
    x = torch.zeros(validate_int("nbytes", nbytes, minimum=8) // 8, dtype=torch.float64)
    y = torch.empty_like(x)
    return 2 * x.numel() * 8 / _one_thread(lambda: _median_seconds(lambda: y.copy_(x), repeats))


def measure_alpha_beta(sizes=(8, 1 << 12, 1 << 16, 1 << 18, 1 << 20), repeats: int = 15) -> tuple:
    """``(alpha, beta, rows)``: lab 01's ping-pong (:func:`~labkit.collectives.pingpong.pingpong_rank`) on two gloo
    ranks fitted by
    :func:`~labkit.collectives.cost.fit_alpha_beta`."""
    import labkit

    from ..collectives.cost import fit_alpha_beta
    from ..collectives.pingpong import pingpong_rank

    res = labkit.launch(pingpong_rank, world_size=2, kwargs=dict(sizes=tuple(sizes), repeats=repeats))
    rows = next(r for r in res if r)
    alpha, beta = fit_alpha_beta(rows)
    return alpha, beta, tuple(rows)


def allreduce_seconds_rank(ctx, nbytes: int = 4096, repeats: int = 40) -> float | None:
    """The median seconds of a small gloo all-reduce of ``nbytes`` over all ranks (after a barrier, the slowest
    rank's time); rank 0 returns it."""
    import torch.distributed as dist

    x = torch.zeros(max(1, nbytes // 8), dtype=torch.float64)
    times = []
    for i in range(repeats + 5):
        dist.barrier()
        t0 = now(ctx.device)
        dist.all_reduce(x)
        if i >= 5:
            times.append(now(ctx.device) - t0)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist()) if ctx.rank == 0 else None


def measure_collective_alpha(world_sizes=(2, 4, 8), nbytes: int = 4096, repeats: int = 40) -> dict:
    """``{world_size: alpha}``: the alpha that makes the ring all-reduce model (2(n-1) steps) give the measured
    time of a small all-reduce over ``world_size`` ranks sharing this machine's cores
    (:func:`allreduce_seconds_rank`); the bytes' share (β) is left out, a few KB at most."""
    import labkit

    out = {}
    for w in world_sizes:
        t = next(r for r in labkit.launch(allreduce_seconds_rank, world_size=w,
                                          kwargs=dict(nbytes=nbytes, repeats=repeats)) if r is not None)
        out[w] = t / (2 * (w - 1))
    return out


def measure_machine(cores: int | None = None, repeats: int = 15, log=None) -> Machine:
    """Measure this machine (see the module docstring); ``cores``: those the ranks share (default: all);
    ``repeats``: the ping-pong's; ``log``: called with a line after each measurement (progress)."""
    import os

    log = log or (lambda line: None)
    cfg = Config()
    tokens = 16 * cfg.seq // 4  # a micro-batch of the one-process run: 4 rows of seq tokens
    alpha, beta, rows = measure_alpha_beta(repeats=validate_int("repeats", repeats, minimum=1))
    log(f"ping-pong (2 ranks): alpha {alpha * 1e6:.0f} µs, beta {beta * 1e9:.3f} ns/B")
    flops, flops32 = measure_matmul_rate(tokens, cfg.width, 4 * cfg.width), measure_matmul_rate(64, 256, 256,
                                                                                                torch.float32)
    copy = measure_copy_rate()
    log(f"matmul {flops / 1e9:.2f} GFLOP/s (fp64, layer shape), {flops32 / 1e9:.2f} GFLOP/s (fp32, 64×256·256×256), "
        f"copy {copy / 1e9:.2f} GB/s (one thread)")
    coll = measure_collective_alpha()
    log("all-reduce alpha " + ", ".join(f"{w} ranks {a * 1e6:.0f} µs" for w, a in coll.items()))
    return Machine(flops=flops, flops32=flops32, copy_bytes_per_s=copy, alpha=alpha, beta=beta,
                   cores=cores or os.cpu_count() or 1, rows=rows, collective_alpha=coll)


def cpu_hardware(flops: float, alpha: float, beta: float, copy_bytes_per_s: float, layer_overhead: float = 0.0,
                 dtype: str = "fp64", memory_bytes: float = 2 ** 37) -> Hardware:
    """A :class:`~labkit.capstone.simulator.Hardware` for "this CPU" from given measurements (one rank's view,
    before :func:`for_world_size` shares the cores). ``gpus_per_node`` 64: every rank is on this machine, so
    every group is "inside a node" and uses the ping-pong's α, β."""
    for name, v in (("flops", flops), ("copy_bytes_per_s", copy_bytes_per_s)):
        validate_number(name, v, minimum=0, open_low=True)
    for name, v in (("alpha", alpha), ("beta", beta), ("layer_overhead", layer_overhead)):
        validate_number(name, v, minimum=0)
    return Hardware(
        name="this CPU", gpus_per_node=64, peak_flops={dtype: float(flops)}, memory_bytes=memory_bytes,
        hbm_bytes_per_s=float(copy_bytes_per_s), intra_alpha=alpha, intra_beta=beta, inter_alpha=alpha,
        inter_beta=beta, gemm_efficiency=1.0, attention_efficiency=1.0, memory_efficiency=1.0,
        layer_overhead=float(layer_overhead),
        sources={"peak_flops": "measured: one-thread matmul at the layer's shape (measure_matmul_rate)",
                 "hbm_bytes_per_s": "measured: one-thread copy of 16 MiB (measure_copy_rate)",
                 "intra_alpha": "measured: lab 01's ping-pong over gloo, fit_alpha_beta",
                 "intra_beta": "measured: lab 01's ping-pong over gloo, fit_alpha_beta",
                 "inter_alpha": "the same as intra (one machine)", "inter_beta": "the same as intra (one machine)",
                 "gemm_efficiency": "1.0: the measured rate is already the achieved one",
                 "attention_efficiency": "1.0: as gemm", "memory_efficiency": "1.0: the copy rate is achieved",
                 "layer_overhead": "fitted on the one-process step (fit_layer_overhead), the grid's only fitted row",
                 "memory_bytes": "not used here (no memory limit is checked)"})


def for_world_size(hardware: Hardware, world_size: int, cores: int) -> Hardware:
    """``hardware`` as one of ``world_size`` ranks sharing ``cores`` cores sees it: its rates divided and its
    ``layer_overhead`` multiplied by ``max(1, world_size / cores)``."""
    share = max(1.0, validate_int("world_size", world_size, minimum=1) / validate_int("cores", cores, minimum=1))
    return replace(hardware, peak_flops={k: v / share for k, v in hardware.peak_flops.items()},
                   hbm_bytes_per_s=hardware.hbm_bytes_per_s / share, layer_overhead=hardware.layer_overhead * share)


def grid_inputs(dp: int, pp: int, tp: int, sp: bool = False, batch: int = 16, n_micro: int | None = None,
                cfg: Config = Config()) -> tuple:
    """``(Transformer, Layout, world_size)`` of a :func:`~labkit.capstone.grid.run_grid` configuration: each
    replica's ``batch / dp`` rows cut into ``n_micro`` micro-batches (:func:`~labkit.capstone.grid.choose_n_micro`),
    the 1F1B schedule, float64 (``dtype="fp64"``, 8-byte messages), no recomputation, DP after the flush."""
    from .grid import validate_grid

    n_micro = validate_grid(dp, pp, tp, cfg, sp, batch, n_micro)
    micro = batch // (dp * n_micro)
    model = Transformer(layers=cfg.layers, width=cfg.width, heads=cfg.heads, vocab=cfg.vocab, seq=cfg.seq,
                        micro_batch=micro, global_batch=batch, ffn_width=cfg.resolved_ffn_width, tied=False)
    layout = Layout(dp=dp, tp=tp, pp=pp, schedule="1f1b", sp=sp, precision="fp32", dtype="fp64")
    return model, layout, dp * pp * tp


def predict_grid(hardware: Hardware, dp: int, pp: int, tp: int, cores: int, **kwargs) -> float:
    """Predicted seconds of one :func:`~labkit.capstone.grid.run_grid` step on ``cores`` shared cores."""
    model, layout, world = grid_inputs(dp, pp, tp, **kwargs)
    return predict(model, for_world_size(hardware, world, cores), layout, world).step_seconds


def fit_layer_overhead(hardware: Hardware, measured_single: float) -> float:
    """The ``layer_overhead`` that makes the one-process step (dp = pp = tp = 1) take ``measured_single``
    seconds: (measured - predicted without it) / (3 · layers · n_micro), at least 0."""
    model, layout, _ = grid_inputs(1, 1, 1)
    base = predict(model, replace(hardware, layer_overhead=0.0), layout, 1)
    return max(0.0, (measured_single - base.step_seconds) / (3 * model.layers * base.n_micro))


@dataclass(frozen=True)
class PipelineCase:
    """A lab 04 run: ``n_stages`` ranks, a Linear/ReLU stack of ``layers`` square ``width`` layers split
    evenly, ``rows`` rows (float32) in ``n_micro`` micro-batches, ``schedule``."""

    n_stages: int
    n_micro: int
    width: int = 256
    layers: int = 8
    rows: int = 256
    schedule: str = "1f1b"

    @property
    def label(self) -> str:
        return f"pipeline {self.schedule} p={self.n_stages} m={self.n_micro} ({self.layers}×{self.width})"

    def make_stage(self):
        import functools

        from ..models import mlp
        from ..pipeline import ModelStages
        return ModelStages(functools.partial(mlp, (self.width,) * (self.layers + 1)), n_stages=self.n_stages)

    def batch(self):
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.rows, self.width, generator=g), torch.randn(self.rows, self.width, generator=g)


PIPELINE_CASES = (PipelineCase(2, 4), PipelineCase(2, 8), PipelineCase(4, 8), PipelineCase(2, 8, schedule="gpipe"))


def pipeline_inputs(case: PipelineCase, flops: float, alpha: float, beta: float, layer_overhead: float = 0.0,
                    cores: int = 2) -> dict:
    """The inputs of :func:`~labkit.capstone.simulator.pipeline_makespan` for ``case``: per stage, forward
    seconds = its layers × (2·(rows/m)·width² FLOPs at ``flops`` shared over the cores + ``layer_overhead``),
    backward twice that (the input's and the weight's gradients); ``comm`` one p2p message of (rows/m)·width
    float32 values (α + β·bytes)."""
    if case.layers % case.n_stages:
        raise ArgumentError(f"n_stages={case.n_stages} must divide layers={case.layers}")
    share = max(1.0, case.n_stages / cores)
    micro_rows = case.rows / case.n_micro
    per_layer = 2 * micro_rows * case.width ** 2 / (flops / share) + layer_overhead * share
    fwd = [case.layers // case.n_stages * per_layer] * case.n_stages
    return {"forward": fwd, "backward": [2 * f for f in fwd],
            "comm": predict_time("p2p", micro_rows * case.width * 4, 2, alpha, beta)}


def predict_pipeline(case: PipelineCase, flops: float, alpha: float, beta: float, layer_overhead: float = 0.0,
                     cores: int = 2) -> float:
    """Predicted seconds of one :func:`~labkit.pipeline.run_pipeline` step (its makespan; no optimiser)."""
    x = pipeline_inputs(case, flops, alpha, beta, layer_overhead, cores)
    return pipeline_makespan(case.schedule, case.n_stages, case.n_micro, 1, x["forward"], x["backward"],
                             x["comm"])["makespan"]


def fit_pipeline_overhead(case: PipelineCase, flops: float, measured: float) -> float:
    """The ``layer_overhead`` that makes the one-stage run ``case`` take ``measured`` seconds: (measured -
    predicted without it) / (3 · layers · n_micro), at least 0."""
    if case.n_stages != 1:
        raise ArgumentError(f"case.n_stages={case.n_stages}: the pipeline's overhead is fitted on a one-stage run; "
                            "pass replace(case, n_stages=1)")
    base = predict_pipeline(case, flops, 0.0, 0.0, 0.0, cores=1)
    return max(0.0, (measured - base) / (3 * case.layers * case.n_micro))


def _measure_grid(shape, steps):
    from .grid import run_grid
    return run_grid(*shape, steps=steps).step_seconds


def _measure_pipeline(case, steps):
    from ..pipeline import run_pipeline
    return run_pipeline(case.make_stage(), case.n_stages, case.batch(), case.n_micro, case.schedule,
                        repeats=steps, warmup=1).seconds


def compare(machine: Machine | None = None, grid_shapes=GRID_SHAPES, pipeline_cases=PIPELINE_CASES,
            rounds: int = 3, steps: int = 3, overhead_32: float | None = None, log=None) -> dict:
    """Measure every run ``rounds`` times, interleaved (round 1 runs them all, then round 2, ...), each a
    median of ``steps`` steps, and predict each; ``log`` (optional) is called with a line after each round.

    Returns ``{"rows", "rows_collective_alpha", "hardware", "machine", "pipeline_overhead", "samples"}``: rows
    ``{"config", "predicted s", "measured s", "ratio", "within 25%", "fit"}`` (ratio: predicted / measured, of the
    medians), first with the ping-pong's alpha, then (if ``machine.collective_alpha``) with the all-reduce's at the
    run's world size, from the same measured times. The grid's ``layer_overhead`` is fitted on the one-process
    grid step (which must be in ``grid_shapes`` as (1, 1, 1)); the pipeline's on ``overhead_32`` if given, else on
    a one-stage run of the first case's stack at the cases' largest micro-batch count. Fitted rows have ``"fit":
    True`` and are not counted by :func:`count_within`."""
    rounds, steps = validate_int("rounds", rounds, minimum=1), validate_int("steps", steps, minimum=1)
    log = log or (lambda line: None)
    grid_shapes = [tuple(s) for s in grid_shapes]
    pipeline_cases = list(pipeline_cases)
    if grid_shapes and (1, 1, 1) not in grid_shapes:
        raise ArgumentError(f"grid_shapes={grid_shapes} must hold (1, 1, 1): the one-process step calibrates "
                            "layer_overhead; add it")
    machine = machine or measure_machine(log=log)
    one_stage = None
    if pipeline_cases and overhead_32 is None:
        one_stage = replace(pipeline_cases[0], n_stages=1, n_micro=max(c.n_micro for c in pipeline_cases))
    runs = [("grid", s) for s in grid_shapes] + [("pipe", c) for c in pipeline_cases]
    if one_stage is not None and one_stage not in pipeline_cases:
        runs.append(("pipe", one_stage))
    times = {r: [] for r in runs}
    for r in range(rounds):
        t0 = now("cpu")
        for kind, what in runs:
            times[(kind, what)].append(_measure_grid(what, steps) if kind == "grid" else _measure_pipeline(what, steps))
        log(f"round {r + 1}/{rounds}: {len(runs)} runs of {steps} step(s) in {now('cpu') - t0:.0f} s")
    med = {r: statistics.median(t) for r, t in times.items()}
    hw = cpu_hardware(machine.flops, machine.alpha, machine.beta, machine.copy_bytes_per_s)
    coll = machine.collective_alpha or {}

    def alpha_for(world):  # the all-reduce's alpha at this world size (the nearest measured)
        return coll[min(coll, key=lambda w: abs(w - world))]

    rows, rows_coll = [], []
    if grid_shapes:
        hw = replace(hw, layer_overhead=fit_layer_overhead(hw, med[("grid", (1, 1, 1))]))
        for s in grid_shapes:
            fit, measured = s == (1, 1, 1), med[("grid", s)]
            label = f"grid dp×pp×tp {s[0]}×{s[1]}×{s[2]}" + (" (fit)" if fit else "")
            rows.append(_row(label, predict_grid(hw, *s, cores=machine.cores), measured, fit))
            if coll:
                a = alpha_for(s[0] * s[1] * s[2])
                hw_c = replace(hw, intra_alpha=a, inter_alpha=a)
                rows_coll.append(_row(label, predict_grid(hw_c, *s, cores=machine.cores), measured, fit))
    if pipeline_cases:
        if overhead_32 is None:
            overhead_32 = fit_pipeline_overhead(one_stage, machine.flops32, med[("pipe", one_stage)])
        cases = pipeline_cases + ([one_stage] if one_stage is not None and one_stage not in pipeline_cases else [])
        for c in cases:
            fit, measured = c == one_stage, med[("pipe", c)]
            label = c.label + (" (fit)" if fit else "")
            p = predict_pipeline(c, machine.flops32, machine.alpha, machine.beta, overhead_32, machine.cores)
            rows.append(_row(label, p, measured, fit))
            if coll:
                p = predict_pipeline(c, machine.flops32, alpha_for(c.n_stages), machine.beta, overhead_32,
                                     machine.cores)
                rows_coll.append(_row(label, p, measured, fit))
    return {"rows": rows, "rows_collective_alpha": rows_coll, "hardware": hw, "machine": machine,
            "pipeline_overhead": overhead_32, "samples": {str(k): v for k, v in times.items()}}


def _row(config, predicted, measured, fit=False):
    ratio = predicted / measured if measured > 0 else math.inf
    return {"config": config, "predicted s": predicted, "measured s": measured, "ratio": ratio,
            "within 25%": abs(ratio - 1) <= 0.25, "fit": fit}


def count_within(rows) -> tuple[int, int]:
    """``(n, m)``: of the ``m`` rows not fitted, ``n`` predicted within ±25% of the measured time."""
    checked = [r for r in rows if not r.get("fit")]
    return sum(r["within 25%"] for r in checked), len(checked)


def format_rows(rows) -> str:
    """The rows side by side, one a line, then the line "N of M configurations within ±25% ..."."""
    lines = [f"{'config':<42} {'predicted s':>12} {'measured s':>11} {'ratio':>6}  ±25%"]
    for r in rows:
        lines.append(f"{r['config']:<42} {r['predicted s']:>12.4f} {r['measured s']:>11.4f} {r['ratio']:>6.2f}  "
                     f"{'fit' if r.get('fit') else 'yes' if r['within 25%'] else 'no'}")
    n, m = count_within(rows)
    lines.append(f"{n} of {m} configurations within ±25% (the rows marked fit calibrate the layer overhead and are "
                 "not counted)")
    return "\n".join(lines)


def describe(out: dict) -> str:
    """What :func:`compare` calibrated, then both tables, each under a line saying which alpha it uses."""
    m, hw = out["machine"], out["hardware"]
    parts = [f"this CPU: matmul {m.flops / 1e9:.2f} GFLOP/s (fp64, one thread, layer shape), {m.flops32 / 1e9:.2f} "
             f"GFLOP/s (fp32, 64×256·256×256), copy {m.copy_bytes_per_s / 1e9:.2f} GB/s, alpha {m.alpha * 1e6:.0f} "
             f"µs, beta {m.beta * 1e9:.3f} ns/B ({1 / max(m.beta, 1e-300) / 1e9:.2f} GB/s), cores {m.cores}; "
             f"layer_overhead fitted: grid {hw.layer_overhead * 1e6:.0f} µs, pipeline "
             f"{(out['pipeline_overhead'] or 0) * 1e6:.0f} µs",
             "\nA. alpha from lab 01's ping-pong (2 ranks on 2 cores; the issue's calibration):",
             format_rows(out["rows"])]
    if out["rows_collective_alpha"]:
        parts += ["\nB. the same measured times, alpha from a small all-reduce at the run's world size ("
                  + ", ".join(f"{w} ranks: {a * 1e6:.0f} µs" for w, a in m.collective_alpha.items())
                  + "):\n   it sees the wait for a descheduled peer when more ranks than cores share the machine",
                  format_rows(out["rows_collective_alpha"])]
    return "\n".join(parts)


if __name__ == "__main__":  # python -m labkit.capstone.calibrate
    print(describe(compare(log=print)))
