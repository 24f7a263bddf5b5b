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

They take what torch optimisers take: an iterable of tensors or a list of parameter groups (dicts with their own
``lr``, ``weight_decay``, ...; :func:`param_groups_of`), ``add_param_group`` (every rank calls it: it re-shards),
tied parameters (kept once), and frozen parameters (``requires_grad=False``), which stay in their group, as in a
torch optimiser's state dict, but are left out of the flat layout: never reduced, stepped or gathered, no state.
A trainable parameter that gets no gradient in a step is averaged as zeros, as lab 02's DDP does without
``find_unused_parameters``: Adam then leaves it in place, as one process would, but weight decay still shrinks it
(one process would skip it).

The module is long because both stages share one base that consolidates and re-shards the optimiser state group
by group (checkpoints saved on N ranks load on M, and into the plain optimiser), and ZeRO-2's bucket hooks are
commented step by step.
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

__all__ = ["SUPPORTED", "NaiveZero1", "Zero1", "Zero2", "param_groups_of", "validate_optimizer_class", "state_numel"]

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


def param_groups_of(params) -> list[dict]:
    """``params`` as torch optimisers read it, normalised: a list of groups ``{"params": [tensors], **options}``.

    An iterable of tensors is one group; an iterable of dicts is one group per dict, each with its own options
    (``lr``, ``weight_decay``, ...), as every torch optimiser and ``ZeroRedundancyOptimizer`` take them. Within a
    group a tensor listed twice (a tied weight) is kept once; a tensor in two groups is refused, as torch refuses
    it. Frozen tensors (``requires_grad=False``) stay in their group: the optimisers leave them alone."""
    if isinstance(params, torch.Tensor):
        unique_params(params)  # raises the "wrap it in a list" error
    items = list(params)
    if not items:
        raise ArgumentError("params is empty: pass the parameters to shard, e.g. model.parameters()")
    if not isinstance(items[0], dict):
        if any(isinstance(g, dict) for g in items):
            raise ArgumentError("params mixes tensors and dicts; pass either tensors (model.parameters()) or "
                                "parameter groups, a list of dicts each with its 'params'")
        return [{"params": unique_params(items)}]
    groups, owner = [], {}
    for g, group in enumerate(items):
        if not isinstance(group, dict):
            raise ArgumentError(f"params[{g}] is a {type(group).__name__} among parameter groups; pass a list of "
                                f"dicts, each {{'params': [...], 'lr': ...}}")
        if "params" not in group:
            raise ArgumentError(f"parameter group {g} has no 'params' (keys: {sorted(group)}); pass "
                                f"{{'params': [tensors], ...its options}}")
        ps = group["params"]
        ps = unique_params([ps] if isinstance(ps, torch.Tensor) else ps, what=f"params[{g}]['params']")
        for i, p in enumerate(ps):
            if id(p) in owner:
                raise ArgumentError(f"params[{g}]['params'][{i}] is also in parameter group {owner[id(p)]}; put "
                                    f"each parameter in one group only (torch optimisers refuse it too)")
            owner[id(p)] = g
        groups.append({**group, "params": ps})
    return groups


class _Sharded(torch.optim.Optimizer):
    """What the stages share: the flat layout, this rank's shard (split by parameter group into the inner
    optimiser's parameters), the all-gather of the updated parameters, and the (de)consolidation of the state.

    It is a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are the inner optimiser's, so a learning
    rate scheduler (``torch.optim.lr_scheduler.StepLR(zero_opt, ...)``) drives it as it drives any optimiser.

    The layout holds the trainable parameters of every group, group after group, so one reduce-scatter and one
    all-gather serve all groups. Rank r's shard is one flat tensor (``self.shard``, with its ``.grad``); the inner
    optimiser sees it as one piece per group, ``nn.Parameter`` views of the shard's own memory (a piece may be empty
    where the shard does not reach a group), so each piece is stepped with its group's options and the update
    lands in the shard."""

    def __init__(self, params, optimizer_class=torch.optim.Adam, *, group=None, broadcast: bool = True, **kwargs):
        validate_optimizer_class(optimizer_class)
        self.world_size = require_dist(group)
        self.group, self.rank = group, dist.get_rank(group)
        self.optimizer_class, self.defaults_kwargs, self.broadcast = optimizer_class, kwargs, broadcast
        self.traffic = Traffic(group)
        self._hooks: list = []
        self._ready = False
        self._build(param_groups_of(params), fresh=True)
        super().__init__([self.shard], dict(self.inner.defaults))
        self._ready = True
        self.param_groups, self.state = self.inner.param_groups, self.inner.state  # one set of groups: the inner's

    def _build(self, groups: list[dict], fresh: list | bool) -> None:
        """Lay out the trainable parameters of ``groups``, cut this rank's shard and its pieces, make the inner
        optimiser. ``fresh``: True, or the list of tensors new to this optimiser (broadcast from rank 0 when
        ``broadcast``)."""
        everything = [p for g in groups for p in g["params"]]
        unique_params(everything)  # one dtype, one device, no two tensors sharing memory, across the groups
        trainable = [[p for p in g["params"] if p.requires_grad] for g in groups]
        self.params = [p for ps in trainable for p in ps]
        if not self.params:
            raise ArgumentError("every parameter is frozen (requires_grad=False): there is nothing to shard or "
                                "step; pass the parameters to train")
        self.layout = lay = FlatLayout(tuple(tuple(p.shape) for p in self.params), self.world_size)
        shape_sig = [len(groups)] + [len(g["params"]) for g in groups] + [len(ps) for ps in trainable] + [lay.total]
        if not ranks_agree(shape_sig, group=self.group):
            raise ArgumentError(f"the parameters differ across ranks (this rank: {len(groups)} group(s) of "
                                f"{[len(g['params']) for g in groups]} tensors, {lay.total} trainable values); "
                                f"build the same model, and the same groups, on every rank")
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            if self.broadcast:  # start from identical replicas, rank 0's (not counted: it is no step's traffic)
                for p in (everything if fresh is True else fresh):
                    dist.broadcast(p.data, src=src, group=self.group)
            lo, hi = lay.shard_range(self.rank)
            self.shard = nn.Parameter(lay.flatten(self.params)[lo:hi].clone())
        # group g's trainable values are one flat range; the last group's range takes the padding
        ends, k = [], 0
        for ps in trainable:
            k += len(ps)
            ends.append(lay.offsets[k - 1] + lay.numels[k - 1] if k else 0)
        ends[-1] = lay.padded
        starts = [0] + ends[:-1]
        self._ranges = [(min(max(s, lo), hi) - lo, min(max(e, lo), hi) - lo) for s, e in zip(starts, ends)]
        self._group_ranges = list(zip(starts, ends))
        self.pieces = [nn.Parameter(self.shard.detach()[a:b]) for a, b in self._ranges]
        self._groups = groups
        self._trainable = trainable
        inner_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [piece]}
                        for g, piece in zip(groups, self.pieces)]
        self.inner = self.optimizer_class(inner_groups, **self.defaults_kwargs)
        self._reduced = self._stale = False
        self._setup()

    def _setup(self) -> None:
        """What a stage adds once the layout is built (ZeRO-2: its buckets and hooks)."""

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --------------------------------------------------------------- the optimiser interface
    def add_param_group(self, param_group: dict) -> None:
        """Add a group of parameters with its own options, as torch optimisers do. Every rank must call it, with
        the same group (it re-shards: the state so far is consolidated and cut again over the longer layout)."""
        if not self._ready:  # Optimizer.__init__ registering the shard's group (replaced by the inner's just after)
            return super().add_param_group(param_group)
        if not isinstance(param_group, dict):
            raise ArgumentError(f"param_group must be a dict with 'params' (and its options), got "
                                f"{type(param_group).__name__}; pass {{'params': [tensors], 'lr': ...}}")
        groups = param_groups_of(self._groups + [param_group])
        full = self._consolidated(to=None)
        full["param_groups"].append({**{k: v for k, v in self.inner.defaults.items()},
                                     **{k: v for k, v in param_group.items() if k != "params"},
                                     "params": list(range(sum(len(g["params"]) for g in groups[:-1]),
                                                          sum(len(g["params"]) for g in groups)))})
        self._remove_hooks()
        self._build(groups, fresh=list(groups[-1]["params"]))
        self.param_groups, self.state = self.inner.param_groups, self.inner.state
        self.load_state_dict(full)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.shard.grad = None
        self._reduced = self._stale = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._reduced:
            self._reduce_grads()
        for piece, (a, b) in zip(self.pieces, self._ranges):  # views of the shard's gradient, group by group
            piece.grad = self.shard.grad[a:b]
        self.inner.step()
        self._gather_params()
        self._reduced = False
        self._stale = True   # the slice was stepped: the next backward starts a new one (model.zero_grad() or not)
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
        """The full state (every rank calls this): the plain optimiser's format on rank ``to``, None elsewhere.

        The format of ``optimizer_class`` built on the same parameter groups: parameters numbered across the groups
        in order, frozen ones included (they have no state), per-parameter state tensors on the CPU."""
        return self._consolidated(to)

    def _consolidated(self, to):
        """The full state on rank ``to`` (None elsewhere), or on every rank when ``to`` is None."""
        mine = {g: {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                    for k, v in self.inner.state.get(piece, {}).items()} for g, piece in enumerate(self.pieces)}
        parts = [None] * self.world_size
        if to is None:
            dist.all_gather_object(parts, mine, group=self.group)
        else:
            dst = dist.get_global_rank(self.group, to) if self.group is not None else to
            dist.gather_object(mine, parts if self.rank == to else None, dst=dst, group=self.group)
            if self.rank != to:
                return None
        lay, state, groups, pid, t = self.layout, {}, [], 0, 0
        for g, group in enumerate(self._groups):
            ids = list(range(pid, pid + len(group["params"])))
            pid += len(group["params"])
            groups.append({**{k: v for k, v in self.inner.param_groups[g].items() if k != "params"}, "params": ids})
            trained = [i for i, p in zip(ids, group["params"]) if p.requires_grad]
            have = [parts[r][g] for r in range(self.world_size) if parts[r][g]]
            if have and trained:
                s, e = self._group_ranges[g]
                for i in trained:
                    state[i] = {}
                for key, v0 in have[0].items():
                    if isinstance(v0, torch.Tensor) and v0.dim() == 1:  # element-wise: the ranks' pieces, in order
                        flat = torch.zeros(lay.padded, dtype=v0.dtype)
                        flat[s:e] = torch.cat([parts[r][g][key] for r in range(self.world_size) if parts[r][g]])
                        views = lay.views(flat)
                        for j, i in enumerate(trained):
                            state[i][key] = views[t + j].clone()
                    else:  # a counter or a scalar: the same for every parameter of the group
                        for i in trained:
                            state[i][key] = v0.clone() if isinstance(v0, torch.Tensor) else v0
            t += len(trained)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state (from :meth:`state_dict`, or from a plain optimiser over the same parameter groups),
        whatever N saved it; this rank keeps its slice. State saved for a parameter that is frozen here is ignored
        (a frozen parameter has none)."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ArgumentError("state_dict must be an optimiser state dict with 'state' and 'param_groups' (what "
                                "state_dict() returned on rank 0); load it on every rank, e.g. torch.load(path)")
        saved, lay = state_dict["param_groups"], self.layout
        ours = [len(g["params"]) for g in self._groups]
        if [len(g["params"]) for g in saved] != ours:
            has = (f"one group of {ours[0]} parameters" if len(ours) == 1 else
                   f"{len(ours)} groups of {ours} parameters")
            raise ArgumentError(f"state_dict has parameter groups of sizes {[len(g['params']) for g in saved]}; this "
                                f"optimiser has {has}: load a state saved from the same model and groups")
        lo = lay.shard_range(self.rank)[0]
        inner_state, t = {}, 0
        for g, (group, sg) in enumerate(zip(self._groups, saved)):
            trained = self._trainable[g]
            full = [state_dict["state"].get(pid) for pid, p in zip(sg["params"], group["params"]) if p.requires_grad]
            if any(full):
                if not all(full):
                    raise ArgumentError(f"state_dict has state for some parameters of group {g} only; labkit's ZeRO "
                                        f"keeps state for all of them (save from a step in which every trainable "
                                        f"parameter had a gradient)")
                s, e = self._group_ranges[g]
                a, b = self._ranges[g]
                piece = {}
                for key, v0 in full[0].items():
                    vals = [st[key] for st in full]
                    if all(isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape)
                           and (key != "step" or v.dim()) for v, p in zip(vals, trained)):
                        flat = torch.zeros(lay.padded, dtype=v0.dtype, device=self.shard.device)
                        for j, v in enumerate(vals):
                            o, n = lay.offsets[t + j], lay.numels[t + j]
                            flat[o:o + n].copy_(v.detach().reshape(-1))
                        piece[key] = flat[lo + a:lo + b].clone()
                    else:
                        piece[key] = v0.clone() if isinstance(v0, torch.Tensor) else v0
                inner_state[g] = piece
            t += len(trained)
        self.inner.load_state_dict({"state": inner_state,
                                    "param_groups": [dict(sg, params=[g]) for g, sg in enumerate(saved)]})


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
        self.bucket_mb = validate_number("bucket_mb", bucket_mb, minimum=0, open_low=True,
                                         hint="the bucket size in MiB, e.g. 25")
        super().__init__(params, optimizer_class, **kwargs)

    def _setup(self) -> None:
        lay = self.layout
        order = list(range(len(self.params)))[::-1]
        sizes = [self.params[i].numel() * self.params[i].element_size() for i in order]
        self.buckets = []  # (parameter indices, flat start, flat end)
        for b in plan_buckets(sizes, self.bucket_mb):
            idx = [order[j] for j in b]
            start = lay.offsets[min(idx)]
            end = lay.padded if max(idx) == len(self.params) - 1 else lay.offsets[max(idx)] + lay.numels[max(idx)]
            self.buckets.append((idx, start, end))
        self._bucket_of = {i: k for k, (idx, _, _) in enumerate(self.buckets) for i in idx}
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
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
            if self._stale:   # a backward after step() without the optimiser's zero_grad (model.zero_grad())
                self.shard.grad, self._stale = None, False
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
        """Take ZeRO-2's gradient hooks off the parameters (the optimiser no longer reduces during backward)."""
        self._remove_hooks()
