"""One grid of process groups for several parallelisms at once: ``ctx.mesh(dp=, pp=, tp=)`` (lab 11), and
``ctx.mesh(dp=, cp=, tp=, pp=)`` with context parallelism as a fourth dimension (lab 12).

The world's ranks are laid out on a dp × pp × cp × tp grid, tensor parallel innermost, then context parallel, as
Megatron-LM places them (Narayanan et al. 2021, section 3.3: the tensor-parallel ranks of one stage sit on one node,
where the bandwidth is highest; Megatron-Core keeps the cp ranks next to them, as ring attention sends every layer);
global rank ``g = ((d · pp + p) · cp + c) · tp + t``. With cp = 1 (the default) this is lab 11's
``g = (d · pp + p) · tp + t``: every rank keeps its number. Each rank belongs to one group per dimension: the ranks
that differ from it only in their dp coordinate (they hold the same weights and average their gradients), only in
pp (one pipeline), only in cp (one sequence's shards), only in tp (one layer's shards); and to ``dp_cp``, the ranks
that differ from it in dp and cp (the same weights, different rows or tokens: Megatron-LM averages gradients over
it). With cp = 1 ``dp_cp`` is the dp group itself.

The groups come from PyTorch's own :func:`torch.distributed.device_mesh.init_device_mesh`, which runs on gloo
(CPU) and NCCL; this module adds the coordinates, the member lists, a clear error for a grid that does not match
the world, and a cache, so that a :class:`~labkit.runtime.Pool` that runs the same grid again reuses its groups
(creating a group is a collective every rank must join, and groups are never freed).

    def fn(ctx):
        m = ctx.mesh(dp=2, pp=2, tp=2)          # on 8 ranks
        m.coords        # {"dp": 1, "pp": 0, "cp": 0, "tp": 1} on global rank 5
        m.group("tp")   # a ProcessGroup for torch.distributed calls: dist.all_reduce(x, group=m.group("tp"))
        m.members["pp"] # the global ranks of this rank's pipeline, in stage order: [5, 7]
        m = ctx.mesh(dp=1, cp=2, tp=2)          # on 4 ranks: rank 3 is at cp=1, tp=1; its cp group is [1, 3]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._validate import ArgumentError, validate_int

DIMS = ("dp", "pp", "cp", "tp")   # outermost to innermost: the order of the rank layout and of torch's DeviceMesh
GROUPS = DIMS + ("dp_cp",)        # Mesh.group's names: one per dimension, and dp and cp together


def _factorisations(world: int) -> list[tuple[int, int, int]]:
    return [(d, p, world // (d * p)) for d in range(1, world + 1) if world % d == 0
            for p in range(1, world // d + 1) if (world // d) % p == 0]


def validate_shape(world_size: int, dp: int = 1, pp: int = 1, tp: int = 1, cp: int = 1) -> tuple[int, int, int]:
    """``(dp, pp, tp)`` checked: positive integers whose product with ``cp`` is ``world_size``; the error lists grids
    that fit. Returns the three of lab 11 (``cp``, checked as part of the product, is the one you passed)."""
    dp, pp, tp, cp = (validate_int(n, v, minimum=1) for n, v in (("dp", dp), ("pp", pp), ("tp", tp), ("cp", cp)))
    if dp * pp * cp * tp != world_size:
        if cp == 1:
            some = ", ".join(f"{d}×{p}×{t}" for d, p, t in _factorisations(world_size)[:8])
            raise ArgumentError(f"mesh dp={dp} × pp={pp} × tp={tp} = {dp * pp * tp} ranks, but the world has "
                                f"{world_size}: the product must equal the world size (for {world_size} ranks, "
                                f"for example dp×pp×tp = {some})")
        fits = [(d, p, t) for d, p, t in _factorisations(world_size // cp)] if world_size % cp == 0 else []
        some = ", ".join(f"{d}×{p}×{cp}×{t}" for d, p, t in fits[:8]) or f"none with cp={cp}: pass cp dividing " \
                                                                           f"{world_size}"
        raise ArgumentError(f"mesh dp={dp} × pp={pp} × cp={cp} × tp={tp} = {dp * pp * cp * tp} ranks, but the world "
                            f"has {world_size}: the product must equal the world size (for {world_size} ranks, "
                            f"for example dp×pp×cp×tp = {some})")
    return dp, pp, tp


def coords_of(rank: int, dp: int, pp: int, tp: int, cp: int = 1) -> dict:
    """The (dp, pp, cp, tp) coordinates of global rank ``rank`` (tensor parallel innermost, then context parallel)."""
    return {"dp": rank // (pp * cp * tp), "pp": (rank // (cp * tp)) % pp, "cp": (rank // tp) % cp, "tp": rank % tp}


def rank_of(d: int, p: int, t: int, pp: int, tp: int, c: int = 0, cp: int = 1) -> int:
    """The global rank at coordinates (d, p, c, t): ``((d · pp + p) · cp + c) · tp + t``."""
    return ((d * pp + p) * cp + c) * tp + t


def members_of(rank: int, dp: int, pp: int, tp: int, cp: int = 1) -> dict:
    """For each dimension, the global ranks of ``rank``'s group in it, ordered by their coordinate; ``"dp_cp"``: the
    ranks that differ from it in dp and cp, ordered by (dp, cp)."""
    c = coords_of(rank, dp, pp, tp, cp)

    def at(d=c["dp"], p=c["pp"], k=c["cp"], t=c["tp"]):
        return rank_of(d, p, t, pp, tp, k, cp)

    return {"dp": [at(d=d) for d in range(dp)], "pp": [at(p=p) for p in range(pp)],
            "cp": [at(k=k) for k in range(cp)], "tp": [at(t=t) for t in range(tp)],
            "dp_cp": [at(d=d, k=k) for d in range(dp) for k in range(cp)]}


def layout(dp: int, pp: int, tp: int, cp: int = 1) -> list:
    """``layout[d][p][t]``: the global rank at each coordinate (pure arithmetic: what the picture shows); with
    cp > 1, ``layout[d][p][c][t]``."""
    if cp == 1:
        return [[[rank_of(d, p, t, pp, tp) for t in range(tp)] for p in range(pp)] for d in range(dp)]
    return [[[[rank_of(d, p, t, pp, tp, c, cp) for t in range(tp)] for c in range(cp)] for p in range(pp)]
            for d in range(dp)]


@dataclass
class Mesh:
    """This rank's place on the grid and its groups (see the module docstring)."""

    rank: int
    shape: dict                      # {"dp": 2, "pp": 2, "cp": 1, "tp": 2}
    coords: dict                     # {"dp": 1, "pp": 0, "cp": 0, "tp": 1}
    members: dict                    # {"dp": [1, 5], ...}: global ranks of this rank's groups
    device_mesh: Any = None          # torch's DeviceMesh
    groups: dict = field(default_factory=dict)

    def group(self, dim: str):
        """The ProcessGroup of dimension ``dim`` ("dp", "pp", "cp" or "tp"), or of "dp_cp" (dp and cp together)."""
        if dim not in self.groups:
            raise ArgumentError(f"dim must be one of {GROUPS}, got {dim!r}")
        return self.groups[dim]

    def size(self, dim: str) -> int:
        if dim == "dp_cp":
            return self.shape["dp"] * self.shape.get("cp", 1)
        return self.shape[dim]

    def describe(self) -> str:
        c, m = self.coords, self.members
        if self.shape.get("cp", 1) == 1:
            return (f"rank {self.rank} at dp={c['dp']} pp={c['pp']} tp={c['tp']}: dp group {m['dp']}, "
                    f"pp group {m['pp']}, tp group {m['tp']}")
        return (f"rank {self.rank} at dp={c['dp']} pp={c['pp']} cp={c['cp']} tp={c['tp']}: dp group {m['dp']}, "
                f"pp group {m['pp']}, cp group {m['cp']}, tp group {m['tp']}, dp×cp group {m['dp_cp']}")


def build_mesh(ctx, dp: int = 1, pp: int = 1, tp: int = 1, pp_backend: str | None = None, cp: int = 1) -> Mesh:
    """The mesh for this rank (every rank must call it, with the same shape). Cached on ``ctx``.

    ``pp_backend="gloo"``: the pipeline group on gloo even under NCCL (lab 04's executor sends through gloo,
    because an NCCL send waits for its receive and 1F1B does not pair them); the default is gloo then.
    ``cp``: context-parallel ranks (lab 12), between pp and tp in the layout; 1 leaves lab 11's numbering."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    cp = validate_int("cp", cp, minimum=1)
    dp, pp, tp = validate_shape(ctx.world_size, dp, pp, tp, cp)
    if pp_backend is None and ctx.backend != "gloo":
        pp_backend = "gloo"
    key = ("mesh", dp, pp, tp, pp_backend) + ((cp,) if cp > 1 else ())
    if key in ctx.cache:
        return ctx.cache[key]
    device_type = "cuda" if getattr(ctx.device, "type", "cpu") == "cuda" else "cpu"
    override = {"pp": pp_backend} if pp_backend and pp_backend != ctx.backend else None
    dm = init_device_mesh(device_type, (dp, pp, cp, tp), mesh_dim_names=DIMS, backend_override=override)
    groups = {d: dm.get_group(d) for d in DIMS}
    members = members_of(ctx.rank, dp, pp, tp, cp)
    if cp == 1:
        groups["dp_cp"] = groups["dp"]
    else:  # one group per (pp, tp) coordinate, every rank creating each of them in the same order
        every = [members_of(rank_of(0, p, t, pp, tp, 0, cp), dp, pp, tp, cp)["dp_cp"] for p in range(pp)
                 for t in range(tp)]
        groups["dp_cp"], _ = dist.new_subgroups_by_enumeration(every)
    for d in GROUPS:  # the library's layout must be the one this module documents (and draws)
        got = dist.get_process_group_ranks(groups[d])
        if sorted(got) != sorted(members[d]):
            raise RuntimeError(f"init_device_mesh's {d} group on rank {ctx.rank} is {sorted(got)}, "
                               f"expected {members[d]}: its rank layout has changed")
    mesh = Mesh(ctx.rank, {"dp": dp, "pp": pp, "cp": cp, "tp": tp}, coords_of(ctx.rank, dp, pp, tp, cp), members, dm,
                groups)
    ctx.cache[key] = mesh
    return mesh
