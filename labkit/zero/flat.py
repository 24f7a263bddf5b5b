"""One flat buffer for many parameters, cut into N equal shards: the bookkeeping under every ZeRO stage (pure).

ZeRO partitions the optimiser state (stage 1), the gradients (stage 2) and the parameters (stage 3) over the N
data-parallel ranks (Rajbhandari et al. 2019, "ZeRO", arXiv 1910.02054, section 5). The simplest partition that
gives every rank exactly the same amount is to lay all P values end to end in one flat buffer, pad it to a multiple
of N, and give rank r the r-th slice of ⌈P/N⌉ values::

    P = 185, N = 4  ->  shard = ⌈185/4⌉ = 47, padded length 188
    flat:   [ w1 (66) | b1 (11) | w2 (77) | b2 (7) | w3 (21) | b3 (3) | pad (3) ]
    rank:   [ 0: 0..47       | 1: 47..94      | 2: 94..141     | 3: 141..188 (3 of them padding) ]

A shard boundary may fall inside a parameter (rank 1 above holds the end of ``w1``, all of ``b1`` and the start of
``w2``): that is fine for element-wise optimisers (SGD, Adam: each value's update depends on that value's gradient
and state only), which is why ZeRO can shard them anywhere, and why a non-element-wise one (LBFGS, a per-row
Adafactor) cannot be sharded this way.
Equal shards are what ``reduce_scatter_tensor`` and ``all_gather_into_tensor`` need: each rank sends and receives
the same number of values. (Torch's ``ZeroRedundancyOptimizer`` instead gives whole parameters to ranks, greedily,
which is uneven; lab 10 measures it.)

Shared (tied) parameters: the same tensor passed twice, as an embedding tied to an output head, is kept *once*, at
its first position (identity decides, as ``nn.Module.parameters()`` does), so it gets one slot and one gradient.
Two different tensors that overlap in memory (views of one storage) are refused: they could not be updated apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import ArgumentError, validate_int

__all__ = ["FlatLayout", "unique_params", "ceil_div"]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def unique_params(params, what: str = "params") -> list[torch.Tensor]:
    """The tensors of ``params`` in order, each kept once (tied parameters deduplicated by identity).

    Refuses an empty list, non-tensors, mixed dtypes or devices, and distinct tensors sharing memory."""
    if isinstance(params, torch.Tensor):
        raise ArgumentError(f"{what} must be an iterable of tensors (e.g. model.parameters()), got one tensor; "
                            f"wrap it in a list: [{what}]")
    out, seen = [], set()
    for i, p in enumerate(params):
        if isinstance(p, dict):
            raise ArgumentError(f"{what}[{i}] is a dict (a parameter group); labkit's ZeRO takes one group: pass "
                                f"the tensors (model.parameters()) and the hyper-parameters as keyword arguments")
        if not isinstance(p, torch.Tensor):
            raise ArgumentError(f"{what}[{i}] must be a tensor, got {type(p).__name__}; pass model.parameters()")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise ArgumentError(f"{what} is empty: pass the parameters to shard, e.g. model.parameters()")
    kinds = {(p.dtype, p.device) for p in out}
    if len(kinds) > 1:
        found = ", ".join(sorted(f"{d}/{dev}" for d, dev in kinds))
        raise ArgumentError(f"{what} mix dtypes or devices ({found}); one flat buffer holds one dtype on one "
                            f"device: convert the model first (model.to(dtype, device)) or shard each kind apart")
    spans = sorted((p.untyped_storage().data_ptr() + p.storage_offset() * p.element_size(),
                    p.numel() * p.element_size(), i) for i, p in enumerate(out) if p.numel())
    for (a, na, i), (b, _, j) in zip(spans, spans[1:]):
        if b < a + na:
            raise ArgumentError(f"{what}[{i}] and {what}[{j}] are different tensors sharing memory (views of one "
                                f"storage); they cannot be sharded apart: tie them as one parameter, or clone one")
    return out


@dataclass(frozen=True)
class FlatLayout:
    """Where each of ``shapes`` lies in a flat buffer padded to a multiple of ``world_size``.

    ``offsets[i]``/``numels[i]``: parameter i's slice; ``total`` = P; ``shard_numel`` = ⌈P/N⌉; ``padded`` =
    N·⌈P/N⌉; ``shard_range(r)`` is rank r's slice ``[r·shard, (r+1)·shard)`` of the padded buffer."""

    shapes: tuple
    world_size: int
    padding_only_ok: bool = False  # ZeRO-3's small groups (a frozen bias): a rank may hold only padding

    def __post_init__(self):
        n = validate_int("world_size", self.world_size, minimum=1, hint="the number of ranks that share the buffer")
        shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        object.__setattr__(self, "shapes", shapes)
        if not shapes:
            raise ArgumentError("shapes is empty: a layout needs at least one parameter")
        total = sum(_numel(s) for s in shapes)
        if n > total and not self.padding_only_ok:
            raise ArgumentError(f"world_size={n} is larger than the {total} values to shard: every rank must own "
                                f"at least one value; use world_size <= {total} (or a bigger model)")

    @classmethod
    def of(cls, params, world_size: int) -> "FlatLayout":
        """The layout of ``unique_params(params)``."""
        return cls(tuple(tuple(p.shape) for p in unique_params(params)), world_size)

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(_numel(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, o = [], 0
        for n in self.numels:
            out.append(o)
            o += n
        return tuple(out)

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def shard_numel(self) -> int:
        return ceil_div(self.total, self.world_size)

    @property
    def padded(self) -> int:
        return self.shard_numel * self.world_size

    @property
    def padding(self) -> int:
        return self.padded - self.total

    def shard_range(self, rank: int) -> tuple[int, int]:
        r = validate_int("rank", rank, minimum=0, maximum=self.world_size - 1)
        return r * self.shard_numel, (r + 1) * self.shard_numel

    def owner(self, index: int) -> int:
        """The rank whose shard holds flat position ``index``."""
        return validate_int("index", index, minimum=0, maximum=self.padded - 1) // self.shard_numel

    def pieces(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """``[(rank, lo, hi)]``: how the flat range ``[start, end)`` splits over the ranks' shards."""
        out, lo = [], start
        while lo < end:
            r = lo // self.shard_numel
            hi = min(end, (r + 1) * self.shard_numel)
            out.append((r, lo, hi))
            lo = hi
        return out

    def flatten(self, tensors, *, dtype=None, device=None) -> torch.Tensor:
        """A new padded flat buffer holding ``tensors`` (``None`` entries give zeros)."""
        tensors = list(tensors)
        if len(tensors) != len(self.shapes):
            raise ArgumentError(f"got {len(tensors)} tensors for a layout of {len(self.shapes)} parameters; pass "
                                f"one tensor per parameter, in the layout's order")
        ref = next((t for t in tensors if t is not None), None)
        dtype = dtype or (ref.dtype if ref is not None else torch.float32)
        device = device or (ref.device if ref is not None else "cpu")
        flat = torch.zeros(self.padded, dtype=dtype, device=device)
        for t, o, n, s in zip(tensors, self.offsets, self.numels, self.shapes):
            if t is None:
                continue
            if tuple(t.shape) != s:
                raise ArgumentError(f"a tensor of shape {tuple(t.shape)} where the layout has {s}; pass tensors "
                                    f"in the layout's order and shapes")
            flat[o:o + n].copy_(t.detach().reshape(-1))
        return flat

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (length ``padded`` or ``total``) shaped as the parameters (no copy)."""
        if flat.dim() != 1 or flat.numel() not in (self.total, self.padded):
            raise ArgumentError(f"flat must be 1-D with {self.padded} (padded) or {self.total} values, got shape "
                                f"{tuple(flat.shape)}")
        # split, not one slice per parameter: autograd's backward of a slice builds a zero-filled copy of the whole
        # buffer for every parameter, split's builds one (the gradients concatenated, zeros where one is missing)
        sizes = list(self.numels) + ([flat.numel() - self.total] if flat.numel() > self.total else [])
        return [piece.view(s) for piece, s in zip(flat.split(sizes), self.shapes)]

    def table(self) -> list[dict]:
        """One row per rank: its range, the real values it holds and the parameters it touches."""
        rows = []
        for r in range(self.world_size):
            lo, hi = self.shard_range(r)
            touched = [i for i, (o, n) in enumerate(zip(self.offsets, self.numels)) if o < hi and o + n > lo]
            rows.append({"rank": r, "start": lo, "end": hi, "values": max(0, min(hi, self.total) - lo),
                         "padding": hi - max(lo, min(hi, self.total)), "params": touched})
        return rows


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
