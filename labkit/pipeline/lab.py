"""Lab 04's exercise checks and tour, and the rank functions the notebook and later labs launch (defined in
``executor`` and ``torch_pipelining``, reached here as ``labkit.pipeline.lab.pipeline_rank`` and so on)."""
from __future__ import annotations

import random
from typing import Callable

import torch

from ..checks import calls_to, expect_close, refuse, run_cases
from ..tour import lab_name, run_check
from . import schedules as S
from .executor import PipelineRun, pipeline_rank, run_pipeline, speedup_over_naive
from .reference import max_grad_error, reference_step
from .schedules import gpipe, one_f_one_b, simulate
from .stages import ModelStages, SleepStages
from .torch_pipelining import torch_pipelining_rank

__all__ = ["check_1f1b_order", "check_bubble_prediction", "tour", "pipeline_rank", "torch_pipelining_rank"]


def _draw_pm(rng: random.Random, fixed, n: int = 3) -> list[tuple[int, int]]:
    """``n`` (p, m) pairs drawn now, none of them in ``fixed``: cases no answer can hard-code."""
    out: list[tuple[int, int]] = []
    while len(out) < n:
        pm = (rng.randint(2, 9), rng.randint(1, 24))
        if pm not in fixed and pm not in out:
            out.append(pm)
    return out


_SCHEDULE_FUNCTIONS = (S.one_f_one_b_stage, S.one_f_one_b, S.make_schedule, S.gpipe, S.interleaved, S.naive,
                       S.zb_h1_stage, S.zb_h1)  # ZB-H1 without its W's is the 1F1B order


def check_1f1b_order(fn: Callable):
    """Check a learner's ``fn(stage, p, m)`` against the 1F1B order (actions or strings like "F0").

    Fixed cases plus stages, ``p`` and ``m`` drawn at check time; calling the library's schedules
    (``labkit.pipeline.schedules``) instead of writing the order fails."""
    rng = random.Random()
    fixed = [(0, 4, 8), (3, 4, 8), (1, 4, 8), (0, 2, 1), (0, 4, 2), (2, 3, 5)]
    drawn = [(rng.randrange(p), p, m) for p, m in _draw_pm(rng, {(p, m) for _, p, m in fixed})]

    def case(stage, p, m, label=""):
        def thunk():
            with calls_to(*_SCHEDULE_FUNCTIONS) as seen:
                got = fn(stage, p, m)
            refuse(seen, "write the order yourself from the warm-up / steady / cool-down rule")
            got = [str(a) for a in got]
            want = [str(a) for a in S.one_f_one_b_stage(stage, p, m)]
            if sorted(got) != sorted(want):
                raise AssertionError(f"stage {stage} of p={p}, m={m} must run F0..F{m - 1} and B0..B{m - 1} once each; "
                                     f"got {len(got)} actions: {got[:12]}{' ...' if len(got) > 12 else ''}")
            first_b = next((i for i, a in enumerate(got) if a.startswith("B")), len(got))
            warm = min(p - stage - 1, m)
            if first_b != warm + (1 if warm < m else 0):
                raise AssertionError(f"stage {stage} of p={p}, m={m}: your first backward comes after {first_b} "
                                     f"forwards; count the warm-up forwards this stage needs before it can start one")
            for i, (g, w) in enumerate(zip(got, want)):
                if g != w:
                    raise AssertionError(f"stage {stage} of p={p}, m={m}: action {i} is {g}; after the warm-up, "
                                         f"alternate one forward and one backward (the oldest micro-batch first)")
        return (f"stage {stage}, p={p}, m={m}{label}", thunk)

    cases = [case(*c) for c in fixed] + [case(*c, " (drawn now)") for c in drawn]
    return run_cases("1F1B order of one stage", cases,
                     hint="warm-up: p - stage - 1 forwards (at most m); then F, B pairs; then the remaining backwards")


def check_bubble_prediction(fn: Callable, run: "PipelineRun | None" = None, tolerance: float = 0.1):
    """Check ``fn(p, m) -> idle fraction`` against the simulated schedule and, if given, a measured run.

    Fixed and drawn-at-check-time (p, m); calling the library's ``bubble_fraction`` / ``simulate``
    instead of predicting fails."""
    rng = random.Random()
    fixed = [(2, 4), (4, 8), (4, 1), (8, 32), (1, 5)]
    pms = [(p, m, "") for p, m in fixed] + [(p, m, " (drawn now)") for p, m in _draw_pm(rng, set(fixed))]

    def case(p, m):
        def thunk():
            with calls_to(S.bubble_fraction, S.ideal_speedup, S.simulate, S.gpipe, S.one_f_one_b,
                          S.make_schedule, S.zb_h1_bubble) as seen:  # ZB-H1's with W = 0 is 1F1B's
                got = fn(p, m)
            refuse(seen, "predict the bubble from p and m by counting time slots")
            want = simulate(gpipe(p, m))["bubble"]
            try:
                got = float(got)
            except (TypeError, ValueError):
                raise AssertionError(f"return a number (the idle fraction), got {got!r}") from None
            if not 0 <= got < 1:
                raise AssertionError(f"the idle fraction is between 0 and 1; you returned {got:g} for p={p}, m={m}")
            expect_close(got, want, atol=1e-6, what=f"bubble for p={p}, m={m}")
        return thunk

    cases = [(f"p={p}, m={m}{label}", case(p, m)) for p, m, label in pms]
    if run is not None:
        def measured():
            pred = fn(run.n_stages, run.n_micro)
            if abs(pred - run.bubble) > tolerance:
                raise AssertionError(f"you predict {pred:.3f}, the run measured {run.bubble:.3f} "
                                     f"(p={run.n_stages}, m={run.n_micro})")
        cases.append((f"a real run, p={run.n_stages}, m={run.n_micro}, within {tolerance}", measured))
    return run_cases("bubble prediction", cases,
                     hint="count time slots: a rank is busy in m of the m+p-1 slots of a pipelined step")


def tour(world_size: int = 2) -> list[dict]:
    """The lab's quick path: schedules without processes, then real runs on ``world_size`` stage ranks."""
    lab, p = lab_name(__package__), world_size

    def simulated():
        sims = {n: simulate(f(4, 8), 1.0, 2.0) for n, f in (("gpipe", gpipe), ("1f1b", one_f_one_b))}
        ok = all(abs(s["makespan"] - 11 * 3.0) < 1e-9 for s in sims.values()) and sims["1f1b"]["peak_in_flight"][0] == 4
        return ok, (f"makespans {[s['makespan'] for s in sims.values()]}, 1F1B rank 0 holds "
                    f"{sims['1f1b']['peak_in_flight'][0]} micro-batches, GPipe 8")

    torch.manual_seed(0)
    batch = (torch.randn(10, 32), torch.randn(10, 10))
    model = ModelStages("mlp", n_stages=p)
    ref = reference_step(model, p, batch)

    def same_as_one_process(sched):
        run = run_pipeline(model, p, batch, 3, schedule=sched)
        err = max_grad_error(run.grads, ref["grads"])
        return (err < 1e-5 and abs(run.loss - ref["loss"]) < 1e-5,
                f"max grad error {err:.2g}, loss {run.loss:.5f} vs {ref['loss']:.5f}")

    def speedup():
        sp = speedup_over_naive(SleepStages(0.01, 0.02, n_stages=p), p, 4, repeats=3)
        return (sp["speedup"] >= 0.75 * sp["theory"],  # a busy machine loses some to wake-ups
                f"measured {sp['speedup']:.2f}x = {sp['speedup'] / sp['theory']:.2f} of theory {sp['theory']:.2f} "
                f"({sp['naive_s'] * 1e3:.0f} ms -> {sp['pipelined_s'] * 1e3:.0f} ms)")

    def memory():
        data = (torch.randn(8, 4), torch.randn(8, 4))
        g = run_pipeline(SleepStages(0.0, 0.0, n_stages=p), p, data, 8, "gpipe")
        o = run_pipeline(SleepStages(0.0, 0.0, n_stages=p), p, data, 8, "1f1b")
        return (g.peak_live[0] == 8 and o.peak_live[0] == min(p, 8),
                f"GPipe {g.peak_live[0]} micro-batches ({g.peak_bytes[0]} B), "
                f"1F1B {o.peak_live[0]} ({o.peak_bytes[0]} B)")

    rows = [run_check(lab, "GPipe and 1F1B take (m+p-1)(f+b), p=4 m=8 (simulated)", simulated)]
    for sched in ("gpipe", "1f1b"):
        rows.append(run_check(lab, f"{sched} on {p} ranks, m=3 (uneven): gradients == single process",
                              lambda sched=sched: same_as_one_process(sched)))
    rows.append(run_check(lab, f"sleeping stages p={p} m=4: 1F1B speed-up over naive vs theory", speedup))
    rows.append(run_check(lab, f"activations held on rank 0, m=8: GPipe m, 1F1B min(p, m) (measured, p={p})", memory))
    return rows
