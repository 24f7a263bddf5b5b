"""Checkpoints of a :class:`~labkit.zero.Zero3` model: full, or sharded and resumable on another number of ranks.

* **Full** (``zero3.state_dict()``): the model's own state dict, keys and shapes as ``model.state_dict()`` gave
  them before wrapping; every rank all-gathers it. ``zero3.load_state_dict(sd)`` takes such a dict (from a
  Zero3 run on any number of ranks, or from a plain model) and keeps this rank's slice.
* **Sharded** (``zero3.sharded_state_dict(optimizer)``): what this rank holds and nothing more, named by
  parameter, not by flat position: for every parameter that overlaps this rank's shard, the piece it holds
  (``start``: where the piece begins in the parameter's flattened values), and the same pieces of the optimiser's
  per-value state (Adam's two moments), with its per-shard scalars (``step``) and hyperparameters. Each rank saves
  its own (``torch.save(sd, f"ckpt/rank{r}.pt")``: no rank ever holds the whole model); a later run on any number
  of ranks loads every rank's file and each rank copies out the values of its new shard
  (``zero3.load_sharded_state_dict([torch.load(f) for f in files], optimizer)``). This is what torch's
  distributed checkpoint (``torch.distributed.checkpoint``) does with FSDP2's per-parameter ``DTensor`` shards:
  names and offsets on disk, resharded at load.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validate import ArgumentError

__all__ = ["FORMAT", "full_state_dict", "load_full_state_dict", "sharded_state_dict", "load_sharded_state_dict"]

#: What a sharded state dict says it is, so that another dict is refused with a clear message.
FORMAT = "labkit.zero3.sharded/1"


def _param_keys(z3) -> dict:
    """``{state-dict key: (group, index)}`` for every parameter key (a tied weight has several keys)."""
    return {k: gj for k, gj in z3._sd_keys if gj is not None}


@torch.no_grad()
def full_state_dict(z3, keep_vars: bool = False) -> dict:
    fulls = z3._gather_groups(label=None)
    buffers = z3.module.state_dict(keep_vars=keep_vars)  # the parameters are gone from the model: buffers only
    out = {}
    for key, gj in z3._sd_keys:
        if gj is not None:
            out[key] = fulls[gj[0]][gj[1]].clone()
        elif key in buffers:
            out[key] = buffers[key]
    for key, v in buffers.items():  # a buffer registered after wrapping
        out.setdefault(key, v)
    return out


@torch.no_grad()
def load_full_state_dict(z3, state_dict, strict: bool = True):
    if not isinstance(state_dict, dict):
        raise ArgumentError(f"state_dict must be a dict (model.state_dict() or zero3.state_dict()), got "
                            f"{type(state_dict).__name__}; for a sharded one use load_sharded_state_dict")
    if state_dict.get("format") == FORMAT:
        raise ArgumentError("this is a sharded state dict (zero3.sharded_state_dict()); load it with "
                            "zero3.load_sharded_state_dict([every rank's dict], optimizer)")
    pkeys = _param_keys(z3)
    known = {k for k, _ in z3._sd_keys} | set(z3.module.state_dict().keys())
    missing = [k for k in known if k not in state_dict]
    unexpected = [k for k in state_dict if k not in known]
    if strict and (missing or unexpected):
        raise ArgumentError(f"state_dict does not match the model: missing keys {sorted(missing)[:5]}, unexpected "
                            f"keys {sorted(unexpected)[:5]}; pass the state dict of the same model, or strict=False")
    given: dict = {}
    for key, (g, j) in pkeys.items():
        if key in state_dict:
            t = state_dict[key]
            shape = z3._groups[g].layout.shapes[j]
            if tuple(t.shape) != shape:
                raise ArgumentError(f"state_dict[{key!r}] has shape {tuple(t.shape)} where the model has {shape}; "
                                    f"pass the state dict of the same model")
            given.setdefault((g, j), t)
    current = None
    for g, grp in enumerate(z3._groups):
        tensors = [given.get((g, j)) for j in range(len(grp.slots))]
        if any(t is None for t in tensors):  # strict=False and a key missing: keep what the model has
            current = current if current is not None else z3._gather_groups(label=None)
            tensors = [t if t is not None else current[g][j] for j, t in enumerate(tensors)]
        lo, hi = grp.layout.shard_range(z3.rank)
        grp.shard.data.copy_(grp.layout.flatten(tensors, dtype=grp.shard.dtype, device=grp.shard.device)[lo:hi])
    buffers = {k: v for k, v in state_dict.items() if k not in pkeys and k in known}
    z3.module.load_state_dict(buffers, strict=False)
    return nn.modules.module._IncompatibleKeys(sorted(missing), sorted(unexpected))


def _pieces(grp, rank: int):
    """``(index, name, start in the parameter, start in the shard, length)`` of each parameter overlapping
    ``rank``'s shard of the group."""
    lo, hi = grp.layout.shard_range(rank)
    for j, (name, off, n) in enumerate(zip(grp.names, grp.layout.offsets, grp.layout.numels)):
        a, b = max(off, lo), min(off + n, hi)
        if a < b:
            yield j, name, a - off, a - lo, b - a


def _trained_in(z3, optimizer) -> dict:
    """``{id(shard): index of the optimiser's param group}``, after checking the optimiser steps these shards."""
    where = {id(p): i for i, pg in enumerate(optimizer.param_groups) for p in pg["params"]}
    ours = {id(grp.shard) for grp in z3._groups if grp.trainable}
    if not ours <= set(where) or not set(where) <= ours:
        raise ArgumentError("optimizer does not step exactly this Zero3's shards; build it from "
                            "zero3.parameters(), e.g. torch.optim.AdamW(zero3.parameters(), lr=...)")
    return where


@torch.no_grad()
def sharded_state_dict(z3, optimizer=None) -> dict:
    out = {"format": FORMAT, "world_size": z3.world_size, "rank": z3.rank, "params": {}, "shapes": {},
           "buffers": {k: v.detach().clone() for k, v in z3.module.state_dict().items()}, "optim": None}
    for grp in z3._groups:
        for name, shape in zip(grp.names, grp.layout.shapes):
            out["shapes"][name] = shape
        for _, name, start, at, n in _pieces(grp, z3.rank):
            out["params"][name] = {"start": start, "values": grp.shard.detach()[at:at + n].clone()}
    if optimizer is not None:
        where = _trained_in(z3, optimizer)
        optim = {"state": {}, "scalars": {}, "groups": []}
        for g, grp in enumerate(z3._groups):
            if not grp.trainable:
                continue
            st = optimizer.state.get(grp.shard, {})
            per_value = {k for k, v in st.items() if torch.is_tensor(v) and v.shape == grp.shard.shape}
            optim["scalars"][g] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()
                                   if k not in per_value}
            for _, name, start, at, n in _pieces(grp, z3.rank):
                optim["state"][name] = {k: {"start": start, "values": st[k][at:at + n].clone()} for k in per_value}
        for i, pg in enumerate(optimizer.param_groups):
            optim["groups"].append({"options": {k: v for k, v in pg.items() if k != "params"},
                                    "zero3_groups": [g for g, grp in enumerate(z3._groups)
                                                     if grp.trainable and where[id(grp.shard)] == i]})
        out["optim"] = optim
    return out


def _check_states(states) -> list:
    if isinstance(states, dict):
        states = [states]
    states = list(states)
    if not states or not all(isinstance(s, dict) and s.get("format") == FORMAT for s in states):
        raise ArgumentError("states must be the list of every rank's zero3.sharded_state_dict() (one dict per "
                            "rank of the run that saved them)")
    n = states[0]["world_size"]
    ranks = sorted(s["rank"] for s in states)
    if any(s["world_size"] != n for s in states) or ranks != list(range(n)):
        raise ArgumentError(f"states hold ranks {ranks} of a run of {n}: pass exactly one sharded state dict per "
                            f"rank of that run (all {n} of them)")
    return states


def _assemble(states, get, name: str, numel: int, dtype, device, what: str) -> torch.Tensor:
    """One parameter's flattened values (or one of its optimiser buffers) from the pieces every rank saved."""
    full = torch.empty(numel, dtype=dtype, device=device)
    covered = 0
    for s in states:
        piece = get(s)
        if piece is None:
            continue
        v = piece["values"]
        full[piece["start"]:piece["start"] + v.numel()].copy_(v)
        covered += v.numel()
    if covered != numel:
        raise ArgumentError(f"the sharded states hold {covered} of the {numel} values of {what} {name!r}; pass "
                            f"every rank's sharded_state_dict() of the run that saved them")
    return full


@torch.no_grad()
def load_sharded_state_dict(z3, states, optimizer=None) -> None:
    states = _check_states(states)
    saved = states[0]["shapes"]
    ours = {name: shape for grp in z3._groups for name, shape in zip(grp.names, grp.layout.shapes)}
    if set(saved) != set(ours) or any(tuple(saved[k]) != tuple(ours[k]) for k in ours):
        bad = sorted(k for k in set(saved) ^ set(ours)) or sorted(k for k in ours if tuple(saved[k]) != ours[k])
        raise ArgumentError(f"the sharded states are of another model (parameters {bad[:5]} differ in name or "
                            f"shape); load states saved from the same model")
    for grp in z3._groups:
        lo, hi = grp.layout.shard_range(z3.rank)
        fulls = [_assemble(states, lambda s, n=name: s["params"].get(n), name, numel, grp.shard.dtype,
                           grp.shard.device, "parameter").view(shape)
                 for name, numel, shape in zip(grp.names, grp.layout.numels, grp.layout.shapes)]
        grp.shard.data.copy_(grp.layout.flatten(fulls)[lo:hi])
    z3.module.load_state_dict(states[0]["buffers"], strict=False)
    if optimizer is None:
        return
    optim = states[0]["optim"]
    if optim is None:
        raise ArgumentError("the sharded states were saved without an optimiser; pass optimizer=None, or save "
                            "them with zero3.sharded_state_dict(optimizer)")
    where = _trained_in(z3, optimizer)
    for g, grp in enumerate(z3._groups):
        if not grp.trainable:
            continue
        scalars = next((s["optim"]["scalars"][g] for s in states if g in s["optim"]["scalars"]), {})
        keys = {k for s in states for name in grp.names for k in s["optim"]["state"].get(name, {})}
        lo, hi = grp.layout.shard_range(z3.rank)
        st = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()}
        for k in sorted(keys):
            dtype = next(s["optim"]["state"][n][k]["values"].dtype for s in states for n in grp.names
                         if k in s["optim"]["state"].get(n, {}))
            fulls = [_assemble(states, lambda s, n=name, k=k: s["optim"]["state"].get(n, {}).get(k), name, numel,
                               dtype, grp.shard.device, f"optimiser state {k!r} of").view(shape)
                     for name, numel, shape in zip(grp.names, grp.layout.numels, grp.layout.shapes)]
            st[k] = grp.layout.flatten(fulls)[lo:hi].clone()
        optimizer.state[grp.shard] = st
        for saved_pg in optim["groups"]:
            if g in saved_pg["zero3_groups"]:
                optimizer.param_groups[where[id(grp.shard)]].update(saved_pg["options"])

