"""Where tensors live and how device work is timed: the one home for the GPU path's rules.

Every lab runs on the CPU (gloo) and on GPUs (NCCL). Three rules keep one code path right on both:

1. **Everything a rank makes goes on** ``ctx.device``. An NCCL process group has no backend for CPU
   tensors, and a CUDA model refuses a CPU input. :func:`to_device` moves a tensor, a model or a
   nested batch in one call.
2. **Time device work after a synchronise.** CUDA kernels and NCCL calls return when they are queued,
   not when they finish: a timer read without :func:`synchronize` measures the queueing.
   :func:`now` and :class:`Stopwatch` synchronise the device before they read the clock.
3. **Compare float32 results with TF32 off.** On Ampere and later GPUs cuDNN convolutions (and, if
   enabled, matmuls) round their inputs to TF32 (10 mantissa bits); an equality at 1e-5 against a CPU
   result then fails. :func:`no_tf32` switches TF32 off for a block and restores what was set.

Nothing here starts a process or needs a GPU; on the CPU, synchronising is a no-op.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

__all__ = ["as_device", "group_device", "synchronize", "now", "Stopwatch", "cuda_peak", "no_tf32", "to_device"]


def as_device(device: Any = None):
    """``device`` as a ``torch.device`` (``None`` is the CPU; a context with ``.device`` gives its device)."""
    import torch

    if device is None:
        return torch.device("cpu")
    if hasattr(device, "device") and not isinstance(device, (str, torch.device)):
        device = device.device  # a rank's Context, a tensor, a module's parameter
    return torch.device(device)


def group_device(group: Any = None):
    """The device a collective on ``group`` (None: the default group) needs its tensors on: this process's current
    GPU for NCCL, the CPU for gloo. For helpers that receive a group but no ``ctx`` (a rank function has
    ``ctx.device``: use that). Under the device check (:mod:`labkit.runtime.placement`) gloo's is the stand-in."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    from .runtime import placement

    return torch.device("cpu", 0) if placement.active() else torch.device("cpu")


def synchronize(device: Any = None) -> None:
    """Wait until the work queued on ``device`` has finished (CUDA); nothing to wait for on the CPU."""
    dev = as_device(device)
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def now(device: Any = None) -> float:
    """``time.perf_counter()`` read after :func:`synchronize` of ``device``: the time at which the queued work is
    done."""
    synchronize(device)
    return time.perf_counter()


class Stopwatch:
    """Seconds of device work, synchronised at both ends::

        with Stopwatch(ctx.device) as sw:
            step()
        sw.seconds

    or ``sw = Stopwatch(dev); sw.start(); ...; seconds = sw.stop()``.
    """

    def __init__(self, device: Any = None):
        self.device = as_device(device)
        self.seconds = float("nan")
        self._t0: float | None = None

    def start(self) -> "Stopwatch":
        self._t0 = now(self.device)
        return self

    def stop(self) -> float:
        if self._t0 is None:
            raise RuntimeError("Stopwatch.stop() before start(): call start() first, or use it as a `with` block")
        self.seconds = now(self.device) - self._t0
        self._t0 = None
        return self.seconds

    def __enter__(self) -> "Stopwatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cuda_peak(device: Any, fn) -> tuple[Any, int]:
    """``(fn(), bytes)``: run ``fn`` on a CUDA ``device`` and read the allocator's high-water mark during it, above
    what was allocated when it began (read after a synchronise at both ends: the counters move as kernels run)."""
    import torch

    dev = as_device(device)
    synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    synchronize(dev)
    return out, torch.cuda.max_memory_allocated(dev) - before


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """float32 matmuls and cuDNN convolutions in full float32 inside the block (TF32 off), as set before after it.

    Use it around a float32 equality check that a GPU run must pass (on a CPU it changes nothing)."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def to_device(obj: Any, device: Any) -> Any:
    """``obj`` on ``device``: a tensor, a module (moved in place and returned), or lists, tuples and dicts of them.

    Anything else (numbers, strings, None) is returned as it is."""
    import torch

    dev = as_device(device)
    if isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        moved = [to_device(v, dev) for v in obj]
        return type(obj)(moved) if not hasattr(obj, "_fields") else type(obj)(*moved)
    return obj
