"""Timing variants fairly on a shared, drifting machine (lab 09).

:func:`time_interleaved` runs the variants in rounds, A, B, C, A, B, C, ..., never all of A and then
all of B: a machine whose speed drifts (another process, thermal limits, a laptop's power state)
then slows every variant of a round alike. Each variant's ratio against the first one (the
baseline) is computed inside each round, and the median of those per-round ratios is reported
(the median resists the odd round that a burst of other work disturbed).

On a GPU each call is timed with CUDA events around it and a ``torch.cuda.synchronize()`` after
it: kernels run asynchronously, so a CPU clock would time only the launches. On the CPU,
``time.perf_counter``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .._validate import ArgumentError, validate_choice, validate_int

__all__ = ["Timing", "time_interleaved"]


@dataclass
class Timing:
    """Per-trial seconds of each variant (``seconds[name][round]``), in the order they were given."""

    seconds: dict[str, list[float]]
    device: str = "cpu"
    warmup: int = 1
    order: list[str] = field(default_factory=list)  # every timed call, in the order it ran

    @property
    def names(self) -> list[str]:
        return list(self.seconds)

    @property
    def baseline(self) -> str:
        return self.names[0]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def round_ratios(self, name: str, against: str | None = None) -> list[float]:
        """``name``'s seconds over ``against``'s (default: the baseline), round by round: same round, same
        machine state."""
        base = self.seconds[against or self.baseline]
        return [t / b for t, b in zip(self.seconds[name], base)]

    def ratio(self, name: str, against: str | None = None) -> float:
        """Median over rounds of ``name`` / ``against`` (default: the baseline): > 1 is slower."""
        return statistics.median(self.round_ratios(name, against))

    def speedup(self, name: str, against: str | None = None) -> float:
        """Median over rounds of ``against`` / ``name`` (default: the baseline): > 1 is faster."""
        return statistics.median(1.0 / r for r in self.round_ratios(name, against))

    def rows(self) -> list[dict]:
        """One row per variant: median ms, min ms, time ratio and speed-up against the baseline."""
        return [{"variant": n, "median ms": self.median(n) * 1e3, "min ms": min(self.seconds[n]) * 1e3,
                 f"time / {self.baseline}": self.ratio(n), "speed-up": self.speedup(n),
                 "trials": len(self.seconds[n])} for n in self.names]

    def as_dict(self) -> dict:
        return {"device": self.device, "warmup": self.warmup, "seconds": self.seconds,
                "median_s": {n: self.median(n) for n in self.names},
                "ratio": {n: self.ratio(n) for n in self.names}}


def _timer(device: str):
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def time_interleaved(variants: dict[str, Callable[[], None]], trials: int = 7, warmup: int = 1,
                     device: str = "cpu", progress=None) -> Timing:
    """Time each variant ``trials`` times in interleaved rounds; the first variant is the baseline.

    ``warmup`` untimed rounds run first (also interleaved): first calls pay for allocation, kernel
    selection, caches. ``progress`` is ``None``, ``True`` (a bar) or a callable ``progress(round, trials)``.
    """
    if not isinstance(variants, dict) or not variants:
        raise ArgumentError(f"variants must be a non-empty dict of name -> zero-argument callable, got {variants!r}")
    for name, fn in variants.items():
        if not callable(fn):
            raise ArgumentError(f"variants[{name!r}] must be a zero-argument callable, got {fn!r}")
    trials = validate_int("trials", trials, minimum=1)
    warmup = validate_int("warmup", warmup, minimum=0)
    device = str(device).split(":")[0]
    validate_choice("device", device, ("cpu", "cuda"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device must be 'cpu' here: no CUDA GPU is available, got 'cuda'")
    timer = _timer(device)
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    seconds: dict[str, list[float]] = {n: [] for n in variants}
    order: list[str] = []
    rounds = range(trials)
    if progress is True:
        from ..viz import progress as bar

        rounds = bar(rounds, desc="timing rounds", total=trials)
    for r in rounds:
        for name, fn in variants.items():
            seconds[name].append(timer(fn))
            order.append(name)
        if callable(progress):
            progress(r + 1, trials)
    return Timing(seconds=seconds, device=device, warmup=warmup, order=order)
