"""ZeRO stages 1 and 2 from scratch: drop-in optimisers whose state lives on one rank in N.

Plain data parallelism keeps, on every rank, the weights, the gradients and the optimiser state (Adam: two more
copies of the weights). ZeRO (Rajbhandari et al. 2019, arXiv 1910.02054, section 5) notices that every rank then
takes *the same* optimiser step on *the same* values, N times over, and splits that work instead:

* stage 1 (:class:`Zero1`): rank r keeps the optimiser state of its shard only (``labkit.zero.FlatLayout``:
  ⌈P/N⌉ values). After backward the gradients are **reduce-scattered**, so rank r receives the sum of its
  shard's gradients only; it averages them, steps its shard, and the ranks **all-gather** the updated shards back
  into every full replica. Reduce-scatter + all-gather is exactly what a ring all-reduce does, so this costs what
  plain data parallelism costs (2Ψ per rank, see ``comm``) while the state shrinks N-fold.
  :class:`NaiveZero1` all-reduces the whole gradient instead and throws away the N-1 slices it does not own:
  correct, simpler, and 1.5x the traffic (2Ψ + Ψ), kept beside it as lab 02 keeps naive DDP beside bucketed.
* stage 2 (:class:`Zero2`): gradients are reduced *during* backward, bucket by bucket (as lab 02's
  ``OverlappedDDP`` does), each bucket's pieces going to the ranks that own them; a parameter's full gradient is
  freed as soon as its bucket is folded into the owner's shard, so after backward a rank holds 1/N of the
  gradients (plus at most two buckets in flight).

Each rank's inner optimiser is a plain ``optimizer_class([shard], **kwargs)`` on a flat 1-D leaf tensor of its
shard, so its state is exactly ⌈P/N⌉ values per buffer. That is only right for **element-wise** optimisers, whose
update of value i depends on value i alone: :data:`SUPPORTED`. All ranks must call ``step``, ``state_dict`` and
``load_state_dict`` together (they communicate); ``state_dict()`` returns the full, unsharded state on rank 0 in
the format of the plain optimiser over the same parameters (``None`` on the other ranks), and
``load_state_dict`` takes such a dict on every rank, whatever N saved it, and keeps this rank's slice.
They are ``torch.optim.Optimizer`` objects (learning-rate schedulers work) with a ``clip_grad_norm_`` of their own,
since after ZeRO-2's backward no rank holds the whole gradient that ``torch.nn.utils.clip_grad_norm_`` would need.

A parameter that gets no gradient in a step is averaged as zeros, as lab 02's DDP does without
``find_unused_parameters``: Adam then leaves it in place, as one process would, but weight decay still shrinks it
(one process would skip it). Every parameter must be trainable (``requires_grad``); frozen ones are refused.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .._validate import ArgumentError, validate_number
from ..collectives import ranks_agree
from ..ddp import plan_buckets
from ..distops import require_dist
from .comm import Traffic
from .flat import FlatLayout, unique_params

__all__ = ["SUPPORTED", "NaiveZero1", "Zero1", "Zero2", "validate_optimizer_class", "state_numel"]

SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop,
             torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)


def validate_optimizer_class(optimizer_class):
    """``optimizer_class`` if it is (a subclass of) an element-wise optimiser that sharding cannot change."""
    names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED)
    if not isinstance(optimizer_class, type) or not issubclass(optimizer_class, torch.optim.Optimizer):
        raise ArgumentError(f"optimizer_class must be a torch.optim.Optimizer class (not an instance), got "
                            f"{optimizer_class!r}; pass e.g. optimizer_class=torch.optim.Adam, lr=1e-3")
    if not issubclass(optimizer_class, SUPPORTED):
        raise ArgumentError(f"optimizer_class={optimizer_class.__name__} is not element-wise (its update of one "
                            f"value may depend on others), so a rank holding a slice of the values cannot step "
                            f"it alone; pass one of {names}")
    return optimizer_class


def state_numel(optimizer) -> int:
    """Values in an optimiser's per-element state on this rank (``step`` counters and scalars left out)."""
    n = 0
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step" and v.dim() > 0:
                n += v.to_local().numel() if hasattr(v, "to_local") else v.numel()
    return n


class _Sharded(torch.optim.Optimizer):
    """What the stages share: the flat layout, this rank's shard as the inner optimiser's one parameter, the
    all-gather of the updated parameters, and the (de)consolidation of the state.

    It is a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are the inner optimiser's, so a learning
    rate scheduler (``torch.optim.lr_scheduler.StepLR(zero_opt, ...)``) drives it as it drives any optimiser."""

    def __init__(self, params, optimizer_class=torch.optim.Adam, *, group=None, broadcast: bool = True, **kwargs):
        validate_optimizer_class(optimizer_class)
        self.world_size = require_dist(group)
        self.group, self.rank = group, dist.get_rank(group)
        self.params = unique_params(params)
        frozen = [i for i, p in enumerate(self.params) if not p.requires_grad]
        if frozen:
            raise ArgumentError(f"params {frozen[:5]} are frozen (requires_grad=False); pass only the trained ones: "
                                f"[p for p in model.parameters() if p.requires_grad]")
        self.layout = FlatLayout(tuple(tuple(p.shape) for p in self.params), self.world_size)
        lay = self.layout
        if not ranks_agree([len(self.params), lay.total], group=group):
            raise ArgumentError(f"the parameters differ across ranks (this rank: {len(self.params)} tensors, "
                                f"{lay.total} values); build the same model on every rank")
        src = dist.get_global_rank(group, 0) if group is not None else 0
        with torch.no_grad():
            if broadcast:  # start from identical replicas, rank 0's (not counted: it is no step's traffic)
                for p in self.params:
                    dist.broadcast(p.data, src=src, group=group)
            lo, hi = lay.shard_range(self.rank)
            self.shard = nn.Parameter(lay.flatten(self.params)[lo:hi].clone())
        self.optimizer_class = optimizer_class
        self.inner = optimizer_class([self.shard], **kwargs)
        self._ready = False
        super().__init__([self.shard], dict(self.inner.defaults))
        self._ready = True
        self.param_groups, self.state = self.inner.param_groups, self.inner.state  # one set of groups: the inner's
        self.traffic = Traffic(group)
        self._reduced = False

    # --------------------------------------------------------------- the optimiser interface
    def add_param_group(self, param_group: dict) -> None:
        if not self._ready:  # Optimizer.__init__ registering the shard's group (replaced by the inner's just after)
            return super().add_param_group(param_group)
        raise ArgumentError("labkit's ZeRO optimisers hold one parameter group (one flat buffer); build a second "
                            "optimiser for other parameters instead of add_param_group")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.shard.grad = None
        self._reduced = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._reduced:
            self._reduce_grads()
        self.inner.step()
        self._gather_params()
        self._reduced = False
        return loss

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the averaged gradient so its global 2-norm is at most ``max_norm``; return the norm before.

        ``torch.nn.utils.clip_grad_norm_`` cannot do it here: after ZeRO-2's backward no rank holds the full
        gradients. Each rank reduces its shard now (``step`` will not reduce again), sums its squares, and one
        all-reduce of one value gives the global norm (the padding holds zeros, so it adds nothing)."""
        max_norm = validate_number("max_norm", max_norm, minimum=0, open_low=True, hint="e.g. 1.0")
        if not self._reduced:
            self._reduce_grads()
            self._reduced = True
        sq = self.shard.grad.double().pow(2).sum().reshape(1)
        self.traffic.all_reduce(sq)
        total = sq.sqrt()[0]
        self.shard.grad.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0).to(self.shard.dtype))
        return total

    def _reduce_grads(self) -> None:  # pragma: no cover - each stage has its own
        raise NotImplementedError

    def _gather_params(self) -> None:
        full = torch.empty(self.layout.padded, dtype=self.shard.dtype, device=self.shard.device)
        self.traffic.all_gather(full, self.shard.detach())
        for p, v in zip(self.params, self.layout.views(full)):
            p.copy_(v)

    def grad_numel(self) -> int:
        """Gradient values this rank holds now (full ``.grad`` tensors, its gradient shard, buckets in flight)."""
        return sum(self.grad_parts().values())

    def grad_parts(self) -> dict:
        """:meth:`grad_numel` by where the values sit: ``whole`` (the model parameters' own ``.grad``: the whole
        gradient, as DDP keeps it), ``slice`` (the shard's ``.grad``: this rank's slice of the averaged gradient,
        which the inner optimiser steps) and ``buckets`` (ZeRO-2's buffers still in flight)."""
        return {"whole": sum(p.grad.numel() for p in self.params if p.grad is not None),
                "slice": self.shard.grad.numel() if self.shard.grad is not None else 0, "buckets": 0}

    # --------------------------------------------------------------- checkpoints
    def state_dict(self, to: int = 0):
        """The full state (every rank calls this): the plain optimiser's format on rank ``to``, None elsewhere."""
        inner = self.inner.state_dict()
        mine = inner["state"].get(0, {})
        lay, n = self.layout, len(self.params)
        state = {i: {} for i in range(n)} if mine else {}
        for key in sorted(mine):
            v = mine[key]
            if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == lay.shard_numel:
                parts = [torch.empty_like(v) for _ in range(self.world_size)] if self.rank == to else None
                dst = dist.get_global_rank(self.group, to) if self.group is not None else to
                dist.gather(v.contiguous(), parts, dst=dst, group=self.group)
                if self.rank == to:
                    for i, t in enumerate(lay.views(torch.cat(parts))):
                        state[i][key] = t.clone()
            else:  # a counter or a scalar: the same for every parameter
                for i in range(n):
                    state[i][key] = v.clone() if isinstance(v, torch.Tensor) else v
        if self.rank != to:
            return None
        groups = [dict(g, params=list(range(n))) for g in inner["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state (from :meth:`state_dict` or a plain optimiser over the same parameters), any N."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ArgumentError("state_dict must be an optimiser state dict with 'state' and 'param_groups' (what "
                                "state_dict() returned on rank 0); load it on every rank, e.g. torch.load(path)")
        groups, n, lay = state_dict["param_groups"], len(self.params), self.layout
        if len(groups) != 1 or len(groups[0]["params"]) != n:
            got = [len(g["params"]) for g in groups]
            raise ArgumentError(f"state_dict has parameter groups of sizes {got}; this optimiser has one group of "
                                f"{n} parameters: load a state saved from the same model")
        ids = list(groups[0]["params"])
        full = [state_dict["state"].get(pid) for pid in ids]
        mine = {}
        if any(st for st in full):
            if not all(full):
                raise ArgumentError("state_dict has state for some parameters only; labkit's ZeRO keeps state "
                                    "for all of them (save from a step in which every parameter had a gradient)")
            lo, hi = lay.shard_range(self.rank)
            for key, v0 in full[0].items():
                vals = [st[key] for st in full]
                if all(isinstance(v, torch.Tensor) and tuple(v.shape) == s and (key != "step" or v.dim())
                       for v, s in zip(vals, lay.shapes)):
                    mine[key] = lay.flatten(vals, dtype=v0.dtype, device=self.shard.device)[lo:hi].clone()
                else:
                    mine[key] = v0.clone() if isinstance(v0, torch.Tensor) else v0
        inner = {"state": {0: mine} if mine else {},
                 "param_groups": [dict(groups[0], params=[0])]}
        self.inner.load_state_dict(inner)


class NaiveZero1(_Sharded):
    """ZeRO-1 the simple way: all-reduce the whole gradient (2Ψ), keep this rank's slice, step it, all-gather (Ψ)."""

    def _reduce_grads(self) -> None:
        flat = self.layout.flatten([p.grad for p in self.params], dtype=self.shard.dtype, device=self.shard.device)
        self.traffic.all_reduce(flat)
        lo, hi = self.layout.shard_range(self.rank)
        self.shard.grad = flat[lo:hi].div_(self.world_size).clone()


class Zero1(_Sharded):
    """ZeRO-1: reduce-scatter the gradients (Ψ), step this rank's shard, all-gather the parameters (Ψ)."""

    def _reduce_grads(self) -> None:
        flat = self.layout.flatten([p.grad for p in self.params], dtype=self.shard.dtype, device=self.shard.device)
        mine = torch.empty_like(self.shard)
        self.traffic.reduce_scatter(mine, flat)
        self.shard.grad = mine.div_(self.world_size)


class Zero2(_Sharded):
    """ZeRO-2: during backward, each full bucket of gradients is reduced, piece by piece, onto the ranks owning
    them, folded into the owner's gradient shard, and the full gradients freed.

    Buckets follow lab 02 (:func:`labkit.ddp.plan_buckets`, reverse registration order, ``bucket_mb`` MiB);
    in the flat layout each bucket is one contiguous range, split over the ranks by ``FlatLayout.pieces``.
    Several backwards before one ``step`` accumulate (each reduces its own buckets). Every parameter should get a
    gradient in each backward; buckets with unused parameters are reduced (as zeros) by ``step``.
    """

    def __init__(self, params, optimizer_class=torch.optim.Adam, *, bucket_mb: float = 25.0, **kwargs):
        validate_number("bucket_mb", bucket_mb, minimum=0, open_low=True, hint="the bucket size in MiB, e.g. 25")
        super().__init__(params, optimizer_class, **kwargs)
        lay = self.layout
        order = list(range(len(self.params)))[::-1]
        sizes = [self.params[i].numel() * self.params[i].element_size() for i in order]
        self.buckets = []  # (parameter indices, flat start, flat end)
        for b in plan_buckets(sizes, bucket_mb):
            idx = [order[j] for j in b]
            start = lay.offsets[min(idx)]
            end = lay.padded if max(idx) == len(self.params) - 1 else lay.offsets[max(idx)] + lay.numels[max(idx)]
            self.buckets.append((idx, start, end))
        self._bucket_of = {i: k for k, (idx, _, _) in enumerate(self.buckets) for i in idx}
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params if p.requires_grad]
        self._reset()

    def _reset(self) -> None:
        self._missing = [len(idx) for idx, _, _ in self.buckets]
        self._buffers: dict[int, torch.Tensor] = {}
        self._next = 0
        self._inflight: list = []  # (bucket, works)

    def _buffer(self, k: int) -> torch.Tensor:
        if k not in self._buffers:
            _, s, e = self.buckets[k]
            self._buffers[k] = torch.zeros(e - s, dtype=self.shard.dtype, device=self.shard.device)
        return self._buffers[k]

    @torch.no_grad()
    def _on_grad(self, p) -> None:
        i = self._index[id(p)]
        k = self._bucket_of[i]
        if k < self._next:
            raise RuntimeError("a gradient arrived for a bucket already reduced in this backward; call step() "
                               "after each backward, or make every parameter get a gradient in every backward")
        start = self.buckets[k][1]
        o, n = self.layout.offsets[i], self.layout.numels[i]
        self._buffer(k)[o - start:o - start + n].copy_(p.grad.reshape(-1))
        p.grad = None  # the full gradient is gone: only its bucket (and then this rank's shard) holds it
        self._missing[k] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self._next)
            self._next += 1
        if self._next == len(self.buckets):  # every bucket of this backward is on its way
            self._drain(keep=0)
            self._missing, self._next = [len(idx) for idx, _, _ in self.buckets], 0

    def _launch(self, k: int) -> None:
        _, start, end = self.buckets[k]
        buf = self._buffer(k)
        works = [self.traffic.reduce(buf[lo - start:hi - start], dst=r, async_op=True)
                 for r, lo, hi in self.layout.pieces(start, end)]
        self._inflight.append((k, works))
        self._drain(keep=1)  # at most two buckets alive: the one just sent and the one before it

    def _drain(self, keep: int) -> None:
        lo, hi = self.layout.shard_range(self.rank)
        while len(self._inflight) > keep:
            k, works = self._inflight.pop(0)
            for w in works:
                w.wait()
            _, start, end = self.buckets[k]
            a, b = max(lo, start), min(hi, end)
            buf = self._buffers.pop(k)
            if a < b:
                if self.shard.grad is None:
                    self.shard.grad = torch.zeros_like(self.shard)
                self.shard.grad[a - lo:b - lo].add_(buf[a - start:b - start], alpha=1.0 / self.world_size)

    def _reduce_grads(self) -> None:
        if self._next or any(m != len(idx) for m, (idx, _, _) in zip(self._missing, self.buckets)):
            while self._next < len(self.buckets):  # parameters without a gradient: their buckets go as zeros
                self._launch(self._next)
                self._next += 1
        self._drain(keep=0)
        self._missing, self._next = [len(idx) for idx, _, _ in self.buckets], 0
        if self.shard.grad is None:
            self.shard.grad = torch.zeros_like(self.shard)

    def grad_parts(self) -> dict:
        return {**super().grad_parts(), "buckets": sum(b.numel() for b in self._buffers.values())}

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
