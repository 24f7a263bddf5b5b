"""ZeRO stage 3 from scratch: the parameters themselves are sharded, and gathered only while a unit needs them.

:class:`Zero3` wraps a model given a list of *units* (submodules; by default its top-level children that hold
parameters). Each unit's parameters are laid out flat (``FlatLayout``) and rank r keeps only its ⌈P_u/N⌉ values,
as one leaf ``nn.Parameter`` (``zero3.parameters()``: give those to any optimiser, whose state is then sharded
too). Per step and unit (Rajbhandari et al. 2019, arXiv 1910.02054, sections 5.3 and 7.2.2):

1. forward: a forward pre-hook all-gathers the unit's full parameters (Ψ_u), the unit runs, a forward hook frees
   them. Whatever autograd saves for the backward that is a view of those gathered values is saved as a *recipe*
   (``torch.autograd.graph.saved_tensors_hooks``: which unit, offset, shape, strides), not as the values;
2. backward: the first saved recipe of a unit to be unpacked all-gathers its parameters again (Ψ_u);
3. the gather is one autograd function whose backward reduce-scatters the full gradient (Ψ_u) and divides by N,
   so the shard's ``.grad`` is this rank's slice of the averaged gradient; the re-gathered values are freed there.

That is 3Ψ per step instead of data parallelism's 2Ψ, in exchange for holding 1/N of the weights between units.
(At most 3Ψ: a unit whose weights no backward formula needs is not gathered again. The first layer of a model
whose input needs no gradient is one: its weight gradient needs the input, not the weight. ``traffic``
labels the gathers "forward" and "backward", so a test can see which units were gathered twice.)
Shard sizes are per unit, so the state is Σ_u ⌈P_u/N⌉ values per buffer (the first FSDP also flattened each
unit; FSDP2 instead splits every parameter along its first dimension, unevenly when N does not divide it).
The original parameters are removed from the model (the units hold plain tensor attributes only while gathered);
:meth:`Zero3.full_parameters` gathers them back, in ``model.parameters()`` order, e.g. for a checkpoint.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .._validate import ArgumentError, validate_number
from ..collectives import ranks_agree
from ..distops import require_dist
from .comm import Traffic
from .flat import FlatLayout, unique_params

__all__ = ["Zero3"]


class _Gather(torch.autograd.Function):
    """shard -> full flat parameters; backward: full gradient -> reduce-scatter -> averaged gradient shard."""

    @staticmethod
    def forward(ctx, shard, owner, u):
        # the forward's all-gather (Ψ_u): every rank sends its shard and receives the others', so each holds unit
        # u's full flat parameters while the unit runs. Being an autograd function, autograd records shard -> full
        # as one edge, and the gradient of the full buffer flows back through backward() below
        ctx.owner, ctx.u = owner, u
        return owner._all_gather(u, shard)

    @staticmethod
    def backward(ctx, grad_full):
        # reached once autograd has summed the gradient of every view of the unit's gathered parameters (every
        # layer of the unit has run its backward): no backward formula needs the re-gathered weights any more
        owner, u = ctx.owner, ctx.u
        owner._regathered.pop(u, None)  # free the backward's copy (Ψ_u): only the shard stays between steps
        # reduce-scatter (Ψ_u): rank r receives the sum over ranks of its own slice of the full gradient, so no
        # rank ever holds another rank's summed gradient; dividing by N turns the sum into DDP's mean
        mine = torch.empty(owner.layouts[u].shard_numel, dtype=grad_full.dtype, device=grad_full.device)
        owner.traffic.reduce_scatter(mine, grad_full.contiguous())
        return mine.div_(owner.world_size), None, None  # the shard's .grad: what the optimiser steps


class Zero3(nn.Module):
    """Shard ``module``'s parameters unit by unit over the ranks of ``group``; gather each unit only to use it."""

    def __init__(self, module: nn.Module, units=None, *, group=None, broadcast: bool = True):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ArgumentError(f"module must be an nn.Module (the model), got {type(module).__name__}")
        self.world_size, self.rank, self.group = require_dist(group), dist.get_rank(group), group
        units = self._check_units(module, units)
        if not ranks_agree([len(units), sum(p.numel() for p in module.parameters())], group=group):
            raise ArgumentError("the model or its units differ across ranks; build the same model and pass the "
                                "same units on every rank")
        self.module = module
        self.units = units
        self.traffic = Traffic(group)
        self.layouts, self.slots = [], []  # slots[u][j]: every (submodule, name) holding parameter j of unit u
        self.shards = nn.ParameterList()
        self._order = {id(p): k for k, p in enumerate(module.parameters())}
        self._places = []  # (unit, index in unit) per model parameter, in model.parameters() order
        src = dist.get_global_rank(group, 0) if group is not None else 0
        where: dict[int, list] = {}  # a tied parameter sits in several modules: every one gets the gathered view
        for m in module.modules():
            for n, p in m._parameters.items():
                if p is not None:
                    where.setdefault(id(p), []).append((m, n))
        for u, unit in enumerate(units):
            params = unique_params(unit.parameters(), what=f"units[{u}].parameters()")
            inside = {id(m) for m in unit.modules()}
            for p in params:  # a weight tied to a module outside its unit would be used while not gathered
                outside = [type(m).__name__ for m, _ in where[id(p)] if id(m) not in inside]
                if outside:
                    raise ArgumentError(f"a parameter of units[{u}] is also held by a {outside[0]} outside that unit "
                                        f"(tied weights); put every module that uses it in one unit, "
                                        f"e.g. units=[model]")
            lay = FlatLayout(tuple(tuple(p.shape) for p in params), self.world_size)
            with torch.no_grad():
                if broadcast:
                    for p in params:
                        dist.broadcast(p.data, src=src, group=group)
                lo, hi = lay.shard_range(self.rank)
                self.shards.append(nn.Parameter(lay.flatten(params)[lo:hi].clone()))
            self.layouts.append(lay)
            self.slots.append([where[id(p)] for p in params])
            for j, p in enumerate(params):
                self._places.append((self._order[id(p)], u, j))
        self._places = [(u, j) for _, u, j in sorted(self._places)]
        for slots in self.slots:  # the model keeps no full copy: only the shards remain
            for places in slots:
                for m, name in places:
                    del m._parameters[name]
                    setattr(m, name, None)
        self._gathered: dict[int, torch.Tensor] = {}     # forward: unit -> full flat values (with autograd)
        self._regathered: dict[int, torch.Tensor] = {}   # backward: unit -> full flat values (no autograd)
        self._hooks = []
        for u, unit in enumerate(units):
            self._hooks.append(unit.register_forward_pre_hook(lambda _m, _a, u=u: self._before(u)))
            self._hooks.append(unit.register_forward_hook(lambda _m, _a, _o, u=u: self._after(u)))

    @staticmethod
    def _check_units(module, units) -> list[nn.Module]:
        if units is None:
            units = [c for c in module.children() if any(True for _ in c.parameters())]
            if not units:
                units = [module]
        units = list(units)
        inside = {id(m) for m in module.modules()}
        for i, m in enumerate(units):
            if not isinstance(m, nn.Module) or id(m) not in inside:
                raise ArgumentError(f"units[{i}] ({type(m).__name__}) is not a submodule of the model; pass "
                                    f"submodules of it, e.g. list(model.children())")
        owner: dict[int, int] = {}
        for i, m in enumerate(units):
            for p in m.parameters():
                if id(p) in owner and owner[id(p)] != i:
                    raise ArgumentError(f"units[{owner[id(p)]}] and units[{i}] share a parameter (nested units or "
                                        f"tied weights); pass units whose parameters do not overlap")
                owner[id(p)] = i
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        if frozen:
            raise ArgumentError(f"parameters {frozen[:5]} are frozen (requires_grad=False); Zero3 trains every "
                                f"parameter it shards: keep frozen layers out of the model you wrap, or unfreeze them")
        missing = [n for n, p in module.named_parameters() if id(p) not in owner]
        if missing:
            raise ArgumentError(f"the units do not cover the model's parameters {missing[:5]}"
                                f"{' ...' if len(missing) > 5 else ''}: every parameter must belong to a unit; "
                                f"add the modules holding them to units (or pass units=[model])")
        return units

    # --------------------------------------------------------------- gathering and freeing
    # One step, unit by unit: _before (pre-hook) gathers, the unit runs, _after (hook) frees; autograd saves the
    # weights it needs as recipes (_pack), the backward gathers them again on first use (_unpack), and _Gather's
    # backward reduce-scatters the gradient and frees that second copy. Between units a rank holds only shards.
    def _all_gather(self, u: int, shard: torch.Tensor, label: str = "forward") -> torch.Tensor:
        # a fresh buffer each time (not a cached one): once every reference to it is dropped, the memory is free
        full = torch.empty(self.layouts[u].padded, dtype=shard.dtype, device=shard.device)
        self.traffic.all_gather(full, shard.detach().contiguous(), label=label)  # counted: Ψ_u, "forward"/"backward"
        return full

    def _set(self, u: int, full) -> None:
        # point every module that holds one of unit u's parameters (tied ones: several) at its view of the full
        # buffer (no copy), or at None to drop them, so the unit's own forward reads self.weight as usual
        views = self.layouts[u].views(full) if full is not None else [None] * len(self.slots[u])
        for places, v in zip(self.slots[u], views):
            for m, name in places:
                setattr(m, name, v)

    def _before(self, u: int) -> None:  # forward pre-hook of unit u: gather, then let the unit run
        shard = self.shards[u]
        # with grad: through _Gather, so the backward reaches the shard (reduce-scatter); under no_grad (eval,
        # inference) a plain all-gather is enough and nothing is saved for a backward
        full = _Gather.apply(shard, self, u) if torch.is_grad_enabled() else self._all_gather(u, shard)
        self._gathered[u] = full  # _pack recognises views of it by their storage while the unit runs
        self._set(u, full)

    def _after(self, u: int) -> None:  # forward hook of unit u: it has run, free its full parameters
        self._set(u, None)
        # the last references to the gathered buffer go here, unless autograd saved views of it: _pack stored
        # those as recipes instead, so the Ψ_u bytes are really released until the backward needs them again
        self._gathered.pop(u, None)

    def _pack(self, t: torch.Tensor):
        # autograd is about to save t for the backward. A view of a gathered unit (a weight, its transpose) is
        # saved as a recipe (unit, offset, shape, strides) instead of the tensor, which would keep the whole
        # gathered buffer alive and hold Ψ, not Ψ/N, until the backward; anything else (activations) is kept
        if t.layout is torch.strided:
            ptr = t.untyped_storage().data_ptr()
            for u, full in self._gathered.items():
                if full.untyped_storage().data_ptr() == ptr:
                    return ("zero3", u, t.storage_offset(), tuple(t.shape), t.stride(), t.requires_grad)
        return t

    def _unpack(self, packed):
        # the backward needs a saved tensor back. For a recipe, the unit's first one gathers its parameters again
        # (Ψ_u, without autograd: the gradient goes through _Gather's edge, not this copy); the unit's later
        # recipes reuse that copy, which _Gather.backward frees once the unit's gradient is complete
        if not (isinstance(packed, tuple) and packed and packed[0] == "zero3"):
            return packed
        _, u, offset, shape, stride, _ = packed
        if u not in self._regathered:  # the unit's second all-gather, in the backward
            with torch.no_grad():
                self._regathered[u] = self._all_gather(u, self.shards[u], "backward")
        return self._regathered[u].as_strided(shape, stride, offset)  # the same view, rebuilt on the new copy

    def forward(self, *args, **kwargs):
        # the hooks on the units do the gathering and freeing; this context turns what autograd saves from the
        # gathered weights into recipes for the whole forward (and so for the backward it records)
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradient shards by the global 2-norm (one all-reduce of one value); return the norm before.

        ``torch.nn.utils.clip_grad_norm_(zero3.parameters(), ...)`` would see this rank's shards only."""
        max_norm = validate_number("max_norm", max_norm, minimum=0, open_low=True, hint="e.g. 1.0")
        grads = [s.grad for s in self.shards if s.grad is not None]
        sq = torch.zeros(1, dtype=torch.float64, device=self.shards[0].device)
        for g in grads:
            sq += g.double().pow(2).sum()
        self.traffic.all_reduce(sq)
        total = sq.sqrt()[0]
        for g in grads:
            g.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0).to(g.dtype))
        return total

    # --------------------------------------------------------------- inspection
    @torch.no_grad()
    def full_parameters(self) -> list[torch.Tensor]:
        """Every parameter, full, in ``model.parameters()`` order (all ranks must call it: it all-gathers)."""
        fulls = [[t.clone() for t in lay.views(self._all_gather(u, self.shards[u], "full_parameters"))]
                 for u, lay in enumerate(self.layouts)]
        return [fulls[u][j] for u, j in self._places]

    def held_numel(self) -> int:
        """Parameter values this rank holds now: its shards plus any unit still gathered."""
        return (sum(s.numel() for s in self.shards) + sum(f.numel() for f in self._gathered.values())
                + sum(f.numel() for f in self._regathered.values()))
