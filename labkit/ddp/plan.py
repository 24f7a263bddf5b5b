"""Lab 02's plan (pure): which samples each rank reads, how gradients are grouped into buckets, and the
cost model of one data-parallel step. Nothing here starts a process.

Sharded sampling follows ``DistributedSampler`` exactly (:func:`distributed_shards`); contiguous
chunks use the same cut as the ring all-reduce (:func:`chunk_ranges`); :func:`plan_buckets` is the
bucketing rule of :class:`~labkit.ddp.BucketedDDP`; :func:`model_step` predicts a step's timeline
from the ring all-reduce cost of lab 01 (:func:`labkit.collectives.predict_time`); :func:`union_seconds` and
:func:`exposed_seconds` measure a recorded timeline without counting overlapping bars twice.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .._validate import validate_int
from ..collectives import chunk_bounds, predict_time

MB = 2 ** 20  # torch's DDP counts bucket_cap_mb in MiB too


# ----------------------------------------------------------------------------- sharded sampling
def distributed_shards(n: int, world_size: int, epoch: int = 0, *, shuffle: bool = True,
                       drop_last: bool = False, seed: int = 0) -> list[list[int]]:
    """The sample indices each rank reads in one epoch, as ``DistributedSampler`` computes them.

    Shuffle the whole dataset with a generator seeded by ``seed + epoch`` (the same on every rank,
    so no rank needs to talk to another); make the length a multiple of ``world_size`` by padding
    with the first indices again (``drop_last=False``) or by dropping the tail (``drop_last=True``);
    then rank ``r`` takes every ``world_size``-th index starting at ``r`` (a strided split).
    """
    n, world_size = validate_int("n", n, minimum=1), validate_int("world_size", world_size, minimum=1)
    epoch, seed = validate_int("epoch", epoch, minimum=0), validate_int("seed", seed)
    if drop_last and n < world_size:
        raise ValueError(f"drop_last=True with {n} samples and {world_size} ranks leaves every rank empty; "
                         f"use drop_last=False (pads) or fewer ranks")
    from ..data import shard_indices  # one implementation, tested against DistributedSampler

    return [shard_indices(n, r, world_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
            for r in range(world_size)]


def chunk_ranges(n: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` blocks of ``n`` samples, one per rank, sizes differing by at most 1.

    This is "data chunking" (数据切块): cut the batch or dataset along the *sample* axis into blocks.
    """
    n, world_size = validate_int("n", n, minimum=0), validate_int("world_size", world_size, minimum=1)
    if n < world_size:
        raise ValueError(f"cannot cut {n} samples into {world_size} non-empty chunks; pass world_size <= n")
    return chunk_bounds(n, world_size)  # the same cut the ring all-reduce uses for its chunks


def local_shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s equal, contiguous slice of a global batch (its size must divide evenly)."""
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a tensor, got {type(batch).__name__}")
    if batch.shape[0] % world_size:
        raise ValueError(f"a global batch of {batch.shape[0]} does not split evenly over {world_size} ranks; "
                         f"pass a batch size that is a multiple of {world_size} (equal shards keep the average "
                         f"of the local gradients equal to the full-batch gradient)")
    b = batch.shape[0] // world_size
    return batch[rank * b:(rank + 1) * b]


# ----------------------------------------------------------------------------- buckets and costs
RULES = ("labkit", "torch")
TORCH_FIRST_BUCKET_MB = 1.0  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 1 MiB (DDP without bucket_cap_mb)
TORCH_DEFAULT_BUCKET_MB = 25.0  # DistributedDataParallel's default bucket_cap_mb


def plan_buckets(sizes_bytes: Sequence[int], bucket_mb: float, *, rule: str = "labkit",
                 first_bucket_mb: float | None = None) -> list[list[int]]:
    """Group tensors (given in the order their gradients become ready) into buckets.

    ``rule="labkit"`` (what :class:`~labkit.ddp.BucketedDDP` does by default): a bucket is closed
    *before* adding the next tensor would take it past ``bucket_mb`` MiB, so no bucket exceeds the cap
    unless one tensor alone does (it then gets a bucket of its own).

    ``rule="torch"`` (what ``DistributedDataParallel``'s reducer does, ``_compute_bucket_assignment_by_size``
    in torch/csrc/distributed/c10d/reducer.cpp): add the tensor, then close the bucket *once it has reached*
    the cap, so a bucket can exceed the cap by up to one tensor. The first bucket's cap is
    ``first_bucket_mb`` (default ``bucket_mb``); torch's DDP uses 1 MiB
    (:data:`TORCH_FIRST_BUCKET_MB`) for it only when ``bucket_cap_mb`` is left at its default (25 MiB);
    caps are whole bytes, ``int(mb * 2**20)``. Torch applies this rule twice: at construction, in reverse
    parameter order, and (unless ``find_unused_parameters`` or ``static_graph`` is set, in which case the
    first iteration runs as *one* bucket) again after the first iteration, in the order the gradients
    actually became ready. Pass the sizes in the order you want bucketed.

    Returns lists of positions into ``sizes_bytes`` (one dtype and device assumed; torch keeps one open
    bucket per dtype/device).
    """
    validate_bucket_mb(bucket_mb)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES} ('labkit': close before overflowing; 'torch': close once "
                         f"the cap is reached), got {rule!r}")
    if first_bucket_mb is not None:
        validate_bucket_mb(first_bucket_mb)
    buckets: list[list[int]] = []
    cur, cur_bytes = [], 0
    if rule == "torch":
        cap = int(bucket_mb * MB)
        first = int((bucket_mb if first_bucket_mb is None else first_bucket_mb) * MB)
        for i, s in enumerate(sizes_bytes):
            cur.append(i)
            cur_bytes += s
            if cur_bytes >= (first if not buckets else cap):
                buckets.append(cur)
                cur, cur_bytes = [], 0
    else:
        cap = bucket_mb * MB if first_bucket_mb is None else None
        for i, s in enumerate(sizes_bytes):
            limit = cap if cap is not None else (first_bucket_mb if not buckets else bucket_mb) * MB
            if cur and cur_bytes + s > limit:
                buckets.append(cur)
                cur, cur_bytes = [], 0
            cur.append(i)
            cur_bytes += s
    if cur:
        buckets.append(cur)
    return buckets


def torch_bucket_assignment(sizes_bytes: Sequence[int], bucket_mb: float, first_bucket_mb: float | None = None,
                            dtype=torch.float32) -> list[list[int]]:
    """The buckets torch's own C++ assignment (``torch.distributed._compute_bucket_assignment_by_size``)
    makes of tensors of these sizes, taken in the given order, as torch's reducer rebuilds them after
    the first iteration (limits ``[first cap, cap]``, the tensors' order kept). A reference for
    ``plan_buckets(..., rule="torch")``; starts no process."""
    import torch.distributed as dist

    validate_bucket_mb(bucket_mb)
    es = torch.empty((), dtype=dtype).element_size()
    if any(s % es for s in sizes_bytes):
        raise ValueError(f"every size must be a multiple of the element size ({es} bytes for {dtype})")
    tensors = [torch.empty(s // es, dtype=dtype) for s in sizes_bytes]
    limits = [int((bucket_mb if first_bucket_mb is None else first_bucket_mb) * MB), int(bucket_mb * MB)]
    buckets, _ = dist._compute_bucket_assignment_by_size(tensors, limits, [False] * len(tensors),
                                                         list(range(len(tensors))))
    return [list(b) for b in buckets]


def validate_bucket_mb(bucket_mb) -> float:
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)):
        raise TypeError(f"bucket_mb must be a number of MiB (e.g. 25 or 0.5), got {type(bucket_mb).__name__}")
    if not bucket_mb > 0 or math.isinf(bucket_mb):
        raise ValueError(f"bucket_mb must be a finite number > 0 (MiB per bucket, e.g. 25 as torch's DDP "
                         f"uses), got {bucket_mb!r}")
    return float(bucket_mb)


def ring_allreduce_seconds(nbytes: float, world_size: int, latency_s: float = 50e-6,
                           bandwidth: float = 5e9) -> float:
    """Cost model of a ring all-reduce: 2(n-1) latency hops and 2(n-1)/n * S bytes on each link (lab 01's model)."""
    return predict_time("ring", nbytes, world_size, latency_s, 1.0 / bandwidth)


def model_step(forward_s: float, backward_s: float, grad_bytes, bucket_mb: float, world_size: int, *,
               overlap: bool, latency_s: float = 50e-6, bandwidth: float = 5e9, lane=0) -> tuple[float, list]:
    """Predicted step time and its timeline (a model, not a measurement).

    ``grad_bytes`` is either the total bytes of the gradients, taken as spread evenly over
    ``ceil(grad_bytes / cap)`` equal buckets, or the gradient sizes in bytes in the order backward produces
    them (last parameter first, as :func:`labkit.ddp.lab.bucket_sizes_of` gives them): the buckets are then
    those :class:`~labkit.ddp.BucketedDDP` and :class:`~labkit.ddp.OverlappedDDP` really make
    (:func:`plan_buckets`, labkit's rule), so a gradient larger than the cap is one message, not many.
    Bucket ``i`` is ready once backward has produced the bytes of buckets ``0..i`` (backward time taken as
    proportional to the bytes produced); each all-reduce costs lab 01's ring model
    (``2(n-1)`` latencies and ``2(n-1)/n`` of its bytes); all-reduces run one after another; without
    ``overlap`` they all start after backward. Returns ``(step seconds, events)``; the events say how many
    buckets the model used (one ``allreduce`` event each).
    """
    validate_bucket_mb(bucket_mb)
    if isinstance(grad_bytes, (int, float)) and not isinstance(grad_bytes, bool):
        if not grad_bytes >= 0:
            raise ValueError(f"grad_bytes must be >= 0 (bytes of gradients), got {grad_bytes!r}")
        k = max(1, math.ceil(grad_bytes / (bucket_mb * MB)))
        bucket_bytes = [grad_bytes / k] * k
    else:
        sizes = list(grad_bytes)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0 for s in sizes):
            raise ValueError(f"grad_bytes must be a number of bytes or a non-empty list of gradient sizes in bytes "
                             f"(>= 0, in the order backward produces them), got {grad_bytes!r}")
        bucket_bytes = [sum(sizes[i] for i in b) for b in plan_buckets(sizes, bucket_mb)]
    total = sum(bucket_bytes)
    ev = [{"lane": lane, "kind": "forward", "start": 0.0, "end": forward_s, "label": "F"},
          {"lane": lane, "kind": "backward", "start": forward_s, "end": forward_s + backward_s, "label": "B"}]
    free = forward_s + backward_s if not overlap else 0.0
    done = 0.0
    for i, nbytes in enumerate(bucket_bytes):
        done += nbytes
        ready = forward_s + backward_s * (done / total if total else 1.0)
        start = max(ready, free)
        free = start + ring_allreduce_seconds(nbytes, world_size, latency_s, bandwidth)
        ev.append({"lane": lane, "kind": "allreduce", "start": start, "end": free, "label": f"b{i}"})
    return max(free, forward_s + backward_s), ev


# ----------------------------------------------------------------------------- reading a recorded timeline
def _merged(intervals, window=None) -> list[tuple[float, float]]:
    """The intervals (``(start, end)`` pairs or events), clipped to ``window`` if given, merged where they touch."""
    spans = []
    for iv in intervals:
        start, end = (iv["start"], iv["end"]) if isinstance(iv, dict) else iv
        if end < start:
            raise ValueError(f"an interval ends before it starts: ({start!r}, {end!r}); pass (start, end) pairs "
                             f"or events with start <= end")
        if window is not None:
            start, end = max(start, window[0]), min(end, window[1])
        if end > start:
            spans.append((float(start), float(end)))
    spans.sort()
    out: list[tuple[float, float]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def union_seconds(intervals, window: tuple[float, float] | None = None) -> float:
    """Seconds covered by at least one interval: ``(start, end)`` pairs or timeline events.

    Asynchronous all-reduces run at the same time as each other; *summing* their bars counts the shared time
    twice and can exceed the step they belong to. The union cannot exceed the span it lies in. ``window``
    clips every interval to ``(start, end)`` first.
    """
    return sum(end - start for start, end in _merged(intervals, window))


def exposed_seconds(comm, compute, window: tuple[float, float] | None = None) -> float:
    """Seconds in which communication runs and no computation does: the communication that overlap did not
    hide (``union(comm) - union(comm and compute)``). At most :func:`union_seconds` of ``comm``."""
    c = _merged(comm, window)
    busy = _merged(compute, window)
    hidden, j = 0.0, 0
    for start, end in c:
        while j < len(busy) and busy[j][1] <= start:
            j += 1
        k = j
        while k < len(busy) and busy[k][0] < end:
            hidden += min(end, busy[k][1]) - max(start, busy[k][0])
            k += 1
    return sum(end - start for start, end in c) - hidden
