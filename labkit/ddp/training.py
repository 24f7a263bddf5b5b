"""Lab 02's data and training loop: the 8x8 digits as images, and ``train_steps`` that runs optimiser steps (with
gradient accumulation, timelines and an optional straggler delay) on any wrapper or on a plain module (the
single-process reference). The model is :func:`labkit.models.digits_cnn`."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
from torch import nn

from .._compat import warn_renamed
from ..devices import now
from ..models import digits_cnn
from .wrappers import Timeline, _NoTimeline


def small_cnn(width: int = 8, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """Deprecated: :func:`labkit.models.digits_cnn` (``seed`` and ``dtype`` are keywords there; no default seed)."""
    warn_renamed("labkit.ddp.small_cnn(width, seed, dtype)", "labkit.models.digits_cnn(width, seed=seed, dtype=dtype)")
    return digits_cnn(width, seed=seed, dtype=dtype)


def digits_tensors(dtype=torch.float32, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits as ``(N, 1, 8, 8)`` images in [0, 1] and labels
    (:func:`labkit.data.load_digits`; ``cache``, e.g. ``ctx.cache``, keeps them between pooled jobs)."""
    from ..data import load_digits

    key = ("ddp_digits", str(dtype))
    if cache is not None and key in cache:
        return cache[key]
    x, y = load_digits(as_="images")
    x = x.to(dtype)  # pixels/16 are exact in float32, so this equals computing in dtype directly
    if cache is not None:
        cache[key] = (x, y)
    return x, y


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[tuple], *,
                accum: int = 1, skip_sync: bool = True, timeline: Timeline | None = None,
                delay_s: float = 0.0, loss_fn: Callable | None = None) -> list[float]:
    """Run optimiser steps; each batch is a list of ``accum`` micro-batches ``(x, y)``.

    ``model`` is a wrapper from :func:`make_ddp` or a plain module (single-process reference).
    ``skip_sync``: on the inner micro-steps, skip the gradient averaging (``no_sync``).
    ``delay_s``: extra seconds of "compute" per micro-step (to play a straggler). Returns step times, each read
    with :func:`labkit.devices.now` on the model's device (synchronised: a GPU step ends when its kernels and
    collectives have run); a ``timeline`` without a device takes the model's.
    """
    tl = timeline if timeline is not None else _NoTimeline()
    dev = next((p.device for p in model.parameters()), None)  # None: the CPU
    if tl.device is None:
        tl.device = dev
    loss_fn = loss_fn or nn.functional.cross_entropy
    sync = getattr(model, "sync_grads", None)
    times = []
    for s, micro in enumerate(batches):
        if len(micro) != accum:
            raise ValueError(f"step {s} has {len(micro)} micro-batches but accum={accum}; "
                             "pass accum micro-batches per step")
        t_step = now(dev)
        opt.zero_grad(set_to_none=True)
        for m, (x, y) in enumerate(micro):
            if dev is not None:  # batches come from the host (a dataset, a shard): onto the model's device
                x, y = x.to(dev), y.to(dev)
            inner = m < accum - 1
            guard = model.no_sync() if (inner and skip_sync and sync is not None) else contextlib.nullcontext()
            with guard:
                with tl.span("forward", f"F{s}"):
                    loss = loss_fn(model(x), y) / accum
                if delay_s:
                    with tl.span("sleep", "slow"):
                        time.sleep(delay_s)
                with tl.span("backward", f"B{s}"):
                    loss.backward()
                if sync is not None:
                    sync()
        with tl.span("optimizer", "opt"):
            opt.step()
        times.append(now(dev) - t_step)
    return times


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
