"""Training memory measured on a real run, to check lab 09's calculator against (:func:`measure`,
:func:`compare`, :func:`confirm_batch`).

:func:`measure` runs real training steps of a copy of a model and reports, per step, the bytes of parameters,
gradients, optimiser state (before and after the step: the state appears at the first step), the optimiser's
temporaries, the activations (the saved-tensor ledger, :func:`labkit.sliced.models.saved_bytes`) and the peak.
On CPU it reads PyTorch's memory tracker, ``torch.distributed._tools.mem_tracker.MemTracker``, which splits
memory into parameters, gradients, optimiser state and the rest; it is a private API, so a failure falls back to
``torch.profiler`` with ``profile_memory=True`` (the peak from its allocation events, the rest by walking the
tensors) and says so in ``notes``. On a GPU, the allocator's peak (``torch.cuda.max_memory_allocated``, the CUDA
context excluded). :func:`compare` puts a prediction beside a measurement, :func:`peak_rows` the predicted and
measured peaks of several models; :func:`confirm_batch` measures the batch :func:`labkit.hardware.largest_batch`
predicts for a budget, and the next one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from .._validate import ArgumentError, validate_choice, validate_int
from ..devices import cuda_peak
from ..sliced.models import saved_bytes
from .memory import Estimate, Setup, _as_sample, _shape, largest_batch
from .walk import ce_loss, nbytes

__all__ = ["Measured", "measure", "compare", "confirm_batch", "peak_rows"]

_LOW = {"bf16": torch.bfloat16, "autocast-bf16": torch.bfloat16, "autocast-fp16": torch.float16}


@dataclass
class Measured:
    """Measured bytes per training step (``steps``: one dict per step) and how they were measured (``method``)."""

    steps: list
    method: str
    device: str
    notes: list = field(default_factory=list)

    def __getattr__(self, name):  # the last step's figures as attributes: m.params, m.peak, ...
        steps = self.__dict__.get("steps")
        if steps and name in steps[-1]:
            return steps[-1][name]
        raise AttributeError(name)


def _optimizer_for(setup: Setup, params):
    kw = {"foreach": setup.foreach}
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.01, **kw)
    if setup.optimizer == "momentum":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, **kw)
    return (torch.optim.Adam if setup.optimizer == "adam" else torch.optim.AdamW)(params, lr=1e-3, **kw)


def _state_nbytes(opt) -> int:
    return sum(nbytes(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def measure(model: nn.Module, sample, target=None, setup: Setup = Setup(), steps: int = 2, device: str = "cpu",
            tracker: str | None = None) -> Measured:
    """Run ``steps`` real training steps of a copy of ``model`` (cross-entropy on ``target``, random classes if
    None) under ``setup``'s precision, optimiser and checkpointing; per step: ``params``, ``grads``,
    ``optimizer_before`` (0 at step 1: the state is made by the first step), ``optimizer``, ``intermediates``,
    ``activations`` (the saved-tensor ledger), ``peak``. CPU: ``MemTracker`` (``tracker="profiler"`` or its
    failure uses ``torch.profiler``); CUDA: the allocator's peak (context excluded)."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(setup, Setup):
        raise ArgumentError(f"setup must be a Setup, got {type(setup).__name__}")
    if not list(model.parameters()):
        raise ArgumentError(f"model must have parameters, got a {type(model).__name__} without any")
    if not isinstance(sample, torch.Tensor):
        raise ArgumentError(f"sample must be an input tensor (a batch), got {type(sample).__name__}")
    steps = validate_int("steps", steps, minimum=1)
    device = validate_choice("device", str(device), ("cpu", "cuda"))
    tracker = validate_choice("tracker", tracker, (None, "memtracker", "profiler"))
    if setup.precision.startswith("mixed"):
        raise ArgumentError(f"precision {setup.precision!r} is the ZeRO/Megatron layout, which plain PyTorch does "
                            "not run: measure 'autocast-bf16' or 'bf16' instead")
    if setup.checkpoint and not isinstance(model, nn.Sequential):
        raise ArgumentError(f"checkpoint={setup.checkpoint} needs an nn.Sequential model, got {type(model).__name__}")
    m = copy.deepcopy(model).to(device)
    if setup.precision == "bf16":
        m = m.to(torch.bfloat16)
    m.train()
    x = sample.to(device)
    if setup.precision == "bf16" and x.is_floating_point():
        x = x.to(torch.bfloat16)
    if target is None:
        with torch.no_grad():   # the output's shape, from one sample in eval mode (BatchNorm refuses a batch of 1)
            out_shape = m.eval()(x[:1]).shape
        m.train()
        target = torch.randint(0, out_shape[-1], (x.shape[0], *out_shape[1:-1]), device=device)
    frozen, n_frozen = _frozen_as_buffers(m)
    opt = _optimizer_for(setup, m.parameters())
    result = Measured([], "cuda allocator" if device == "cuda" else "MemTracker", device)
    if n_frozen:
        result.notes.append(f"{n_frozen} frozen parameter(s), {frozen / 1e6:.3g} MB, held as buffers while measuring "
                            f"(MemTracker hooks every parameter's gradient, and a frozen one has none); they are "
                            f"counted in params, without gradient or optimiser state")
    for i in range(steps):
        one = None
        if device == "cpu" and tracker != "profiler":
            try:
                one = _step_memtracker(m, x, target, opt, setup)
            except Exception as e:  # a private API: say so, and fall back
                result.notes.append(f"MemTracker failed ({type(e).__name__}: {e}); torch.profiler used")
        if one is None:
            if device == "cuda":
                one = _step_cuda(m, x, target, opt, setup)
            else:
                result.method = "torch.profiler"
                one = _step_profiler(m, x, target, opt, setup)
        one["params"] += frozen   # frozen parameters are parameters: counted where the calculator counts them
        if "buffers" in one:
            one["buffers"] -= frozen
        one["step"] = i + 1
        result.steps.append(one)
    return result


def _frozen_as_buffers(m: nn.Module) -> tuple[int, int]:
    """Hold every frozen parameter (``requires_grad=False``) of ``m``, a private copy, as a buffer of its module;
    return their bytes and count, each tensor once (a frozen weight tied across modules stays one tensor).

    The step is unchanged: a buffer enters the forward as the parameter did, and autograd tracks neither. What
    changes is that ``MemTracker``, which registers a hook on every parameter's gradient, no longer meets a tensor
    that cannot take one, and the optimiser gets the trainable parameters only (torch's skips the others anyway)."""
    held, total = {}, 0
    for mod in m.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or p.requires_grad:
                continue
            if id(p) not in held:
                held[id(p)] = p.detach()
                total += nbytes(p)
            del mod._parameters[name]
            mod.register_buffer(name, held[id(p)])
    return total, len(held)


def _forward_loss(m, x, target, setup):
    def run():
        if setup.checkpoint:
            from torch.utils.checkpoint import checkpoint_sequential
            out = checkpoint_sequential(m, setup.checkpoint, x, use_reentrant=False)
        else:
            out = m(x)
        return ce_loss(out.float() if out.dtype != torch.float32 and setup.precision != "bf16" else out, target)
    if setup.precision in ("autocast-bf16", "autocast-fp16"):
        with torch.autocast(x.device.type, dtype=_LOW[setup.precision]):
            return saved_bytes(run, exclude=m)
    return saved_bytes(run, exclude=m)


def _backward(m, x, target, setup) -> int:
    """``grad_accum`` forwards and backwards; the saved-activation bytes of one."""
    for _ in range(setup.grad_accum):
        loss, acts = _forward_loss(m, x, target, setup)
        loss.backward()
        del loss
    return acts


def _step_memtracker(m, x, target, opt, setup):
    from torch.distributed._tools.mem_tracker import MemTracker

    cpu = torch.device("cpu")
    mt = MemTracker()
    mt.track_external(m, opt, x, target)
    get = lambda snap, key: sum(v for k, v in snap.get(cpu, {}).items() if str(getattr(k, "value", k)) == key)
    with mt:  # forward and backward
        opt_before = get(mt.get_tracker_snapshot("current"), "Optstate")
        acts = _backward(m, x, target, setup)
        grads = get(mt.get_tracker_snapshot("current"), "Gradient")
    peak_fb = mt.get_tracker_snapshot("peak")
    st = MemTracker()  # the optimiser step alone, so that its temporaries show even when backward peaks higher
    st.track_external(m, opt, x, target)
    with st:
        opt.step()
        opt.zero_grad()
        after = st.get_tracker_snapshot("current")
    peak_st = st.get_tracker_snapshot("peak")
    return {"params": get(after, "Parameter"), "buffers": get(after, "Buffer"), "grads": grads,
            "optimizer_before": opt_before, "optimizer": get(after, "Optstate"),
            "intermediates": max(0, get(peak_st, "Optstate") - get(after, "Optstate")), "activations": acts,
            "peak": max(get(peak_fb, "Total"), get(peak_st, "Total"))}


def _tensor_figures(m, opt, grads, opt_before, acts):
    return {"params": sum(nbytes(p) for p in m.parameters()), "buffers": sum(nbytes(b) for b in m.buffers()),
            "grads": grads, "optimizer_before": opt_before, "optimizer": _state_nbytes(opt), "activations": acts}


def _step_profiler(m, x, target, opt, setup):
    """Tensor figures by walking the tensors; the peak from the profiler's allocation events (in time order)."""
    from torch.profiler import ProfilerActivity, profile

    base = sum(nbytes(p) for p in m.parameters()) + sum(nbytes(b) for b in m.buffers()) + _state_nbytes(opt) \
        + nbytes(x) + nbytes(target)
    opt_before = _state_nbytes(opt)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        acts = _backward(m, x, target, setup)
        grads = sum(nbytes(p.grad) for p in m.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    level = high = 0
    for e in events:
        level += e.cpu_memory_usage
        high = max(high, level)
    fig = _tensor_figures(m, opt, grads, opt_before, acts)
    fig.update(intermediates=0, peak=base + high)
    return fig


def _step_cuda(m, x, target, opt, setup):
    opt_before = _state_nbytes(opt)

    def step():
        acts = _backward(m, x, target, setup)
        grads = sum(nbytes(p.grad) for p in m.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        return acts, grads

    (acts, grads), above = cuda_peak(x.device, step)
    fig = _tensor_figures(m, opt, grads, opt_before, acts)
    fig.update(intermediates=0, peak=above + sum(nbytes(p) for p in m.parameters()) + opt_before + nbytes(x)
               + nbytes(target))
    return fig


def compare(est: Estimate, measured: Measured) -> list[dict]:
    """Rows ``component``, ``predicted``, ``measured``, ``ratio`` (predicted / measured) for the last step."""
    if not isinstance(est, Estimate) or not isinstance(measured, Measured):
        raise ArgumentError(f"compare needs an Estimate and a Measured, got {type(est).__name__} and "
                            f"{type(measured).__name__}")
    last = measured.steps[-1]
    rows = []
    for k in ("params", "grads", "optimizer", "intermediates", "activations", "peak"):
        p, q = getattr(est, k), last[k]
        rows.append({"component": k, "predicted": p, "measured": q, "ratio": p / q if q else float("nan")})
    return rows


def peak_rows(cases: dict, setup: Setup = Setup(), steps: int = 2) -> list[dict]:
    """One row per ``name: (model, sample)`` of ``cases``: the calculator's peak (:func:`labkit.hardware.estimate`)
    beside the measured one (:func:`measure`, ``steps`` steps on the CPU), in MiB, their ``ratio`` (predicted /
    measured), the activations' ratio, and how the run was measured. The zoo test and the benchmark table share it."""
    from .memory import estimate

    if not isinstance(cases, dict) or not cases:
        raise ArgumentError(f"cases must be a dict of name: (model, sample), got {type(cases).__name__}")
    rows = []
    for name, (model, sample) in cases.items():
        est, got = estimate(model, setup, sample), measure(model, sample, setup=setup, steps=steps)
        rows.append({"model": name, "predicted MiB": est.peak / 2 ** 20, "measured MiB": got.peak / 2 ** 20,
                     "ratio": est.peak / got.peak, "activations ratio": est.activations / got.activations,
                     "method": got.method, "notes": est.notes + got.notes})
    return rows


def confirm_batch(model: nn.Module, sample_shape: Sequence[int], budget_bytes: int, setup: Setup = Setup()) -> dict:
    """Measure (on CPU) the batch :func:`largest_batch` predicts and the next one: ``fits`` and ``next_exceeds``."""
    budget = validate_int("budget_bytes", budget_bytes, minimum=1)
    shape = _shape(sample_shape)
    b = largest_batch(model, shape, budget, setup)
    peaks = []
    for n in (b, b + 1):
        torch.manual_seed(0)
        x = _as_sample(model, (n, *shape[1:]))
        peaks.append(max(s["peak"] for s in measure(model, x, setup=setup, steps=2).steps))
    return {"batch": b, "budget": budget, "peak": peaks[0], "next_peak": peaks[1], "fits": peaks[0] <= budget,
            "next_exceeds": peaks[1] > budget}
