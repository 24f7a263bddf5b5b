"""The single-process reference of a pipeline step, and the helpers the ranks share with it.

:func:`split_batch` cuts a batch into micro-batches exactly as the ranks do; :func:`reference_step`
computes the loss and per-stage gradients of the same step in one process (the reference every
pipeline run is compared with, by :func:`max_grad_error`); :func:`time_in_process` times the stages
one after another in one process.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from .._compat import renamed_kwargs
from .._validate import validate_int
from ..devices import now


def _default_loss(out, y):
    import torch.nn.functional as F

    if y.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def split_batch(batch, n_micro: int):
    """Check ``(inputs, targets)`` and cut both into ``n_micro`` micro-batches; return (xs, ys, weights)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be a pair (inputs, targets) of tensors, got {type(batch).__name__}")
    x, y = batch
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError("batch must be (inputs, targets) with both torch tensors")
    n_micro = validate_int("n_micro (m, the number of micro-batches)", n_micro, minimum=1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"inputs have {x.shape[0]} rows but targets {y.shape[0]}; pass one target per input row")
    if x.shape[0] < n_micro:
        raise ValueError(f"a batch of {x.shape[0]} rows cannot make {n_micro} micro-batches: "
                         f"pass n_micro <= {x.shape[0]} or a bigger batch")
    xs, ys = torch.tensor_split(x, n_micro), torch.tensor_split(y, n_micro)
    return xs, ys, [len(t) / x.shape[0] for t in xs]


def _grads(module: nn.Module) -> dict:
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)).cpu()
            for n, p in module.named_parameters()}


@renamed_kwargs(n_pieces="n_stages")
def reference_step(make_stage: Callable, n_stages: int, batch, n_micro: int = 1, loss_fn=None) -> dict:
    """Single process, no pipeline: run all ``n_stages`` stages in a row and return ``{"loss", "grads"}``.

    With ``n_micro > 1`` the micro-batches are accumulated one after another (needed for models
    with BatchNorm, whose statistics depend on the micro-batch); for other models any ``n_micro``
    gives the full batch's gradient.
    """
    loss_fn = loss_fn or _default_loss
    stages = [make_stage(i) for i in range(n_stages)]
    xs, ys, ws = split_batch(batch, n_micro)
    total = 0.0
    for x, y, w in zip(xs, ys, ws):
        out = x
        for st in stages:
            out = st(out)
        loss = loss_fn(out, y) * w
        loss.backward()
        total += float(loss.detach())
    return {"loss": total, "grads": [_grads(st) for st in stages]}


@renamed_kwargs(n_pieces="n_stages")
def time_in_process(make_stage: Callable, n_stages: int, batch, repeats: int = 3, threads: int = 1,
                    loss_fn=None, warmup: int = 1) -> float:
    """Median seconds of one training step (forward + backward) of the whole model in this process.

    The single-device baseline on the CPU: the same stages, run one after another, with ``threads``
    CPU threads (1 by default, like each pipeline rank), on the whole batch.
    """
    loss_fn = loss_fn or _default_loss
    stages = [make_stage(i) for i in range(n_stages)]
    x, y = batch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for k in range(warmup + repeats):
            for st in stages:
                st.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = x
            for st in stages:
                out = st(out)
            loss_fn(out, y).backward()
            if k >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times)


def max_grad_error(run_grads: list, ref_grads: list) -> float:
    """Largest absolute difference between two per-stage gradient lists (same names)."""
    err = 0.0
    if len(run_grads) != len(ref_grads):
        raise ValueError(f"{len(run_grads)} stages of gradients vs {len(ref_grads)}")
    for a, b in zip(run_grads, ref_grads):
        if a.keys() != b.keys():
            raise ValueError(f"parameter names differ: {sorted(a)} vs {sorted(b)}")
        for k in a:
            err = max(err, float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0)
    return err


def stage_times(make_stage: Callable, n_stages: int, batch, n_micro: int = 1, repeats: int = 3,
                threads: int = 1, loss_fn=None, warmup: int = 1) -> dict:
    """Per stage, the median seconds of one micro-batch's forward and of its backward, each stage timed alone.

    What a device with its own compute spends on each stage: the stages run one after another in this process
    (``threads`` CPU threads, 1 like each pipeline rank), so nothing else computes while one is timed. The
    micro-batch is the first of ``split_batch(batch, n_micro)``; the last stage's backward includes the loss.
    Returns ``{"forward": [s per stage], "backward": [s per stage], "rows": rows in the micro-batch}``; feed the
    lists to :func:`labkit.pipeline.simulate` to predict a step on ``n_stages`` such devices (messages free).
    """
    if not callable(make_stage):
        raise TypeError(f"make_stage must be a function i -> nn.Module, got {type(make_stage).__name__}")
    n_stages = validate_int("n_stages (stages to time)", n_stages, minimum=1)
    repeats = validate_int("repeats", repeats, minimum=1)
    warmup = validate_int("warmup", warmup, minimum=0)
    threads = validate_int("threads", threads, minimum=1)
    loss_fn = loss_fn or _default_loss
    xs, ys, _ = split_batch(batch, n_micro)
    x, y = xs[0], ys[0]
    dev = x.device   # now(dev) waits for the device's queued work first (a GPU queues it)
    stages = [make_stage(i) for i in range(n_stages)]
    fw: list[list[float]] = [[] for _ in stages]
    bw: list[list[float]] = [[] for _ in stages]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in range(warmup + repeats):
            for st in stages:
                st.zero_grad(set_to_none=True)
            inputs, outputs, f, b = [], [], [0.0] * n_stages, [0.0] * n_stages
            out = x
            for i, st in enumerate(stages):   # each stage's input is a leaf, as a rank receives it
                inp = out.detach().requires_grad_(i > 0 and out.is_floating_point())
                t0 = now(dev)
                out = st(inp)
                f[i] = now(dev) - t0
                inputs.append(inp)
                outputs.append(out)
            t0 = now(dev)
            loss_fn(outputs[-1], y).backward()
            b[-1] = now(dev) - t0
            for i in range(n_stages - 2, -1, -1):   # the gradient the next stage sent back
                t0 = now(dev)
                torch.autograd.backward(outputs[i], inputs[i + 1].grad)
                b[i] = now(dev) - t0
            if k >= warmup:
                for i in range(n_stages):
                    fw[i].append(f[i])
                    bw[i].append(b[i])
    finally:
        torch.set_num_threads(before)
    return {"forward": [statistics.median(v) for v in fw], "backward": [statistics.median(v) for v in bw],
            "rows": int(x.shape[0])}
