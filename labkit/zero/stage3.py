"""ZeRO stage 3 from scratch: the parameters themselves are sharded, and gathered only while a unit needs them.

This module is long because one class holds the whole of stage 3: sharding at construction, the gather and free
hooks, the saved-tensor recipes, prefetch in both directions and mixed precision; the checkpoint formats live in
:mod:`labkit.zero.checkpoint`.

:class:`Zero3` wraps a model given a list of *units* (submodules; by default its top-level children that hold
parameters). Each unit's parameters are laid out flat (``FlatLayout``) and rank r keeps only its ⌈P_u/N⌉ values,
as one leaf ``nn.Parameter`` (``zero3.parameters()``: give those to any optimiser, whose state is then sharded
too). Per step and unit (Rajbhandari et al. 2019, arXiv 1910.02054, sections 5.3 and 7.2.2):

1. forward: a forward pre-hook all-gathers the unit's full parameters (Ψ_u), the unit runs, a forward hook frees
   them. Whatever autograd saves for the backward that is a view of those gathered values is saved as a *recipe*
   (``torch.autograd.graph.saved_tensors_hooks``: which unit, offset, shape, strides), not as the values;
2. backward: the first saved recipe of a unit to be unpacked all-gathers its parameters again (Ψ_u); the copy is
   dropped when the unit's last recipe has been unpacked;
3. the gather is one autograd function whose backward reduce-scatters the full gradient (Ψ_u) and divides by N,
   so the shard's ``.grad`` is this rank's slice of the averaged gradient.

That is 3Ψ per step instead of data parallelism's 2Ψ, in exchange for holding 1/N of the weights between units.
(At most 3Ψ: a unit whose weights no backward formula needs is not gathered again. The first layer of a model
whose input needs no gradient is one: its weight gradient needs the input, not the weight. ``traffic``
labels the gathers "forward" and "backward", so a test can see which units were gathered twice.)

What real models bring, and what Zero3 does with it (FSDP2's ``fully_shard`` makes the same choices):

* **Parameters outside every unit, and weights tied across units** (GPT's token embedding and output head)
  belong to the *root*: the model itself, gathered when :meth:`Zero3.forward` starts and freed when it returns.
  A tied weight is one tensor in one flat buffer: gathered once per forward, its gradient (autograd sums the
  gradients of both uses) reduce-scattered once.
* **Frozen parameters** (``requires_grad=False``) are sharded too, in a flat buffer of their own per unit that is
  gathered like the others but has no gradient, no reduce-scatter and no optimiser state (``zero3.parameters()``
  does not list it). A frozen backbone is thus 1/N per rank; a frozen weight whose backward needs it (a frozen
  layer between trained ones) is gathered again in the backward like a trained one.
* **Prefetch** (``prefetch=True``): when unit i starts, the all-gather of the unit that ran after it in the last
  forward is issued asynchronously, so it travels while unit i computes; in the backward the units' regathers are
  prefetched in the reverse order. :attr:`timeline` records when each gather was issued, waited for and ready, and
  each unit's compute (``record=True``), which measures the overlap on a CPU (on a GPU it records when the host
  queued each, since reading the device's clock would synchronise and undo the overlap).
* **Mixed precision** (``mp_policy``: :class:`MixedPrecision` or torch's ``MixedPrecisionPolicy``): shards,
  gradients and optimiser state stay in the parameters' dtype (fp32 master weights); each gather casts the shard
  to ``param_dtype`` first (half the bytes in bf16), the units compute in it (their floating inputs cast to it),
  and gradients are reduce-scattered in ``reduce_dtype`` before being cast back to the shards' dtype.

Shard sizes are per unit, so the state is Σ_u ⌈P_u/N⌉ values per buffer (the first FSDP also flattened each
unit; FSDP2 instead splits every parameter along its first dimension, unevenly when N does not divide it).
The original parameters are removed from the model (the units hold plain tensor attributes only while gathered);
:meth:`Zero3.full_parameters` gathers them back, in ``model.parameters()`` order; :meth:`Zero3.state_dict` gives
the model's full state dict and :meth:`Zero3.sharded_state_dict` this rank's part (with the optimiser's), which
:meth:`Zero3.load_sharded_state_dict` loads on any number of ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .._validate import ArgumentError, validate_number
from ..collectives import ranks_agree
from ..devices import now
from ..distops import all_gather_tensor, require_dist
from .comm import Traffic
from .flat import FlatLayout, unique_params

__all__ = ["Zero3", "MixedPrecision"]


@dataclass(frozen=True)
class MixedPrecision:
    """What FSDP2's ``MixedPrecisionPolicy`` says, for :class:`Zero3` (which also takes torch's own policy).

    ``param_dtype``: the dtype parameters are gathered and computed in (None: their own); ``reduce_dtype``: the
    dtype gradients are reduce-scattered in (None: ``param_dtype``'s); ``cast_forward_inputs``: cast the floating
    tensors a unit (and the model) is called with to ``param_dtype``."""

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    cast_forward_inputs: bool = True


def _policy(mp_policy):
    if mp_policy is None:
        return None
    if not all(hasattr(mp_policy, a) for a in ("param_dtype", "reduce_dtype")):
        raise ArgumentError(f"mp_policy must be a labkit.zero.MixedPrecision (or torch's MixedPrecisionPolicy), "
                            f"got {type(mp_policy).__name__}; e.g. MixedPrecision(param_dtype=torch.bfloat16, "
                            f"reduce_dtype=torch.float32)")
    for name in ("param_dtype", "reduce_dtype"):
        d = getattr(mp_policy, name)
        if d is not None and (not isinstance(d, torch.dtype) or not d.is_floating_point):
            raise ArgumentError(f"mp_policy.{name}={d!r} is not a floating dtype; pass e.g. torch.bfloat16, "
                                f"torch.float32 or None")
    return MixedPrecision(mp_policy.param_dtype, mp_policy.reduce_dtype,
                          bool(getattr(mp_policy, "cast_forward_inputs", True)))


@dataclass
class _Group:
    """One flat buffer of a unit (or of the root, ``unit=None``): its trained or its frozen parameters."""

    unit: int | None
    trainable: bool
    layout: FlatLayout
    slots: list     # per parameter: every (module, attribute name) that holds it (a tied one: several)
    names: list     # per parameter: its name in model.named_parameters()
    shard: torch.Tensor  # this rank's slice: an nn.Parameter (trained) or a plain tensor (frozen)


class _Gather(torch.autograd.Function):
    """shard -> full flat parameters; backward: full gradient -> reduce-scatter -> averaged gradient shard."""

    @staticmethod
    def forward(ctx, shard, owner, g):
        # the forward's all-gather (Ψ_u), or the one prefetched while the previous unit ran: every rank sends its
        # shard and receives the others', so each holds the unit's full flat parameters while the unit runs. Being
        # an autograd function, autograd records shard -> full as one edge, and the gradient of the full buffer
        # flows back through backward() below
        ctx.owner, ctx.g = owner, g
        return owner._take(g, "forward")

    @staticmethod
    def backward(ctx, grad_full):
        # reached once autograd has summed the gradient of every view of the unit's gathered parameters (every
        # layer of the unit has run its backward): no backward formula needs the re-gathered weights any more
        owner, g = ctx.owner, ctx.g
        owner._regathered.pop(g, None)  # normally gone already: freed when its last recipe was unpacked
        shard = owner._groups[g].shard
        mp = owner.mp_policy
        dtype = (mp.reduce_dtype or mp.param_dtype) if mp is not None else None
        full = grad_full.to(dtype or grad_full.dtype).contiguous()
        # reduce-scatter (Ψ_u): rank r receives the sum over ranks of its own slice of the full gradient, so no
        # rank ever holds another rank's summed gradient; dividing by N turns the sum into DDP's mean
        mine = torch.empty(owner._groups[g].layout.shard_numel, dtype=full.dtype, device=full.device)
        owner.traffic.reduce_scatter(mine, full)
        return mine.div_(owner.world_size).to(shard.dtype), None, None  # the shard's .grad: what is stepped


def _is_container(m: nn.Module) -> bool:
    """A module without a forward of its own (ModuleList, ModuleDict): the model calls its elements, never it."""
    return type(m).forward is nn.Module.forward


class _Recipe:
    """A saved view of a gathered unit, kept as where it lies instead of its values. Each counts itself in its
    owner's ``_recipes`` until it is unpacked, or until autograd drops it unused (a forward whose graph is never
    backpropagated: evaluation with gradients on), so the count says how many uses of a re-gathered copy remain."""

    __slots__ = ("owner", "g", "offset", "shape", "stride", "live")

    def __init__(self, owner, g, offset, shape, stride):
        self.owner, self.g, self.offset, self.shape, self.stride, self.live = owner, g, offset, shape, stride, True

    def release(self) -> None:
        if self.live:
            self.live = False
            self.owner._recipes[self.g] = self.owner._recipes.get(self.g, 1) - 1

    def __del__(self):
        self.release()


class Zero3(nn.Module):
    """Shard ``module``'s parameters unit by unit over the ranks of ``group``; gather each unit only to use it."""

    def __init__(self, module: nn.Module, units=None, *, group=None, broadcast: bool = True,
                 prefetch: bool = True, mp_policy=None, record: bool = False):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ArgumentError(f"module must be an nn.Module (the model), got {type(module).__name__}")
        self.world_size, self.rank, self.group = require_dist(group), dist.get_rank(group), group
        units = self._check_units(module, units)
        if not ranks_agree([len(units), sum(p.numel() for p in module.parameters())], group=group):
            raise ArgumentError("the model or its units differ across ranks; build the same model and pass the "
                                "same units on every rank")
        self.module, self.units = module, units
        self.prefetch, self.mp_policy = bool(prefetch), _policy(mp_policy)
        self.traffic = Traffic(group)
        self.timeline: list | None = [] if record else None
        where: dict[int, list] = {}  # a tied parameter sits in several modules: every one gets the gathered view
        for m in module.modules():
            for n, p in m._parameters.items():
                if p is not None:
                    where.setdefault(id(p), []).append((m, n))
        names = {id(p): n for n, p in module.named_parameters()}
        home = self._homes(module, units, where)  # id(p) -> unit index, or None for the root
        src = dist.get_global_rank(group, 0) if group is not None else 0
        self._groups: list[_Group] = []
        self.shards = nn.ParameterList()   # the trained shards, what zero3.parameters() gives an optimiser
        self.layouts: list[FlatLayout] = []  # their layouts (Ψ = Σ padded)
        self._unit_groups: dict = {}      # unit index (None: root) -> its groups' indices
        place = {}
        for u, owner in [(u, unit) for u, unit in enumerate(units)] + [(None, module)]:
            mine = [p for p in unique_params(owner.parameters(), what=f"units[{u}].parameters()"
                                             if u is not None else "model.parameters()") if home[id(p)] == u]
            for trainable in (True, False):
                params = [p for p in mine if p.requires_grad == trainable]
                if not params:
                    continue
                lay = FlatLayout(tuple(tuple(p.shape) for p in params), self.world_size, padding_only_ok=True)
                with torch.no_grad():
                    if broadcast:
                        for p in params:
                            dist.broadcast(p.data, src=src, group=group)
                    lo, hi = lay.shard_range(self.rank)
                    values = lay.flatten(params)[lo:hi].clone()
                shard = nn.Parameter(values) if trainable else values
                g = len(self._groups)
                self._groups.append(_Group(u, trainable, lay, [where[id(p)] for p in params],
                                           [names[id(p)] for p in params], shard))
                self._unit_groups.setdefault(u, []).append(g)
                if trainable:
                    self.shards.append(shard)
                    self.layouts.append(lay)
                for j, p in enumerate(params):
                    place[id(p)] = (g, j)
        self._places = [place[id(p)] for p in module.parameters()]  # model.parameters() order -> (group, index)
        # the model's state-dict keys, in order, each parameter's with its (group, index): what the checkpoints
        # name things by (labkit.zero.checkpoint)
        self._sd_keys = [(k, place.get(id(t))) for k, t in module.state_dict(keep_vars=True).items()]
        for grp in self._groups:  # the model keeps no full copy: only the shards remain
            for places in grp.slots:
                for m, name in places:
                    del m._parameters[name]
                    setattr(m, name, None)
        self._gathered: dict[int, torch.Tensor] = {}     # forward: group -> full flat values (with autograd)
        self._regathered: dict[int, torch.Tensor] = {}   # backward: group -> full flat values (no autograd)
        self._prefetched: dict[int, tuple] = {}          # group -> (buffer, work) of an all-gather in flight
        self._recipes: dict[int, int] = {}               # group -> recipes saved and not yet unpacked
        self._fw_order: list = []       # units in the order the last forward ran them (what prefetch follows)
        self._fw_seen: list = []        # ... the forward in progress
        self._pack_order: list = []     # groups in the order their first recipe was saved (backward: reversed)
        self._bw_queued = False
        self._computing: dict = {}     # unit -> its timeline entry while it runs
        self._hooks = []
        for u, unit in enumerate(units):
            self._hooks.append(unit.register_forward_pre_hook(lambda _m, a, k, u=u: self._before(u, a, k),
                                                              with_kwargs=True))
            self._hooks.append(unit.register_forward_hook(lambda _m, _a, _o, u=u: self._after(u)))
        # a layer run without its unit (or the model called instead of the wrapper) would find its weights gone:
        # say so, instead of a TypeError about None deep inside it
        for name, sub in module.named_modules():
            for u in {grp.unit for grp in self._groups for places in grp.slots for m, _ in places if m is sub}:
                self._hooks.append(sub.register_forward_pre_hook(
                    lambda m, _a, u=u, name=name: self._require(u, m, name)))

    @staticmethod
    def _check_units(module, units) -> list[nn.Module]:
        if units is None:  # the top-level children with parameters; a container's (ModuleList) own children
            def called(m):
                if not _is_container(m):
                    return [m]
                return [u for c in m.children() if any(True for _ in c.parameters()) for u in called(c)]

            units = [u for c in module.children() if any(True for _ in c.parameters()) for u in called(c)]
        units = [m for m in units if m is not module]  # the model itself is the root, always there
        inside = {id(m) for m in module.modules()}
        for i, m in enumerate(units):
            if not isinstance(m, nn.Module) or id(m) not in inside:
                raise ArgumentError(f"units[{i}] ({type(m).__name__}) is not a submodule of the model; pass "
                                    f"submodules of it, e.g. list(model.children())")
            if _is_container(m):
                raise ArgumentError(f"units[{i}] is a {type(m).__name__}, which is never called (the model calls "
                                    f"its elements), so it would never be gathered; pass its elements, e.g. "
                                    f"units=list(model.blocks)")
        for i, a in enumerate(units):
            below = {id(m) for m in a.modules()}
            for j, b in enumerate(units):
                if i != j and id(b) in below:
                    raise ArgumentError(f"units[{j}] ({type(b).__name__}) is inside units[{i}] "
                                        f"({type(a).__name__}): units must not be nested; pass one of them")
        return units

    @staticmethod
    def _homes(module, units, where) -> dict:
        """Each parameter's unit: the one unit holding every module that uses it; else (tied across units, or in
        no unit) the root."""
        unit_of = {}
        for u, unit in enumerate(units):
            for m in unit.modules():
                unit_of[id(m)] = u
        home = {}
        for p in module.parameters():
            us = {unit_of.get(id(m)) for m, _ in where[id(p)]}
            home[id(p)] = us.pop() if len(us) == 1 else None
        return home

    # --------------------------------------------------------------- gathering and freeing
    # One step, unit by unit: _before (pre-hook) gathers (or waits for the prefetched gather) and issues the next
    # unit's, the unit runs, _after (hook) frees; autograd saves the weights it needs as recipes (_pack), the
    # backward gathers them again on first use (_unpack) and drops that copy after the last, and _Gather's
    # backward reduce-scatters the gradient. Between units a rank holds only shards.
    def _source(self, g: int) -> torch.Tensor:
        shard = self._groups[g].shard.detach()
        dtype = self.mp_policy.param_dtype if self.mp_policy is not None else None
        return shard.to(dtype).contiguous() if dtype is not None else shard.contiguous()

    def _issue(self, g: int, label: str, async_op: bool):
        # a fresh buffer each time (not a cached one): once every reference to it is dropped, the memory is free
        src = self._source(g)
        full = torch.empty(self._groups[g].layout.padded, dtype=src.dtype, device=src.device)
        work = self.traffic.all_gather(full, src, async_op=async_op, label=label)  # counted: Ψ_u
        return full, work, src

    def _clock(self) -> float:
        # the timeline's clock, read only when recording. On the CPU the host's clock is when things happen; on a
        # GPU it is when they were queued (synchronising here would wait for the prefetch and undo the overlap)
        if self.timeline is None:
            return 0.0
        return now(self._device()) if self._device().type == "cpu" else time.perf_counter()

    def _prefetch(self, g: int, label: str) -> None:
        if g in self._prefetched or (label == "backward" and g in self._regathered):
            return
        full, work, src = self._issue(g, label, async_op=True)
        # src (a bf16 copy under mixed precision) is kept until the wait: the collective reads it in the background
        self._prefetched[g] = (full, work, self._clock(), src)

    def _take(self, g: int, label: str) -> torch.Tensor:
        """Group g's full buffer: the prefetched one (waited for) or one gathered now."""
        t0 = self._clock()
        if g in self._prefetched:
            full, work, issued, _ = self._prefetched.pop(g)
            work.wait()
        else:
            full, _, _ = self._issue(g, label, async_op=False)
            issued = t0
        if self.timeline is not None:
            self.timeline.append({"kind": "gather", "group": g, "unit": self._groups[g].unit, "phase": label,
                                  "issued": issued, "waited": t0, "ready": self._clock()})
        return full

    def _gather_unit(self, u) -> None:
        for g in self._unit_groups.get(u, ()):
            trained = self._groups[g].trainable and torch.is_grad_enabled()
            # with grad: through _Gather, so the backward reaches the shard (reduce-scatter); frozen groups and
            # no_grad (eval, inference) need only the values, and nothing is saved for a backward
            full = _Gather.apply(self._groups[g].shard, self, g) if trained else self._take(g, "forward")
            self._gathered[g] = full  # _pack recognises views of it by their storage while the unit runs
            self._set(g, full)

    def _free_unit(self, u) -> None:
        for g in self._unit_groups.get(u, ()):
            self._set(g, None)
            # the last references to the gathered buffer go here, unless autograd saved views of it: _pack stored
            # those as recipes instead, so the Ψ_u bytes are really released until the backward needs them again
            self._gathered.pop(g, None)

    def _set(self, g: int, full) -> None:
        # point every module that holds one of the group's parameters (tied ones: several) at its view of the
        # full buffer (no copy), or at None to drop them, so the unit's own forward reads self.weight as usual
        grp = self._groups[g]
        views = grp.layout.views(full) if full is not None else [None] * len(grp.slots)
        for places, v in zip(grp.slots, views):
            for m, name in places:
                setattr(m, name, v)

    def _cast(self, args, kwargs):
        mp = self.mp_policy
        if mp is None or mp.param_dtype is None or not mp.cast_forward_inputs:
            return args, kwargs

        def cast(x):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                return x.to(mp.param_dtype)
            if isinstance(x, (list, tuple)):
                return type(x)(cast(v) for v in x)
            if isinstance(x, dict):
                return {k: cast(v) for k, v in x.items()}
            return x

        return cast(args), cast(kwargs)

    def _before(self, u: int, args, kwargs):  # forward pre-hook of unit u: gather, issue the next, let u run
        self._gather_unit(u)
        self._fw_seen.append(u)
        if self.prefetch:
            order = self._fw_order
            k = len(self._fw_seen) - 1
            if k + 1 < len(order) and order[k] == u:  # the same path as last time: the next unit is known
                for g in self._unit_groups.get(order[k + 1], ()):
                    self._prefetch(g, "forward")
        if self.timeline is not None:
            self._computing[u] = {"kind": "compute", "unit": u, "phase": "forward", "start": self._clock()}
            self.timeline.append(self._computing[u])
        return self._cast(args, kwargs)

    def _require(self, u, m: nn.Module, name: str) -> None:
        if not any(g in self._gathered for g in self._unit_groups.get(u, ())):
            unit = f"units[{u}] ({type(self.units[u]).__name__})" if u is not None else "the root (the model)"
            raise ArgumentError(f"{f'model.{name}' if name else 'the model'} ({type(m).__name__}) ran while {unit} "
                                f"was not gathered: "
                                f"Zero3 gathers a unit when the unit itself is called, inside zero3(...). Call the "
                                f"wrapper, not the model; and make units of modules that are called as a whole (a "
                                f"layer whose parts the parent calls one by one is no unit)")

    def _after(self, u: int) -> None:  # forward hook of unit u: it has run, free its full parameters
        if self.timeline is not None and u in self._computing:
            self._computing.pop(u)["end"] = self._clock()
        self._free_unit(u)

    def _device(self):
        return self._groups[0].shard.device

    def _pack(self, t: torch.Tensor):
        # autograd is about to save t for the backward. A view of a gathered unit (a weight, its transpose) is
        # saved as a recipe (group, offset, shape, strides) instead of the tensor, which would keep the whole
        # gathered buffer alive and hold Ψ, not Ψ/N, until the backward; anything else (activations) is kept
        if t.layout is torch.strided:
            ptr = t.untyped_storage().data_ptr()
            for g, full in self._gathered.items():
                if full.untyped_storage().data_ptr() == ptr:
                    if self._recipes.get(g, 0) <= 0:  # its first recipe since the last were used: order anew
                        if g in self._pack_order:
                            self._pack_order.remove(g)
                        self._pack_order.append(g)
                    self._recipes[g] = self._recipes.get(g, 0) + 1
                    return _Recipe(self, g, t.storage_offset(), tuple(t.shape), t.stride())
        # anything else is kept as its values, detached: the tensor itself would tie a saved output (softmax's,
        # tanh's) to the node that saved it, a cycle through C++ that the garbage collector cannot see, and a graph
        # dropped without a backward would never be freed. Autograd restores the autograd links when unpacking
        return t.detach()

    def _unpack(self, packed):
        # the backward needs a saved tensor back. For a recipe, the group's first one gathers its parameters again
        # (Ψ_u, without autograd: the gradient goes through _Gather's edge, not this copy), or waits for the gather
        # prefetched when the unit after it was regathered; the group's last recipe drops the copy
        if not isinstance(packed, _Recipe):
            return packed
        g = packed.g
        if not self._bw_queued:  # once per backward: clean up what a backward may leave (see _backward_done)
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._bw_queued = True
        if g not in self._regathered:  # the group's second all-gather, in the backward
            with torch.no_grad():
                self._regathered[g] = self._take(g, "backward")
            if self.prefetch:  # the group whose recipes were saved just before this one's is needed next
                k = self._pack_order.index(g) if g in self._pack_order else 0
                for nxt in reversed(self._pack_order[:k]):
                    if self._recipes.get(nxt, 0) > 0 and self._groups[nxt].unit != self._groups[g].unit:
                        self._prefetch(nxt, "backward")
                        break
        # the same view, rebuilt on the new copy
        view = self._regathered[g].as_strided(packed.shape, packed.stride, packed.offset)
        packed.release()
        if self._recipes.get(g, 0) <= 0:  # the last use: drop the copy once the node using it is done with it
            self._regathered.pop(g, None)
            if g in self._pack_order:
                self._pack_order.remove(g)
        return view

    def _backward_done(self) -> None:
        # end of a backward: a prefetch no node used (a different path) and a copy whose recipes belong to a graph
        # that was never backpropagated are dropped, so nothing stays gathered between steps
        self._drop_prefetched()
        self._regathered.clear()
        self._bw_queued = False

    def _drop_prefetched(self) -> None:
        for _, work, _, _ in self._prefetched.values():
            work.wait()  # every rank issued it: let it finish before its buffer goes
        self._prefetched.clear()

    def forward(self, *args, **kwargs):
        # the root's parameters (outside every unit, or tied across units) stay gathered for the whole forward; the
        # hooks on the units gather and free theirs; this context turns what autograd saves from gathered weights
        # into recipes for the whole forward (and so for the backward it records)
        self._fw_seen = []
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            self._gather_unit(None)
            if self.prefetch and self._fw_order:
                for g in self._unit_groups.get(self._fw_order[0], ()):
                    self._prefetch(g, "forward")
            try:
                args, kwargs = self._cast(args, kwargs)
                out = self.module(*args, **kwargs)
            finally:
                self._free_unit(None)
                self._drop_prefetched()  # a unit this forward skipped
        self._fw_order = list(self._fw_seen)
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradient shards by the global 2-norm (one all-reduce of one value); return the norm before.

        ``torch.nn.utils.clip_grad_norm_(zero3.parameters(), ...)`` would see this rank's shards only."""
        max_norm = validate_number("max_norm", max_norm, minimum=0, open_low=True, hint="e.g. 1.0")
        grads = [s.grad for s in self.shards if s.grad is not None]
        sq = torch.zeros(1, dtype=torch.float64, device=self._device())
        for g in grads:
            sq += g.double().pow(2).sum()
        self.traffic.all_reduce(sq)
        total = sq.sqrt()[0]
        for g in grads:
            g.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0).to(g.dtype))
        return total

    # --------------------------------------------------------------- inspection and checkpoints
    @torch.no_grad()
    def full_parameters(self) -> list[torch.Tensor]:
        """Every parameter, full, in ``model.parameters()`` order (all ranks must call it: it all-gathers)."""
        fulls = self._gather_groups(label="full_parameters")
        return [fulls[g][j].clone() for g, j in self._places]

    @torch.no_grad()
    def _gather_groups(self, label: str | None) -> list[list[torch.Tensor]]:
        """Every group's parameters, full (views of one fresh buffer per group); counted in :attr:`traffic` under
        ``label``, or not at all when ``label`` is None (a checkpoint's gathers are not a step's)."""
        fulls = []
        for grp in self._groups:
            full = torch.empty(grp.layout.padded, dtype=grp.shard.dtype, device=grp.shard.device)
            src = grp.shard.detach().contiguous()
            if label is None:
                all_gather_tensor(full, src, group=self.group)
            else:
                self.traffic.all_gather(full, src, label=label)
            fulls.append(grp.layout.views(full))
        return fulls

    def held_numel(self) -> int:
        """Parameter values this rank holds now: its shards (trained and frozen) plus anything still gathered."""
        return (sum(g.shard.numel() for g in self._groups) + sum(f.numel() for f in self._gathered.values())
                + sum(f.numel() for f in self._regathered.values())
                + sum(f.numel() for f, _, _, _ in self._prefetched.values()))

    def state_dict(self, *args, **kwargs) -> dict:
        """The model's full state dict (its own keys, as ``model.state_dict()`` before wrapping gives them); every
        rank gets it (an all-gather per unit). :meth:`sharded_state_dict` is this rank's part only."""
        from .checkpoint import full_state_dict

        if args or kwargs.get("destination") is not None:
            raise ArgumentError("Zero3.state_dict() takes no destination: call it on the Zero3 wrapper itself and "
                                "store the dict it returns")
        return full_state_dict(self, keep_vars=bool(kwargs.get("keep_vars", False)))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a full state dict (``model.state_dict()`` of the unwrapped model, or :meth:`state_dict`): each rank
        keeps its slice. Works on any number of ranks."""
        from .checkpoint import load_full_state_dict

        return load_full_state_dict(self, state_dict, strict=strict)

    def sharded_state_dict(self, optimizer=None) -> dict:
        """This rank's slice of every parameter (and of ``optimizer``'s state, when given), by parameter name: save
        one per rank, load them all with :meth:`load_sharded_state_dict` on any number of ranks."""
        from .checkpoint import sharded_state_dict

        return sharded_state_dict(self, optimizer)

    def load_sharded_state_dict(self, states, optimizer=None) -> None:
        """Load what :meth:`sharded_state_dict` gave on every rank of a run (a list, one per rank, any world size)."""
        from .checkpoint import load_sharded_state_dict

        load_sharded_state_dict(self, states, optimizer)
