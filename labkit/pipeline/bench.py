"""``python -m labkit bench pipeline``: measured pipeline speed-ups beside the theory p m / (m + p - 1).

Two parts, both measured in the same run as their baseline:

1. Simulated stages (:class:`labkit.pipeline.SleepStage`: forward and backward sleep a set time per
   row). The naive schedule (the whole batch through the stages, no micro-batches) against 1F1B
   with ``m`` one-row micro-batches, for p in {2, 4} and m in {1, 2, 4, 8, 16}. Sleeping uses no
   CPU, so 4 ranks on 2 cores show the schedule's effect; the ratio column is measured / theory.
2. Real compute on 2 CPU processes with one thread each, against the same model in one process:
   (a) two equal stages of a wide Linear/ReLU stack; (b) a small ResNet (``labkit.sliced``) cut into
   2 unequal stages, over split sizes. The split-size sweep of PyTorch's
   "Single-Machine Model Parallel Best Practices" tutorial (its ResNet-50 on two GPUs: plain model
   parallel 7% slower than one GPU, pipelined about 50% faster than plain model parallel), here
   on CPU processes.
3. Zero bubble (issue 27): ZB-H1 beside 1F1B, the backward split in B (input gradient) and W (weight
   gradient): the measured bubble with sleeping stages (F, B and W 10 ms per row each) and with real compute
   (the MLP's two stages), beside the formulas (1F1B (p-1)/(m+p-1); ZB-H1 (p-1)(F+B-W) idle per rank, Qi et
   al. 2023, section 3.1, with the F, B and W the run measured) and the peak micro-batches each rank held.
   ``--zb-only`` prints this part alone.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch

from ..models import mlp
from .executor import run_pipeline, speedup_over_naive
from .reference import time_in_process
from .schedules import bubble_fraction, ideal_speedup, make_schedule, simulate, zb_h1, zb_h1_bubble, zb_v
from .stages import ModelStages, SleepStages


def bench_simulated(ps=(2, 4), ms=(1, 2, 4, 8, 16), forward_s=0.01, backward_s=0.02, repeats=3,
                    schedule="1f1b") -> list[dict]:
    """Rows of (p, m, naive ms, pipelined ms, measured speed-up, theory, ratio, bubble measured/theory)."""
    from ..viz import progress

    rows = []
    cases = progress([(p, m) for p in ps for m in ms], desc="pipeline bench: simulated (p, m)")
    for p, m in cases:
        stages = SleepStages(forward_s, backward_s, n_stages=p)
        sp = speedup_over_naive(stages, p, m, repeats=repeats, schedule=schedule)
        run = sp["pipelined"]
        rows.append({"stages p": p, "micro m": m, "naive ms": sp["naive_s"] * 1e3,
                     f"{schedule} ms": sp["pipelined_s"] * 1e3, "speed-up": sp["speedup"],
                     "theory pm/(m+p-1)": sp["theory"], "ratio": sp["speedup"] / sp["theory"],
                     "bubble": run.bubble, "bubble theory": run.bubble_theory})
    return rows


def bench_real(make_stage, batch, ms=(2, 4, 8), repeats=3, schedule="1f1b", label="") -> list[dict]:
    """One process vs 2 stages naive vs 2 stages pipelined with m micro-batches (split size = rows / m).

    Real compute on a shared machine drifts, so the naive and pipelined steps are measured in pairs,
    one right after the other, ``repeats`` times; "vs naive" is the median of the per-pair ratios and
    "ms" the median step time.
    """
    rows_n = batch[0].shape[0]
    one_s = time_in_process(make_stage, 2, batch, repeats=repeats, threads=1)
    naive_all, pairs = [], {m: ([], []) for m in ms}
    from ..viz import progress

    for _ in progress(range(repeats), desc=f"pipeline bench: {label or 'real'} pairs"):
        for m in ms:
            n = run_pipeline(make_stage, 2, batch, 1, schedule="naive", repeats=1).seconds
            p = run_pipeline(make_stage, 2, batch, m, schedule=schedule, repeats=1).seconds
            naive_all.append(n)
            pairs[m][0].append(p)
            pairs[m][1].append(n / p)
    naive_s = statistics.median(naive_all)
    rows = [{"model": label, "setup": "1 process", "split size": rows_n, "m": 1, "ms": one_s * 1e3,
             "vs 1 process": 1.0, "vs naive": naive_s / one_s, "theory vs naive": ""},
            {"model": label, "setup": "2 stages, naive", "split size": rows_n, "m": 1, "ms": naive_s * 1e3,
             "vs 1 process": one_s / naive_s, "vs naive": 1.0, "theory vs naive": 1.0}]
    for m in ms:
        p_s = statistics.median(pairs[m][0])
        rows.append({"model": label, "setup": f"2 stages, {schedule}", "split size": -(-rows_n // m), "m": m,
                     "ms": p_s * 1e3, "vs 1 process": one_s / p_s,
                     "vs naive": statistics.median(pairs[m][1]), "theory vs naive": ideal_speedup(2, m)})
    return rows


def _median_time(run, kind) -> float:
    d = [e["end"] - e["start"] for e in run.events if e["kind"] == kind]
    return statistics.median(d) if d else 0.0


def zero_bubble_row(run, setup: str) -> dict:
    """One row of the zero-bubble table: the measured bubble of ``run`` beside its schedule's formula and the
    simulator, both fed the forward, backward and W times the run measured (medians; ZB-H1's B and W from the
    stages after the first, whose B is empty and whose W runs its whole backward)."""
    p, m = run.n_stages, run.n_micro
    f = _median_time(run, "forward")
    if run.schedule == "zb-v":  # no formula for the greedy V: the simulator alone (B, W: not the first stage's)
        first = [e for e in run.events if not (e["lane"] == 0 and "." not in e["label"])]
        b, w = (statistics.median([e["end"] - e["start"] for e in first if e["kind"] == kind] or [0.0])
                for kind in ("backward", "weight"))
        formula = ""
        sim = simulate(zb_v(p, m), f, b + w, weight=w)["bubble"]
    elif run.schedule == "zb-h1":
        b, w = (statistics.median([e["end"] - e["start"] for e in run.events if e["kind"] == kind and e["lane"] > 0]
                                  or [0.0]) for kind in ("backward", "weight"))
        formula = zb_h1_bubble(p, m, f, b + w, w, strict=False)
        sim = simulate(zb_h1(p, m), f, b + w, weight=w)["bubble"]
    else:
        b, w = _median_time(run, "backward"), 0.0
        formula = bubble_fraction(p, m)
        sim = simulate(make_schedule(run.schedule, p, m), f, b)["bubble"]
    return {"setup": setup, "schedule": run.schedule, "p": p, "m": m, "ms": run.seconds * 1e3,
            "F ms": f * 1e3, "B ms": b * 1e3, "W ms": w * 1e3, "bubble": run.bubble, "formula": formula,
            "simulated": sim, "peak held": max(run.peak_live)}


def bench_zero_bubble(ps=(2, 4), ms=(4, 8, 16), forward_s=0.01, backward_s=0.02, weight_s=0.01, repeats=3,
                      real=None) -> list[dict]:
    """1F1B, ZB-H1 and ZB-V on sleeping stages (and on ``real``, a ``(make_stage, make_half_stage, batch, ms)`` for
    2 ranks: ZB-V runs the same model cut in twice as many stages, each half as long), one after the other for each
    (p, m): rows of :func:`zero_bubble_row`."""
    from ..viz import progress

    rows = []
    for p, m in progress([(p, m) for p in ps for m in ms], desc="pipeline bench: zero bubble (p, m)"):
        batch = (torch.zeros(m, 4), torch.zeros(m, 4))  # one row per micro-batch
        for schedule in ("1f1b", "zb-h1", "zb-v"):
            half = 2 if schedule == "zb-v" else 1   # ZB-V: 2p chunks, each half a stage
            stages = SleepStages(forward_s / half, backward_s / half, n_stages=p * half, weight_s=weight_s / half)
            rows.append(zero_bubble_row(run_pipeline(stages, p, batch, m, schedule=schedule, repeats=repeats),
                                        "sleeping"))
    if real is not None:
        make_stage, make_half_stage, batch, real_ms = real
        for m in progress(real_ms, desc="pipeline bench: zero bubble, real compute"):
            for schedule in ("1f1b", "zb-h1", "zb-v"):
                rows.append(zero_bubble_row(run_pipeline(make_half_stage if schedule == "zb-v" else make_stage, 2,
                                                         batch, m, schedule=schedule, repeats=repeats),
                                            "MLP 1024x8"))
    return rows


def mlp_case(width=1024, layers=8, rows=1024, n_stages=2):
    """``n_stages`` equal stages of a wide Linear/ReLU stack (:func:`labkit.models.mlp`), and a batch for it."""
    g = torch.Generator().manual_seed(0)
    model = ModelStages(functools.partial(mlp, (width,) * (layers + 1)), n_stages=n_stages)
    return model, (torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g))


def resnet_case(rows=128, boundary=5):
    """The small ResNet of lab 03 on 32x32 images, cut after layer ``boundary`` of 11."""
    g = torch.Generator().manual_seed(0)
    model = ModelStages("small", cuts=[boundary])
    return model, (torch.randn(rows, 3, 32, 32, generator=g), torch.randint(0, 10, (rows,), generator=g))


def main(argv: list[str] | None = None) -> int:
    from ..viz import format_table

    ap = argparse.ArgumentParser(prog="python -m labkit bench pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases and repeats (about 30 s)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per case (median shown)")
    ap.add_argument("--forward-ms", type=float, default=10.0, help="simulated forward time per row (ms)")
    ap.add_argument("--backward-ms", type=float, default=20.0, help="simulated backward time per row (ms)")
    ap.add_argument("--skip-real", action="store_true", help="only the simulated stages")
    ap.add_argument("--batch", type=int, default=128, help="ResNet sweep: images per batch")
    ap.add_argument("--zb-only", action="store_true", help="only the zero-bubble part (ZB-H1 beside 1F1B)")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    repeats = args.repeats or (2 if args.quick else 3)
    if args.zb_only:
        _print_zero_bubble(args, repeats)
        return 0
    ms = (1, 4, 8) if args.quick else (1, 2, 4, 8, 16)
    print(f"Simulated stages: forward {args.forward_ms:g} ms and backward {args.backward_ms:g} ms per row, "
          f"one-row micro-batches; naive = whole batch, no micro-batches; median of {repeats}.")
    rows = bench_simulated(ms=ms, forward_s=args.forward_ms / 1e3, backward_s=args.backward_ms / 1e3,
                           repeats=repeats)
    print(format_table(rows, floatfmt="{:.3g}"))
    worst = min(r["ratio"] for r in rows)
    print(f"worst measured/theory ratio: {worst:.2f} (target >= 0.90)\n")
    if not args.skip_real:
        ms_real = (4,) if args.quick else (2, 4, 8)
        repeats = args.repeats or (2 if args.quick else 5)  # real compute is noisier than sleeping
        print(f"Real compute on 2 CPU processes, one thread each, forward + backward; medians of {repeats} "
              f"naive-then-pipelined pairs. Theory for 2 equal stages and free messages: 2m/(m+1).")
        print("(a) two equal stages: Linear(1024, 1024) x 8 with ReLU, batch 1024")
        real = bench_real(*mlp_case(), ms=ms_real, repeats=repeats, label="MLP 1024x8")
        print(format_table(real, floatfmt="{:.3g}"))
        m4 = [r for r in real if r["m"] == 4][0]
        print(f"MLP, 2 stages at m=4: {m4['vs naive']:.2f}x the naive schedule (target >= 1.3, theory 1.6)\n")
        print(f"(b) split-size sweep: small ResNet, batch {args.batch} of 32x32 images, cut after layer 5 of 11 "
              f"(unequal stages)")
        real = bench_real(*resnet_case(args.batch), ms=(4,) if args.quick else (2, 4, 8, 16), repeats=repeats,
                          label="small ResNet")
        print(format_table(real, floatfmt="{:.3g}"))
        print("Tutorial (ResNet-50, 2 GPUs): plain model parallel 0.93x one GPU, pipelined (split 20) 1.49x plain "
              "model parallel; PyTorch 'Single-Machine Model Parallel Best Practices'.\n")
    _print_zero_bubble(args, repeats)
    return 0


def _print_zero_bubble(args, repeats):
    from ..viz import format_table

    f = args.forward_ms
    print(f"Zero bubble: ZB-H1 and ZB-V beside 1F1B (ZB-V: twice the stages, each half as long). "
          f"Sleeping stages: forward {f:g} ms, backward {args.backward_ms:g} ms per "
          f"row, {f:g} ms of it the weight gradient (W), one-row micro-batches; real compute: the MLP's 2 stages, "
          f"batch 1024; median of {repeats} steps. F, B, W: median times measured; formula and simulator fed them.")
    real = None if args.skip_real else (mlp_case()[0], *mlp_case(n_stages=4), (4,) if args.quick else (4, 8))
    rows = bench_zero_bubble(ms=(4, 8) if args.quick else (4, 8, 16), forward_s=f / 1e3,
                             backward_s=args.backward_ms / 1e3, weight_s=min(f, args.backward_ms / 2) / 1e3,
                             repeats=repeats, real=real)
    print(format_table(rows, floatfmt="{:.3g}"))
    print("ZB-H1 idles (p-1)(F+B-W) per rank where 1F1B idles (p-1)(F+B+W): a third with F = B = W; both hold at "
          "most p micro-batches (Qi et al. 2023, 'Zero Bubble Pipeline Parallelism', arXiv 2401.10241, section 3.1).\n"
          "ZB-V: labkit's greedy V (labkit.pipeline.schedules.zb_v), no formula: the simulator fed the measured times; "
          "it holds at most 2p half-stage micro-batches, 1F1B's memory.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
