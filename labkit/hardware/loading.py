"""The input pipeline, measured (lab 09): DataLoader workers, prefetching, pinned memory and non-blocking copies
overlapping the loading of the next batch with the compute of this one.

The source article's "pipeline data parallelism" (data fed to the GPUs in a fixed order at fixed times, with
cuDNN for the convolutions) is this: the input pipeline that keeps the device busy. :class:`DecodeLikeDataset`
makes items that cost real CPU work (like decoding and augmenting a JPEG); :func:`input_pipeline` feeds a training
step from a ``DataLoader`` per worker count and records a timeline of load, copy and compute per batch, the
share of loading that ran during a step, the share of loading time the workers saved, and images per second.
cuDNN has nothing to do with loading: it chooses GPU convolution algorithms, and ``torch.backends.cudnn.benchmark``
(measured on a GPU only) lets it time them once per input shape.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .._validate import ArgumentError, validate_int, validate_number
from ..devices import Stopwatch, now
from .step import NOT_ON_CPU, Result, _num_classes, _setup, _skipped, _threads, _timed_row, _where, make_step
from .timing import time_interleaved

__all__ = ["DecodeLikeDataset", "input_pipeline"]


class DecodeLikeDataset(torch.utils.data.Dataset):
    """Images that cost real CPU work to produce, like decoding and augmenting a JPEG.

    Item ``i``: random bytes from seed ``i`` (the "file"), then ``passes`` passes of a 4-neighbour blur
    over a ``side`` x ``side`` x 3 float image (the "decode"), normalised to a CHW tensor. Each item
    returns ``(image, label, start, end)``: ``time.perf_counter()`` around the work, in whichever
    process did it (Linux's monotonic clock is shared by processes, so the main process can place a
    worker's intervals on its own timeline)."""

    def __init__(self, n: int, side: int = 32, passes: int = 20, num_classes: int = 10):
        self.n = validate_int("n", n, minimum=1)
        self.side = validate_int("side", side, minimum=4)
        self.passes = validate_int("passes", passes, minimum=0)
        self.num_classes = validate_int("num_classes", num_classes, minimum=1)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        start = time.perf_counter()
        rng = np.random.default_rng(int(i))
        a = rng.integers(0, 256, (self.side, self.side, 3), dtype=np.uint8).astype(np.float32)
        for _ in range(self.passes):
            a = 0.25 * (np.roll(a, 1, 0) + np.roll(a, -1, 0) + np.roll(a, 1, 1) + np.roll(a, -1, 1))
        a = (a - a.mean()) / (a.std() + 1e-6)
        img = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
        return img, int(rng.integers(self.num_classes)), start, time.perf_counter()

    def item_seconds(self, items: int = 5) -> float:
        """Median seconds of one item in this process."""
        got = []
        for i in range(items):
            _, _, a, b = self[i]
            got.append(b - a)
        return statistics.median(got)


def _collate(items):
    imgs, labels, starts, ends = zip(*items)
    return torch.stack(imgs), torch.tensor(labels), min(starts), max(ends)


def _overlap(intervals, others) -> float:
    """Seconds of ``intervals`` covered by the union of ``others`` (both lists of (start, end))."""
    total = 0.0
    for a, b in intervals:
        for c, d in others:
            total += max(0.0, min(b, d) - max(a, c))
    return total


def _epoch(loader, step, device, non_blocking) -> dict:
    """One pass over ``loader``: every time is :func:`labkit.devices.now` on ``device`` (a copy or a step on a GPU
    ends when it has run), on the clock the workers' ``(start, end)`` use."""
    timeline = []
    t_begin = now(device)
    it = iter(loader)
    for b in range(len(loader)):
        wait = now(device)
        x, y, l0, l1 = next(it)
        c0 = now(device)
        x, y = x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
        c1 = now(device)
        step(x, y)
        k1 = now(device)
        timeline.append({"batch": b, "load_start": l0, "load_end": l1, "wait_start": wait, "copy_start": c0,
                         "copy_end": c1, "compute_start": c1, "compute_end": k1})
    t_end = now(device)
    for row in timeline:  # seconds from the epoch's start
        for key in row:
            if key != "batch":
                row[key] -= t_begin
    loads = [(r["load_start"], r["load_end"]) for r in timeline]
    computes = [(r["compute_start"], r["compute_end"]) for r in timeline]
    load_s = sum(b - a for a, b in loads)
    return {"timeline": timeline, "seconds": t_end - t_begin, "first_batch_s": timeline[0]["copy_start"],
            "load_s": load_s, "compute_s": sum(b - a for a, b in computes),
            "wait_s": sum(r["copy_start"] - r["wait_start"] for r in timeline),
            "overlap": min(1.0, _overlap(loads, computes) / load_s) if load_s > 0 else 0.0}


def input_pipeline(workers=(0, 1, 2), pin_memory=None, prefetch: int = 2, batches=None, batch=None, item_ms=None,
                   model=None, device="cpu", trials=7, quick=True, threads=1, progress=None) -> Result:
    """A DataLoader over :class:`DecodeLikeDataset` feeding a training step, per worker count: images per second,
    a (load, copy, compute) timeline per batch, and two shares of the loading time that answer different questions:

    * ``load during step``: the share of the loading's wall time during which a step was running too (from the
      timeline). It says the two were *concurrent*, not that loading was free: on a core that both need, the
      worker and the step take turns, and each takes longer.
    * ``loading hidden``: the share of the first variant's (``workers=0``'s) loading time that the variant took off
      the epoch, ``epoch_0 (1 - 1 / speed-up) / load_0`` (``epoch_0`` and ``load_0`` medians, the speed-up the
      table's). This one is the gain; it is below 0 when the variant was slower.

    ``item_ms`` (default: chosen so that loading a batch takes about as long as computing it, the case where
    workers help most) sets the dataset's work per item. ``pin_memory`` and non-blocking copies, and
    ``torch.backends.cudnn.benchmark``, are measured on a GPU only."""
    model, batch, device, trials, notes = _setup(model, batch, device, trials, quick, cpu_batch=(8, 32))
    if not isinstance(workers, (list, tuple)) or not workers:
        raise ArgumentError(f"workers must be a non-empty list of worker counts, got {workers!r}")
    workers = [validate_int("workers[]", w, minimum=0) for w in workers]
    prefetch = validate_int("prefetch", prefetch, minimum=1)
    n_batches = validate_int("batches", batches if batches is not None else (5 if quick else 20), minimum=2)
    if quick:
        trials = min(trials, 3)
    if pin_memory not in (None, True, False):
        raise ArgumentError(f"pin_memory must be None (GPU: both, CPU: off), True or False, got {pin_memory!r}")
    pins = ([False, True] if pin_memory is None else [bool(pin_memory)]) if device == "cuda" else [False]
    if device != "cuda":
        notes.append("copy to the device is a no-op on the CPU (the batch already lives in host memory): pinned "
                     "memory and non_blocking copies matter for host-to-GPU transfers only")
    rows: list[dict] = []
    with _threads(threads if device == "cpu" else None):
        step = make_step(model, batch, device)
        side = int(step.x.shape[-1])
        for _ in range(2):
            step()
        compute_s = statistics.median(_time(step, 3, device))  # sizes the loading work: must be the real time
        probe = DecodeLikeDataset(8, side=side, passes=10)
        per_pass = probe.item_seconds() / 10
        target = item_ms / 1e3 if item_ms is not None else compute_s / batch
        if item_ms is not None:
            validate_number("item_ms", item_ms, minimum=0)
        passes = max(1, round(target / max(per_pass, 1e-7)))
        data = DecodeLikeDataset(n_batches * batch, side=side, passes=passes, num_classes=_num_classes(step.layers))
        loaders, runs = {}, {}
        for w in workers:
            for pin in pins:
                name = f"workers={w}" + (", pinned" if pin else "")
                kw = {"prefetch_factor": prefetch, "persistent_workers": True} if w else {}
                loaders[name] = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=w, pin_memory=pin,
                                                            collate_fn=_collate, **kw)
                runs[name] = []

                def run(name=name, pin=pin):
                    runs[name].append(_epoch(loaders[name], step, device, non_blocking=pin))
                runs[name + " fn"] = run
        try:
            timing = time_interleaved({n: runs[n + " fn"] for n in loaders}, trials=trials, warmup=1, device="cpu",
                                      progress=progress)
        finally:
            for ld in loaders.values():
                it = getattr(ld, "_iterator", None)
                if it is not None and hasattr(it, "_shutdown_workers"):
                    it._shutdown_workers()
            loaders.clear()
        images = n_batches * batch
        ref = timing.names[0]  # the first worker count (workers=0 by default): loading in the training loop
        ref_load = statistics.median(e["load_s"] for e in runs[ref])
        for n in timing.names:
            last = runs[n][-1]
            rows.append({"variant": n, "median s": timing.median(n), "images/s": images / timing.median(n),
                         "speed-up": timing.speedup(n), "load s": last["load_s"], "compute s": last["compute_s"],
                         "waiting s": last["wait_s"], "load during step": last["overlap"],
                         "loading hidden": _hidden(timing.median(ref), timing.speedup(n, ref), ref_load)})
        if device == "cuda":
            rows += _cudnn_rows(step, trials)
        else:
            rows.append(_skipped("cudnn.benchmark", "GPU only: cuDNN picks GPU convolution algorithms; it has "
                                                    "nothing to do with loading data", NOT_ON_CPU))
    timed = [r for r in rows if "loading hidden" in r]
    best = max(timed, key=lambda r: r["speed-up"])
    if best is timed[0]:
        outcome = (f"no worker count beat {best['variant']} ("
                   + ", ".join(f"{r['variant']} {r['speed-up']:.2f}x" for r in timed[1:])
                   + "): the workers' loading ran during the steps but took the cores the steps needed")
    else:
        outcome = (f"best {best['images/s']:.0f} with {best['variant']} ({best['speed-up']:.2f}x; "
                   f"{best['loading hidden']:.0%} of {timed[0]['variant']}'s loading time hidden)")
    verdict = (f"{n_batches} batches of {batch}, {passes} blur passes per item ({target * 1e3:.1f} ms, about the "
               f"compute per image): {rows[0]['images/s']:.0f} images/s with {rows[0]['variant']}; {outcome}; on "
               f"{_where(device)}")
    return Result("input pipeline", rows, verdict, device, notes,
                  {"timelines": {n: runs[n][-1]["timeline"] for n in timing.names}, "passes": passes,
                   "item_ms": target * 1e3, "compute_ms_per_batch": compute_s * 1e3}, timing)


def _hidden(ref_s: float, speedup: float, ref_load_s: float) -> float:
    """The share of the reference run's loading time that a variant took off the epoch: the time saved,
    ``ref_s (1 - 1/speedup)``, over ``ref_load_s``. The speed-up is the table's (the median of per-round ratios),
    so the two columns always agree in sign. 1 means loading cost nothing (the epoch took only the compute); 0 no
    gain; below 0 the variant was slower than loading in the training loop (a worker competing with the step for
    a busy core)."""
    return ref_s * (1.0 - 1.0 / speedup) / ref_load_s if ref_load_s > 0 and speedup > 0 else 0.0


def _time(fn, n, device) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn``, synchronised on ``device``."""
    out = []
    for _ in range(n):
        with Stopwatch(device) as sw:
            fn()
        out.append(sw.seconds)
    return out


def _cudnn_rows(step, trials) -> list[dict]:
    def flagged(value):
        def run():
            torch.backends.cudnn.benchmark = value
            step()
        return run

    old = torch.backends.cudnn.benchmark
    try:
        t = time_interleaved({"cudnn.benchmark=False": flagged(False), "cudnn.benchmark=True": flagged(True)},
                             trials=trials, warmup=1, device="cuda")
    finally:
        torch.backends.cudnn.benchmark = old
    return [_timed_row(t, n, step.batch) for n in t.names]
