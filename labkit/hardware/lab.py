"""Lab 09's notebook helpers, exercise checks and tour.

* :func:`mlp`, :func:`state_cases`: the models the memory exercise is checked on; :func:`ce_loss`, the loss the
  calculator walks and the notebook's ledger runs (from :mod:`labkit.hardware.walk`).
* :func:`check_state_bytes`: the learner's ``predict_states(model, precision, optimizer)`` (bytes of parameters,
  gradients and optimiser state) against what PyTorch's memory tracker measures on a real training step (within
  1%), for models and setups drawn afresh at each check; labkit's own formulas refuse to run meanwhile.
* :func:`check_pick_batch`: the learner's ``pick_batch(model, sample_shape, budget_bytes)`` against the calculator's
  largest batch (:func:`labkit.hardware.largest_batch`, which refuses to run meanwhile), and the batch confirmed by
  a measured run (its measured peak within the calculator's 10% of the prediction).
* :func:`transformer_bars`: per-GPU memory of a transformer under several setups, for the widget's stacked bars.
* :func:`tour`: the quick path (calculator against measurement, one timed comparison, checkpointing).

Lab 09 runs in one process: the memory and speed of one device are its subject; the per-rank figures under data,
ZeRO, tensor and pipeline parallelism are predicted here and measured in labs 02, 04, 10 and 11.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn

from .. import memory_model as _mm
from ..checks import CheckResult, refusing, run_cases
from ..sliced.models import build_model
from ..tour import lab_name
from . import memory as _memory
from .measure import measure
from .memory import Setup, _as_sample, estimate, largest_batch
from .transformer import TransformerShape, mlp, tiny_transformer
from .walk import ce_loss

__all__ = ["LAB", "mlp", "ce_loss", "state_cases", "check_state_bytes", "batch_cases", "check_pick_batch",
           "transformer_bars", "GPU_LINES", "tour"]

LAB = lab_name(__package__)
GPU_LINES = {"24 GB (RTX 4090)": 24e9, "80 GB (A100/H100)": 80e9}  # marketed GB: the cards hold that many GiB


# ----------------------------------------------------------------------------- exercise 1: predict, then measure
def state_cases(seed: int | None = None) -> list[tuple[str, nn.Module, str, str]]:
    """``(name, model, precision, optimizer)`` cases; widths and the order of setups drawn from ``seed`` (fresh
    randomness when None, so an answer that hard-codes the cases fails)."""
    rng = random.Random(seed)
    setups = [("fp32", "adam"), ("fp32", "sgd"), ("fp32", "momentum"), ("bf16", "adamw"), ("autocast-bf16", "adam")]
    out = []
    for i, (precision, optimizer) in enumerate(setups):
        widths = (rng.randrange(32, 300), rng.randrange(64, 600), rng.randrange(16, 200), rng.randrange(2, 20))
        out.append((f"MLP {widths}, {precision}, {optimizer}", mlp(widths, seed=i), precision, optimizer))
    return out


def check_state_bytes(predict_states, seed: int | None = None) -> CheckResult:
    """Run ``predict_states(model, precision, optimizer) -> {"params", "grads", "optimizer"}`` (bytes) on each case,
    then train the model for two steps under that setup and measure it with PyTorch's memory tracker: each
    predicted figure must be within 1% of the measured one (the optimiser's state after its first step)."""

    def case(model, precision, optimizer):
        def thunk():
            with refusing(_mm.bytes_per_parameter, why="you called labkit's bytes_per_parameter (or the calculator "
                          "built on it): count the bytes yourself from the parameters, the precision and the "
                          "optimiser"):
                got = predict_states(model, precision, optimizer)
            if not isinstance(got, dict) or not {"params", "grads", "optimizer"} <= set(got):
                raise AssertionError(f"return a dict with keys 'params', 'grads' and 'optimizer' (bytes), got {got!r}")
            x = torch.randn(16, model[0].in_features)
            m = measure(model, x, setup=Setup(precision=precision, optimizer=optimizer), steps=2).steps[-1]
            bad = [f"{k}: predicted {float(got[k]):,.0f}, measured {m[k]:,}" for k in ("params", "grads", "optimizer")
                   if abs(float(got[k]) - m[k]) > 0.01 * max(m[k], 1)]
            if bad:
                raise AssertionError("; ".join(bad))
        return thunk

    return run_cases("predict the bytes of parameters, gradients and optimiser state",
                     [(name, case(model, p, o)) for name, model, p, o in state_cases(seed)],
                     hint="bytes per value: 4 in fp32 and under autocast (the weights stay fp32), 2 in pure bf16; "
                          "gradients are the size of the parameters; SGD keeps no state, momentum one buffer, "
                          "Adam and AdamW two (m and v), each the size of the parameters")


# ----------------------------------------------------------------------------- exercise 2: the largest batch
def batch_cases(seed: int | None = None) -> list[tuple[str, nn.Module, tuple, int]]:
    """``(name, model, sample_shape, budget_bytes)``: a small ResNet (activations dominate), an MLP (the optimiser
    step's peak dominates: the batch barely moves it) and a small transformer, each with a budget that falls
    between the predicted peaks of two batch sizes drawn from ``seed`` (fresh randomness when None)."""
    rng = random.Random(seed)
    shape = TransformerShape(layers=2, width=64, heads=4, vocab=100, seq=32, micro_batch=1)
    out = []
    for name, model, sample in (("small ResNet, 32 x 32 images", build_model("small"), (1, 3, 32, 32)),
                                ("MLP 256-512-512-10", mlp(), (1, 256)),
                                ("transformer 2 x 64, seq 32", tiny_transformer(shape), (1, shape.seq))):
        b = rng.randrange(3, 40)
        lo, hi = (estimate(model, Setup(), (n, *sample[1:])).peak for n in (b, b + 1))
        out.append((name, model, sample, int(lo + rng.random() * (hi - lo - 1))))
    return out


def check_pick_batch(pick_batch, seed: int | None = None) -> CheckResult:
    """``pick_batch(model, sample_shape, budget_bytes) -> int`` must give the largest batch whose predicted peak
    (:func:`labkit.hardware.estimate`, fp32 Adam) fits the budget; the batch is then run, and its measured peak must
    be within 10% of the prediction (the calculator's accuracy, tested in ``tests/test_hardware_memory.py``)."""

    def case(model, sample_shape, budget):
        def thunk():
            want = largest_batch(model, sample_shape, budget)
            with refusing(_memory.largest_batch, why="you called labkit's largest_batch: search the batch sizes "
                          "yourself with estimate(model, Setup(), (b, ...)).peak"):
                got = pick_batch(model, sample_shape, budget)
            if isinstance(got, bool) or not isinstance(got, int):
                raise AssertionError(f"return the batch size as an int, got {got!r}")
            peak = lambda b: estimate(model, Setup(), (b, *sample_shape[1:])).peak
            if got != want:
                raise AssertionError(f"batch {got}: predicted peak {peak(got):,} bytes for a budget of {budget:,}; "
                                     f"the largest batch that fits is {want} ({peak(want):,} bytes, batch {want + 1}: "
                                     f"{peak(want + 1):,})")
            torch.manual_seed(0)
            x = _as_sample(model, (got, *sample_shape[1:]))  # token ids for a transformer
            measured = max(s["peak"] for s in measure(model, x, steps=2).steps)
            if abs(measured - peak(got)) > 0.10 * measured:
                raise AssertionError(f"batch {got} measured {measured:,} bytes at its peak against {peak(got):,} "
                                     "predicted: more than 10% apart")
        return thunk

    return run_cases("pick the largest batch for a memory budget",
                     [(f"{name}, budget {budget / 1e6:.2f} MB", case(m, s, budget))
                      for name, m, s, budget in batch_cases(seed)],
                     hint="memory grows with the batch: try b = 1, 2, 3, ... (or bisect) and keep the last b whose "
                          "estimate(model, Setup(), (b, *sample_shape[1:])).peak is <= budget_bytes")


# ----------------------------------------------------------------------------- the calculator's widget
def transformer_bars(shape: TransformerShape, setups: dict[str, Setup]) -> dict[str, dict[str, float]]:
    """``{label: {component: bytes per GPU}}`` of ``shape`` under each setup (for :func:`plots.memory_stack`)."""
    out = {}
    for label, setup in setups.items():
        e = estimate(shape, setup)
        out[label] = {"params": e.rank_params, "grads": e.rank_grads, "optimizer": e.rank_optimizer,
                      "activations": e.rank_activations}
    return out


# ----------------------------------------------------------------------------- tour
def tour(world_size: int = 2) -> list[dict]:
    """The quick path in one process (``world_size`` is not used: lab 09 measures one device)."""
    from ..tour import run_check
    from .speed import checkpointing, mixed_precision

    torch.set_num_threads(1)

    def states():
        model, x = mlp(), torch.randn(64, 256)
        est, got = estimate(model, Setup(), x), measure(model, x, steps=2)
        worst = max(abs(getattr(est, k) / got.steps[-1][k] - 1) for k in ("params", "grads", "optimizer"))
        return worst < 0.01, f"worst of params, grads, Adam state: {worst:.2%} from MemTracker ({got.method})"

    def activations():
        from ..sliced.models import saved_bytes

        model, x = build_model("small"), torch.randn(8, 3, 32, 32)
        target = torch.randint(0, 10, (8,))
        ledger = saved_bytes(lambda: ce_loss(model(x), target), exclude=model)[1]
        est = estimate(model, Setup(), x).activations
        return est == ledger, f"small ResNet, batch 8: walked {est:,} bytes, ledger {ledger:,}"

    def peak():
        model, x = mlp(dropout=0.1), torch.randn(64, 256)
        est, got = estimate(model, Setup(), x).peak, measure(model, x, steps=2).peak
        return abs(est / got - 1) < 0.10, f"predicted {est / 1e6:.2f} MB, measured {got / 1e6:.2f} MB"

    def bf16():
        r = mixed_precision(batch=8, trials=3)
        close = all(row.get("loss close", True) for row in r.rows())
        return close, r.verdict

    def ckpt():
        r = checkpointing(segments=(2,), batch=8, trials=1)
        two = r.rows()[-1]
        return r.extra["grads_equal"][2] and two["memory vs none"] < 1, r.verdict

    return [run_check(LAB, "calculator = MemTracker (MLP, fp32 Adam; within 1%)", states),
            run_check(LAB, "walked activations = saved-tensor ledger", activations),
            run_check(LAB, "predicted peak within 10% of measured", peak),
            run_check(LAB, "bf16 autocast step vs fp32 (loss close; speed as measured)", bf16),
            run_check(LAB, "checkpointing: same gradients, less memory", ckpt)]
