"""Data parallelism from scratch: sharded sampling, three DDP wrappers, accumulation, timelines.

Every rank holds a full copy of the model and sees a different shard of each batch. After
``loss.backward()`` each rank has the gradient of *its* shard; averaging the gradients over the
ranks gives exactly the gradient of the whole batch (when each rank's loss is the mean over an
equally sized shard), so every replica takes the same optimizer step and the copies never drift:

    g = (1/N) * sum_r g_r                  (one all-reduce of the gradients per step)

Three wrappers do that averaging, from the simplest to the one torch's DDP uses:

* :class:`NaiveDDP`      - after backward, one blocking all-reduce per parameter tensor.
* :class:`BucketedDDP`   - after backward, gradients are packed into flat buckets of at most
  ``bucket_mb`` MiB, one all-reduce per bucket (fewer, larger messages).
* :class:`OverlappedDDP` - a gradient hook notices when a bucket is complete *during* backward and
  starts its all-reduce asynchronously, so communication overlaps the rest of backward.

All three share one loop: ``loss.backward(); ddp.sync_grads(); opt.step()``; ``with
ddp.no_sync():`` skips the averaging on the inner steps of gradient accumulation.
Rank functions (equivalence, timelines, stragglers) live in :mod:`labkit.ddp_lab`; the
throughput benchmark in :mod:`labkit.ddp_bench`.
"""
from __future__ import annotations

import contextlib
import math
import time
import zlib
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

ALGORITHMS = ("naive", "bucketed", "overlapped", "torch")
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
    for name, v in (("n", n), ("world_size", world_size), ("epoch", epoch), ("seed", seed)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if n < 1 or world_size < 1 or epoch < 0:
        raise ValueError(f"need n >= 1, world_size >= 1 and epoch >= 0, got n={n}, world_size={world_size}, "
                         f"epoch={epoch}")
    if drop_last and n < world_size:
        raise ValueError(f"drop_last=True with {n} samples and {world_size} ranks leaves every rank empty; "
                         f"use drop_last=False (pads) or fewer ranks")
    from .data import shard_indices  # one implementation, tested against DistributedSampler

    return [shard_indices(n, r, world_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
            for r in range(world_size)]


def chunk_ranges(n: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` blocks of ``n`` samples, one per rank, sizes differing by at most 1.

    This is "data chunking" (数据切块): cut the batch or dataset along the *sample* axis into blocks.
    """
    if not isinstance(n, int) or not isinstance(world_size, int):
        raise TypeError("n and world_size must be ints")
    if world_size < 1 or n < world_size:
        raise ValueError(f"cannot cut {n} samples into {world_size} non-empty chunks; pass world_size <= n")
    from .collectives import chunk_bounds  # the same cut the ring all-reduce uses for its chunks

    return chunk_bounds(n, world_size)


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
def plan_buckets(sizes_bytes: Sequence[int], bucket_mb: float) -> list[list[int]]:
    """Group tensors (given in the order their gradients become ready) into buckets.

    A bucket is closed when adding the next tensor would take it past ``bucket_mb`` MiB; a tensor
    larger than a bucket gets a bucket of its own. Returns lists of positions into ``sizes_bytes``.
    """
    check_bucket_mb(bucket_mb)
    cap = bucket_mb * MB
    buckets: list[list[int]] = []
    cur, cur_bytes = [], 0
    for i, s in enumerate(sizes_bytes):
        if cur and cur_bytes + s > cap:
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += s
    if cur:
        buckets.append(cur)
    return buckets


def check_bucket_mb(bucket_mb) -> float:
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)):
        raise TypeError(f"bucket_mb must be a number of MiB (e.g. 25 or 0.5), got {type(bucket_mb).__name__}")
    if not bucket_mb > 0 or math.isinf(bucket_mb):
        raise ValueError(f"bucket_mb must be a finite number > 0 (MiB per bucket, e.g. 25 as torch's DDP "
                         f"uses), got {bucket_mb!r}")
    return float(bucket_mb)


def ring_allreduce_seconds(nbytes: float, world_size: int, latency_s: float = 50e-6,
                           bandwidth: float = 5e9) -> float:
    """Cost model of a ring all-reduce: 2(n-1) latency hops and 2(n-1)/n * S bytes on each link."""
    if world_size <= 1:
        return 0.0
    return 2 * (world_size - 1) * latency_s + 2 * (world_size - 1) / world_size * nbytes / bandwidth


def model_step(forward_s: float, backward_s: float, grad_bytes: float, bucket_mb: float, world_size: int, *,
               overlap: bool, latency_s: float = 50e-6, bandwidth: float = 5e9, lane=0) -> tuple[float, list]:
    """Predicted step time and its timeline for evenly spread gradients (a model, not a measurement).

    Bucket ``i``'s gradients are ready after the fraction ``(i+1)/k`` of backward; all-reduces run
    one after another; without overlap they all start after backward.
    """
    check_bucket_mb(bucket_mb)
    k = max(1, math.ceil(grad_bytes / (bucket_mb * MB)))
    per = ring_allreduce_seconds(grad_bytes / k, world_size, latency_s, bandwidth)
    ev = [{"lane": lane, "kind": "forward", "start": 0.0, "end": forward_s, "label": "F"},
          {"lane": lane, "kind": "backward", "start": forward_s, "end": forward_s + backward_s, "label": "B"}]
    free = forward_s + backward_s if not overlap else 0.0
    for i in range(k):
        ready = forward_s + backward_s * (i + 1) / k
        start = max(ready, free)
        free = start + per
        ev.append({"lane": lane, "kind": "allreduce", "start": start, "end": free, "label": f"b{i}"})
    return max(free, forward_s + backward_s), ev


# ----------------------------------------------------------------------------- timelines
class Timeline:
    """Collects ``{"lane", "kind", "start", "end", "label"}`` events (perf_counter seconds) for one rank."""

    def __init__(self, lane: int = 0):
        self.lane = lane
        self.events: list[dict] = []

    def add(self, kind: str, start: float, end: float, label: str = "") -> None:
        self.events.append({"lane": self.lane, "kind": kind, "start": start, "end": end, "label": label})

    @contextlib.contextmanager
    def span(self, kind: str, label: str = ""):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(kind, t0, time.perf_counter(), label)


class _NoTimeline(Timeline):
    def add(self, *a, **k):
        pass


# ----------------------------------------------------------------------------- the wrappers
def _require_dist(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("no process group: run this inside a rank function started by labkit.launch(fn, "
                           "world_size=N) (or torchrun), where torch.distributed is already initialised")
    return dist.get_world_size(group)


def _verify_same_model(params: list, group) -> None:
    """Every rank must wrap the same architecture; compare a signature with a max and a min all-reduce."""
    sig = [len(params), sum(p.numel() for p in params)]
    sig.append(sum((i + 1) * p.numel() for i, p in enumerate(params)) % (2 ** 61))
    sig.append(sum((i + 1) * (zlib.crc32(str(p.dtype).encode()) % 9973) for i, p in enumerate(params)))
    hi = torch.tensor(sig, dtype=torch.int64, device=params[0].device)
    lo = hi.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    if not torch.equal(hi, lo):
        raise ValueError(f"the model differs across ranks (this rank: {len(params)} parameter tensors, "
                         f"{sig[1]} values; the ranks disagree). Build the same model, with the same shapes and "
                         f"dtypes, on every rank")


class _DDPBase(nn.Module):
    """What the three wrappers share: checks, the initial broadcast, ``no_sync``, statistics."""

    def __init__(self, module: nn.Module, *, group=None, timeline: Timeline | None = None,
                 broadcast: bool = True):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"wrap an nn.Module (the model), got {type(module).__name__}")
        self.world_size = _require_dist(group)
        self.module = module
        self.group = group
        self._params = [p for p in module.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("the model has no parameters that require gradients: nothing to synchronise")
        self.timeline = timeline if timeline is not None else _NoTimeline()
        self.stats = {"allreduce_calls": 0, "allreduce_bytes": 0, "sync_seconds": 0.0}
        self._sync = True
        _verify_same_model(self._params, group)
        if broadcast:  # start from identical replicas, as torch's DDP does
            src = dist.get_global_rank(group, 0) if group is not None else 0
            with torch.no_grad():
                for t in list(self._params) + list(module.buffers()):
                    dist.broadcast(t.data, src=src, group=group)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Inside this block ``sync_grads`` does nothing: gradients just accumulate locally."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def _grad(self, p):
        if p.grad is None:  # a parameter unused this step contributes zeros (every rank must still reduce)
            p.grad = torch.zeros_like(p)
        return p.grad

    def _count(self, t: torch.Tensor):
        self.stats["allreduce_calls"] += 1
        self.stats["allreduce_bytes"] += t.numel() * t.element_size()

    def sync_grads(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class NaiveDDP(_DDPBase):
    """After backward, all-reduce every gradient tensor on its own, then divide by the world size."""

    def sync_grads(self) -> None:
        if not self._sync:
            return
        t_sync = time.perf_counter()
        for i, p in enumerate(self._params):
            g = self._grad(p)
            buf = g if g.is_contiguous() else g.contiguous()
            t0 = time.perf_counter()
            dist.all_reduce(buf, group=self.group)
            self.timeline.add("allreduce", t0, time.perf_counter(), f"p{i}")
            self._count(buf)
            buf.div_(self.world_size)
            if buf is not g:
                g.copy_(buf)
        self.stats["sync_seconds"] += time.perf_counter() - t_sync


class BucketedDDP(_DDPBase):
    """After backward, pack gradients into flat buckets of at most ``bucket_mb`` MiB; one all-reduce each.

    Parameters are bucketed in reverse registration order (roughly the order backward produces
    their gradients), and a bucket never mixes dtypes or devices.
    """

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, **kwargs):
        check_bucket_mb(bucket_mb)
        super().__init__(module, **kwargs)
        self.bucket_mb = float(bucket_mb)
        order = list(reversed(self._params))
        self.buckets: list[list[nn.Parameter]] = []
        start = 0
        for i in range(1, len(order) + 1):  # split where dtype/device changes, then by size
            if i == len(order) or (order[i].dtype, order[i].device) != (order[start].dtype, order[start].device):
                run = order[start:i]
                sizes = [p.numel() * p.element_size() for p in run]
                self.buckets += [[run[j] for j in b] for b in plan_buckets(sizes, bucket_mb)]
                start = i
        self._flat = [torch.zeros(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device)
                      for b in self.buckets]

    def _pack(self, i: int) -> torch.Tensor:
        flat, off = self._flat[i], 0
        for p in self.buckets[i]:
            n = p.numel()
            flat[off:off + n].copy_(self._grad(p).reshape(-1))
            off += n
        return flat

    def _unpack(self, i: int) -> None:
        flat, off = self._flat[i], 0
        flat.div_(self.world_size)
        for p in self.buckets[i]:
            n = p.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n

    def sync_grads(self) -> None:
        if not self._sync:
            return
        t_sync = time.perf_counter()
        for i in range(len(self.buckets)):
            flat = self._pack(i)
            t0 = time.perf_counter()
            dist.all_reduce(flat, group=self.group)
            self.timeline.add("allreduce", t0, time.perf_counter(), f"b{i}")
            self._count(flat)
            self._unpack(i)
        self.stats["sync_seconds"] += time.perf_counter() - t_sync


class OverlappedDDP(BucketedDDP):
    """Buckets all-reduced asynchronously from gradient hooks while backward is still running.

    A ``register_post_accumulate_grad_hook`` on each parameter counts down its bucket; when a
    bucket is complete its all-reduce starts (``async_op=True``), in bucket order on every rank so
    the ranks' collectives match. ``sync_grads`` only waits for what is still in flight.
    """

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, **kwargs):
        super().__init__(module, bucket_mb, **kwargs)
        self._bucket_of = {}
        for i, b in enumerate(self.buckets):
            for p in b:
                self._bucket_of[p] = i
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        self._reset()

    def _reset(self):
        self._missing = [len(b) for b in self.buckets]
        self._next = 0
        self._works: list = []

    def _on_grad(self, p) -> None:
        if not self._sync:
            return
        i = self._bucket_of[p]
        if i < self._next:
            raise RuntimeError("a gradient arrived for a bucket already being reduced: call ddp.sync_grads() "
                               "after every backward, or wrap the inner accumulation steps in ddp.no_sync()")
        self._missing[i] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] <= 0:
            self._launch(self._next)
            self._next += 1

    def _launch(self, i: int) -> None:
        flat = self._pack(i)
        t0 = time.perf_counter()
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._count(flat)
        if not isinstance(self.timeline, _NoTimeline):
            tl, label = self.timeline, f"b{i}"
            work.get_future().add_done_callback(lambda _f: tl.add("allreduce", t0, time.perf_counter(), label))
        self._works.append(work)

    def sync_grads(self) -> None:
        if not self._sync:
            return
        t_sync = time.perf_counter()
        while self._next < len(self.buckets):  # buckets with unused parameters: reduce them now
            self._launch(self._next)
            self._next += 1
        t0 = time.perf_counter()
        for w in self._works:
            w.wait()
        self.timeline.add("wait", t0, time.perf_counter(), "wait")
        for i in range(len(self.buckets)):
            self._unpack(i)
        self._reset()
        self.stats["sync_seconds"] += time.perf_counter() - t_sync

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class TorchDDP(_DDPBase):
    """``torch.nn.parallel.DistributedDataParallel`` behind the same ``sync_grads``/``no_sync`` interface.

    Its reducer averages inside ``backward`` (C++ hooks, buckets, overlap), so ``sync_grads`` is a no-op.
    """

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, *, group=None, timeline=None, **_):
        check_bucket_mb(bucket_mb)
        super().__init__(module, group=group, timeline=timeline, broadcast=False)
        dev = next(module.parameters()).device
        self.ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=[dev] if dev.type == "cuda" else None, bucket_cap_mb=bucket_mb,
            process_group=group)

    def forward(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def no_sync(self):
        return self.ddp.no_sync()

    def sync_grads(self) -> None:
        pass


def make_ddp(algorithm: str, module: nn.Module, bucket_mb: float = 25.0, **kwargs) -> _DDPBase:
    """Wrap ``module`` with ``"naive"``, ``"bucketed"``, ``"overlapped"`` or ``"torch"`` (DistributedDataParallel)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: pass one of {', '.join(map(repr, ALGORITHMS))}")
    if algorithm == "naive":
        check_bucket_mb(bucket_mb)
        return NaiveDDP(module, **kwargs)
    cls = {"bucketed": BucketedDDP, "overlapped": OverlappedDDP, "torch": TorchDDP}[algorithm]
    return cls(module, bucket_mb, **kwargs)


# ----------------------------------------------------------------------------- model, data, training
def small_cnn(width: int = 8, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """A small CNN for 1x8x8 digit images: two convolutions, a pooling, two linear layers."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1 (channels of the first convolution), got {width!r}")
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    return model.to(dtype)


def _read_digits():
    """scikit-learn's digits file read with numpy: importing sklearn costs seconds on every fresh rank."""
    import importlib.util
    import os

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.exists(path):
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # a layout we do not know: the official loader

    d = load_digits()
    return d.data, d.target


def digits_tensors(dtype=torch.float32, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits as ``(N, 1, 8, 8)`` images in [0, 1] and labels."""
    key = ("ddp_digits", str(dtype))
    if cache is not None and key in cache:
        return cache[key]
    images, target = _read_digits()
    x = torch.tensor(images / 16.0, dtype=dtype).reshape(-1, 1, 8, 8)
    y = torch.tensor(target, dtype=torch.long)
    if cache is not None:
        cache[key] = (x, y)
    return x, y


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[tuple], *,
                accum: int = 1, skip_sync: bool = True, timeline: Timeline | None = None,
                delay_s: float = 0.0, loss_fn: Callable | None = None) -> list[float]:
    """Run optimizer steps; each batch is a list of ``accum`` micro-batches ``(x, y)``.

    ``model`` is a wrapper from :func:`make_ddp` or a plain module (single-process reference).
    ``skip_sync``: on the inner micro-steps, skip the gradient averaging (``no_sync``).
    ``delay_s``: extra seconds of "compute" per micro-step (to play a straggler). Returns step times.
    """
    tl = timeline if timeline is not None else _NoTimeline()
    loss_fn = loss_fn or nn.functional.cross_entropy
    sync = getattr(model, "sync_grads", None)
    times = []
    for s, micro in enumerate(batches):
        if len(micro) != accum:
            raise ValueError(f"step {s} has {len(micro)} micro-batches but accum={accum}; pass accum micro-batches per step")
        t_step = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for m, (x, y) in enumerate(micro):
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
        times.append(time.perf_counter() - t_step)
    return times


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()


def tour() -> list[dict]:
    """The lab's headless quick path (see :func:`labkit.ddp_lab.tour`)."""
    from .ddp_lab import tour as _tour

    return _tour()


def bench_main(argv: list[str] | None = None) -> int:
    """``python -m labkit bench ddp`` (see :mod:`labkit.ddp_bench`)."""
    from .ddp_bench import bench_main as _main

    return _main(argv)
