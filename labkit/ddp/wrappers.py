"""Three DDP wrappers written from scratch, side by side on one base class, and torch's own behind the same API.

Every rank holds a full copy of the model and sees a different shard of each batch. After
``loss.backward()`` each rank has the gradient of *its* shard; averaging the gradients over the
ranks gives exactly the gradient of the whole batch (when each rank's loss is the mean over an
equally sized shard), so every replica takes the same optimiser step and the copies never drift:

    g = (1/N) * sum_r g_r                  (one all-reduce of the gradients per step)

Three wrappers do that averaging, from the simplest to the one torch's DDP uses:

* :class:`NaiveDDP`      - after backward, one blocking all-reduce per parameter tensor.
* :class:`BucketedDDP`   - after backward, gradients are packed into flat buckets of at most
  ``bucket_mb`` MiB, one all-reduce per bucket (fewer, larger messages).
* :class:`OverlappedDDP` - a gradient hook notices when a bucket is complete *during* backward and
  starts its all-reduce asynchronously, so communication overlaps the rest of backward.

All three share one loop: ``loss.backward(); ddp.sync_grads(); opt.step()``; ``with
ddp.no_sync():`` skips the averaging on the inner steps of gradient accumulation.

As torch's DDP does, every wrapper broadcasts *every* parameter (frozen ones too) and every buffer
from rank 0 when it wraps the model, and broadcasts the buffers again before each training forward
(``broadcast_buffers=True``: BatchNorm's running statistics follow rank 0). A parameter that gets no
gradient in a step is reduced as zeros; with ``find_unused_parameters=True`` the ranks also all-reduce
a used/unused map after the gradients and a parameter no rank used keeps ``grad=None`` (so the
optimiser skips it, as with torch's DDP).
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn

from .._compat import moved_names
from ..collectives import ranks_agree
from ..devices import now
from ..distops import require_dist
from .plan import plan_buckets, validate_bucket_mb

#: The names :func:`make_ddp` takes, one per wrapper (lab 01's ``labkit.collectives.ALGORITHMS`` are all-reduces).
WRAPPERS = ("naive", "bucketed", "overlapped", "torch")

__getattr__ = moved_names(__name__, {"ALGORITHMS": "labkit.ddp.wrappers:WRAPPERS"})


# ----------------------------------------------------------------------------- timelines
class Timeline:
    """Collects ``{"lane", "kind", "start", "end", "label"}`` events (perf_counter seconds) for one rank.

    Its clock is :func:`labkit.devices.now` on ``device``: on a GPU a span ends when its kernels and collectives
    have run, not when they were queued. A timeline given to a wrapper (or to ``train_steps``) without a device
    takes the model's."""

    def __init__(self, lane: int = 0, device=None):
        self.lane = lane
        self.device = device
        self.events: list[dict] = []

    def now(self) -> float:
        return now(self.device)

    def add(self, kind: str, start: float, end: float, label: str = "") -> None:
        self.events.append({"lane": self.lane, "kind": kind, "start": start, "end": end, "label": label})

    @contextlib.contextmanager
    def span(self, kind: str, label: str = ""):
        t0 = self.now()
        try:
            yield
        finally:
            self.add(kind, t0, self.now(), label)


class _NoTimeline(Timeline):
    """Records nothing, and reads no clock: no synchronise in the middle of an untimed step."""

    def now(self) -> float:
        return 0.0

    def add(self, *a, **k):
        pass

    @contextlib.contextmanager
    def span(self, kind: str, label: str = ""):
        yield


# ----------------------------------------------------------------------------- the wrappers
def _verify_same_model(params: list, group) -> None:
    """Every rank must wrap the same architecture: compare a signature of the parameters across ranks."""
    import zlib

    sig = [len(params), sum(p.numel() for p in params)]
    sig.append(sum((i + 1) * p.numel() for i, p in enumerate(params)) % (2 ** 61))
    sig.append(sum((i + 1) * (zlib.crc32(str(p.dtype).encode()) % 9973) for i, p in enumerate(params)))
    if not ranks_agree(sig, group=group):
        raise ValueError(f"the model differs across ranks (this rank: {len(params)} parameter tensors, "
                         f"{sig[1]} values; the ranks disagree). Build the same model, with the same shapes and "
                         f"dtypes, on every rank")


class _DDPBase(nn.Module):
    """What the three wrappers share: checks, the initial broadcast, ``no_sync``, statistics."""

    def __init__(self, module: nn.Module, *, group=None, timeline: Timeline | None = None,
                 broadcast: bool = True, broadcast_buffers: bool = True, find_unused_parameters: bool = False):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"wrap an nn.Module (the model), got {type(module).__name__}")
        self.world_size = require_dist(group)
        self.module = module
        self.group = group
        self._params = [p for p in module.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("the model has no parameters that require gradients: nothing to synchronise")
        self.device = self._params[0].device
        self.timeline = timeline if timeline is not None else _NoTimeline()
        if self.timeline.device is None:
            self.timeline.device = self.device
        self.stats = {"allreduce_calls": 0, "allreduce_bytes": 0, "sync_seconds": 0.0}
        self._sync = True
        self.broadcast_buffers = bool(broadcast_buffers)
        self.find_unused_parameters = bool(find_unused_parameters)
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        _verify_same_model(list(module.parameters()), group)
        if broadcast:  # start from identical replicas: every parameter (frozen too) and buffer, as torch's DDP
            with torch.no_grad():
                for t in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(t.data, src=self._src, group=group)

    def forward(self, *args, **kwargs):
        if self.broadcast_buffers and self.module.training and torch.is_grad_enabled():
            with torch.no_grad():  # as torch's DDP: rank 0's buffers (BatchNorm statistics) before each forward
                for b in self.module.buffers():
                    dist.broadcast(b.data, src=self._src, group=self.group)
        return self.module(*args, **kwargs)

    def _used_mask(self):
        """Which parameters got a gradient on this rank (read before any is replaced by zeros)."""
        if not self.find_unused_parameters:
            return None
        return torch.tensor([p.grad is not None for p in self._params], dtype=torch.int32,
                            device=self._params[0].device)

    def _drop_unused(self, used) -> None:
        """After the gradients: parameters that no rank used get ``grad=None`` again (torch's DDP leaves them)."""
        if used is None:
            return
        dist.all_reduce(used, group=self.group)
        self._count(used)
        for p, u in zip(self._params, used.tolist()):
            if u == 0:
                p.grad = None

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
        t_sync = now(self.device)
        used = self._used_mask()
        for i, p in enumerate(self._params):
            g = self._grad(p)
            buf = g if g.is_contiguous() else g.contiguous()
            t0 = self.timeline.now()
            dist.all_reduce(buf, group=self.group)
            self.timeline.add("allreduce", t0, self.timeline.now(), f"p{i}")
            self._count(buf)
            buf.div_(self.world_size)
            if buf is not g:
                g.copy_(buf)
        self._drop_unused(used)
        self.stats["sync_seconds"] += now(self.device) - t_sync


class BucketedDDP(_DDPBase):
    """After backward, pack gradients into flat buckets of at most ``bucket_mb`` MiB; one all-reduce each.

    Parameters are bucketed in reverse registration order (roughly the order backward produces
    their gradients), and a bucket never mixes dtypes or devices. ``rule`` is the bucketing rule of
    :func:`~labkit.ddp.plan_buckets`: ``"labkit"`` (close before overflowing, the default) or ``"torch"``
    (close once the cap is reached, torch's reducer's rule; ``first_bucket_mb`` caps the first bucket).
    """

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, *, rule: str = "labkit",
                 first_bucket_mb: float | None = None, **kwargs):
        validate_bucket_mb(bucket_mb)
        plan_buckets([1], bucket_mb, rule=rule, first_bucket_mb=first_bucket_mb)  # validates rule / first cap
        super().__init__(module, **kwargs)
        self.bucket_mb = float(bucket_mb)
        self.rule = rule
        order = list(reversed(self._params))
        self.buckets: list[list[nn.Parameter]] = []
        start = 0
        for i in range(1, len(order) + 1):  # split where dtype/device changes, then by size
            if i == len(order) or (order[i].dtype, order[i].device) != (order[start].dtype, order[start].device):
                run = order[start:i]
                sizes = [p.numel() * p.element_size() for p in run]
                plan = plan_buckets(sizes, bucket_mb, rule=rule,
                                    first_bucket_mb=first_bucket_mb if not self.buckets else None)
                self.buckets += [[run[j] for j in b] for b in plan]
                start = i
        self._flat = [torch.zeros(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device)
                      for b in self.buckets]

    def _pack(self, i: int) -> torch.Tensor:
        """Copy bucket ``i``'s gradients into its flat buffer, end to end: one message instead of one per tensor."""
        flat, off = self._flat[i], 0  # the buffer was allocated once, in __init__: no allocation per step
        for p in self.buckets[i]:
            n = p.numel()
            flat[off:off + n].copy_(self._grad(p).reshape(-1))  # _grad: zeros for a parameter unused this step
            off += n
        return flat

    def _unpack(self, i: int) -> None:
        """After the all-reduce: the buffer holds the sum over ranks; divide once, copy each slice back."""
        flat, off = self._flat[i], 0
        flat.div_(self.world_size)  # sum -> mean, on the whole bucket at once (one kernel, not one per tensor)
        for p in self.buckets[i]:
            n = p.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))  # the same offsets _pack used, so each slice goes home
            off += n

    def sync_grads(self) -> None:
        if not self._sync:
            return
        t_sync = now(self.device)
        used = self._used_mask()
        for i in range(len(self.buckets)):  # in bucket order: every rank issues the same collectives in one order
            flat = self._pack(i)
            t0 = self.timeline.now()
            dist.all_reduce(flat, group=self.group)  # blocking: backward is over, nothing is left to overlap
            self.timeline.add("allreduce", t0, self.timeline.now(), f"b{i}")
            self._count(flat)
            self._unpack(i)
        self._drop_unused(used)
        self.stats["sync_seconds"] += now(self.device) - t_sync


class OverlappedDDP(BucketedDDP):
    """Buckets all-reduced asynchronously from gradient hooks while backward is still running.

    A ``register_post_accumulate_grad_hook`` on each parameter counts down its bucket; when a
    bucket is complete its all-reduce starts (``async_op=True``), in bucket order on every rank so
    the ranks' collectives match. ``sync_grads`` only waits for what is still in flight.

    Its bucket spans are read with the host's clock, not :func:`labkit.devices.now`: they start inside an
    autograd hook, where a synchronise would stall the very backward the all-reduce is meant to overlap, and end
    in the work's completion callback (on gloo, when the all-reduce is done; on NCCL, when it is queued). The
    "wait" span and ``sync_seconds`` start when the host reaches ``sync_grads`` and end synchronised.
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
        """Before each backward: every bucket waits for all its gradients, none is launched, nothing in flight."""
        self._missing = [len(b) for b in self.buckets]  # gradients each bucket still waits for
        self._next = 0  # the next bucket to launch: buckets start strictly in order
        self._works: list = []  # the all-reduces in flight, waited on in sync_grads

    def _on_grad(self, p) -> None:
        """Autograd calls this when ``p.grad`` has been accumulated, in the middle of backward."""
        if not self._sync:  # inside no_sync(): gradients accumulate locally, nothing is sent
            return
        i = self._bucket_of[p]
        if i < self._next:  # its bucket was packed and sent already: this gradient would be lost
            raise RuntimeError("a gradient arrived for a bucket already being reduced: call ddp.sync_grads() "
                               "after every backward, or wrap the inner accumulation steps in ddp.no_sync()")
        self._missing[i] -= 1
        # Launch every bucket that is complete, but only from the front: if bucket 2 fills before bucket 1, it waits.
        # Collectives must be issued in the same order on every rank (they are matched by order, not by name), and
        # the order in which gradients become ready can differ between ranks; the bucket order cannot.
        while self._next < len(self.buckets) and self._missing[self._next] <= 0:
            self._launch(self._next)
            self._next += 1

    def _launch(self, i: int) -> None:
        """Start bucket ``i``'s all-reduce and return at once; backward goes on computing earlier layers' gradients."""
        flat = self._pack(i)  # into the bucket's own buffer: the all-reduce works on it while autograd goes on
        t0 = time.perf_counter()  # the host's clock: a device synchronise here would stall the backward
        work = dist.all_reduce(flat, group=self.group, async_op=True)  # in flight while backward continues
        self._count(flat)
        if not isinstance(self.timeline, _NoTimeline):  # the span ends when the work completes, read in its callback
            tl, label = self.timeline, f"b{i}"
            work.get_future().add_done_callback(lambda _f: tl.add("allreduce", t0, time.perf_counter(), label))
        self._works.append(work)  # sync_grads waits on it; the result is copied back there, not here

    def sync_grads(self) -> None:
        if not self._sync:
            return
        t_sync = time.perf_counter()  # not synchronised: that would wait for the all-reduces still in flight
        used = self._used_mask()  # before the buckets still open fill their missing gradients with zeros
        while self._next < len(self.buckets):  # buckets with unused parameters: reduce them now
            self._launch(self._next)
            self._next += 1
        t0 = time.perf_counter()
        for w in self._works:  # what overlap did not hide is this wait: the all-reduces still running
            w.wait()
        self.timeline.add("wait", t0, self.timeline.now(), "wait")
        for i in range(len(self.buckets)):  # only now: the buffers hold the sums, and backward has written every grad
            self._unpack(i)
        self._drop_unused(used)  # after every bucket's all-reduce, in the same order on every rank
        self._reset()  # ready for the next backward
        self.stats["sync_seconds"] += now(self.device) - t_sync

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class TorchDDP(_DDPBase):
    """``torch.nn.parallel.DistributedDataParallel`` behind the same ``sync_grads``/``no_sync`` interface.

    Its reducer averages inside ``backward`` (C++ hooks, buckets, overlap), so ``sync_grads`` is a no-op.
    A communication hook (``register_comm_hook``) wraps the default all-reduce and counts what torch really
    sends: ``stats`` gets the calls and bytes of every bucket, and ``bucket_log`` the buckets of the last
    backward as ``(index, bytes, parameter positions)`` in the order the hook saw them. ``bucket_mb=None``
    keeps torch's defaults (25 MiB, first bucket 1 MiB).
    """

    def __init__(self, module: nn.Module, bucket_mb: float | None = 25.0, *, group=None, timeline=None,
                 find_unused_parameters: bool = False, broadcast_buffers: bool = True, count: bool = True, **_):
        if bucket_mb is not None:
            validate_bucket_mb(bucket_mb)
        super().__init__(module, group=group, timeline=timeline, broadcast=False, broadcast_buffers=False)
        dev = next(module.parameters()).device
        kw = {} if bucket_mb is None else dict(bucket_cap_mb=bucket_mb)
        self.ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=[dev] if dev.type == "cuda" else None, process_group=group,
            find_unused_parameters=find_unused_parameters, broadcast_buffers=broadcast_buffers, **kw)
        self.bucket_log: list[tuple[int, int, list[int]]] = []
        if count:
            self._pos = {id(p): i for i, p in enumerate(module.parameters())}
            self.ddp.register_comm_hook(None, self._hook)

    def _hook(self, _state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if bucket.index() == 0:
            self.bucket_log = []
        buf = bucket.buffer()
        self._count(buf)
        self.bucket_log.append((bucket.index(), buf.numel() * buf.element_size(),
                                [self._pos[id(p)] for p in bucket.parameters()]))
        return allreduce_hook(self.group, bucket)  # the default: divide by the world size, all-reduce

    def forward(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def no_sync(self):
        return self.ddp.no_sync()

    def sync_grads(self) -> None:
        pass


def make_ddp(algorithm: str, module: nn.Module, bucket_mb: float = 25.0, **kwargs) -> _DDPBase:
    """Wrap ``module`` with ``"naive"``, ``"bucketed"``, ``"overlapped"`` or ``"torch"`` (DistributedDataParallel),
    the names in :data:`WRAPPERS`."""
    if algorithm not in WRAPPERS:
        raise ValueError(f"unknown algorithm {algorithm!r}: pass one of {', '.join(map(repr, WRAPPERS))}")
    if algorithm == "naive":
        validate_bucket_mb(bucket_mb)
        return NaiveDDP(module, **kwargs)
    cls = {"bucketed": BucketedDDP, "overlapped": OverlappedDDP, "torch": TorchDDP}[algorithm]
    return cls(module, bucket_mb, **kwargs)
