"""One grid of process groups for several parallelisms at once: ``ctx.mesh(dp=, pp=, tp=)`` (lab 11).

The world's ranks are laid out on a dp × pp × tp grid, tensor parallel innermost, as Megatron-LM places them
(Narayanan et al. 2021, section 3.3: the tensor-parallel ranks of one stage sit on one node, where the
bandwidth is highest); global rank ``g = (d · pp + p) · tp + t``. Each rank belongs to three groups: the ranks
that differ from it only in their dp coordinate (they hold the same weights and average their gradients), only
in pp (one pipeline), only in tp (one layer's shards).

The groups come from PyTorch's own :func:`torch.distributed.device_mesh.init_device_mesh`, which runs on gloo
(CPU) and NCCL; this module adds the coordinates, the member lists, a clear error for a grid that does not match
the world, and a cache, so that a :class:`~labkit.runtime.Pool` that runs the same grid again reuses its groups
(creating a group is a collective every rank must join, and groups are never freed).

    def fn(ctx):
        m = ctx.mesh(dp=2, pp=2, tp=2)          # on 8 ranks
        m.coords        # {"dp": 1, "pp": 0, "tp": 1} on global rank 5
        m.group("tp")   # a ProcessGroup for torch.distributed calls: dist.all_reduce(x, group=m.group("tp"))
        m.members["pp"] # the global ranks of this rank's pipeline, in stage order: [5, 7]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._validate import ArgumentError, validate_int

DIMS = ("dp", "pp", "tp")


def _factorisations(world: int) -> list[tuple[int, int, int]]:
    return [(d, p, world // (d * p)) for d in range(1, world + 1) if world % d == 0
            for p in range(1, world // d + 1) if (world // d) % p == 0]


def validate_shape(world_size: int, dp: int = 1, pp: int = 1, tp: int = 1) -> tuple[int, int, int]:
    """``(dp, pp, tp)`` checked: positive integers whose product is ``world_size``; the error lists grids that fit."""
    dp, pp, tp = (validate_int(n, v, minimum=1) for n, v in (("dp", dp), ("pp", pp), ("tp", tp)))
    if dp * pp * tp != world_size:
        some = ", ".join(f"{d}×{p}×{t}" for d, p, t in _factorisations(world_size)[:8])
        raise ArgumentError(f"mesh dp={dp} × pp={pp} × tp={tp} = {dp * pp * tp} ranks, but the world has "
                            f"{world_size}: the product must equal the world size (for {world_size} ranks, "
                            f"for example dp×pp×tp = {some})")
    return dp, pp, tp


def coords_of(rank: int, dp: int, pp: int, tp: int) -> dict:
    """The (dp, pp, tp) coordinates of global rank ``rank`` (tensor parallel innermost)."""
    return {"dp": rank // (pp * tp), "pp": (rank // tp) % pp, "tp": rank % tp}


def rank_of(d: int, p: int, t: int, pp: int, tp: int) -> int:
    return (d * pp + p) * tp + t


def members_of(rank: int, dp: int, pp: int, tp: int) -> dict:
    """For each dimension, the global ranks of ``rank``'s group in it, ordered by their coordinate."""
    c = coords_of(rank, dp, pp, tp)
    return {"dp": [rank_of(d, c["pp"], c["tp"], pp, tp) for d in range(dp)],
            "pp": [rank_of(c["dp"], p, c["tp"], pp, tp) for p in range(pp)],
            "tp": [rank_of(c["dp"], c["pp"], t, pp, tp) for t in range(tp)]}


def layout(dp: int, pp: int, tp: int) -> list[list[list[int]]]:
    """``layout[d][p][t]``: the global rank at each coordinate (pure arithmetic: what the picture shows)."""
    return [[[rank_of(d, p, t, pp, tp) for t in range(tp)] for p in range(pp)] for d in range(dp)]


@dataclass
class Mesh:
    """This rank's place on the grid and its groups (see the module docstring)."""

    rank: int
    shape: dict                      # {"dp": 2, "pp": 2, "tp": 2}
    coords: dict                     # {"dp": 1, "pp": 0, "tp": 1}
    members: dict                    # {"dp": [1, 5], ...}: global ranks of this rank's groups
    device_mesh: Any = None          # torch's DeviceMesh
    groups: dict = field(default_factory=dict)

    def group(self, dim: str):
        """The ProcessGroup of dimension ``dim`` ("dp", "pp" or "tp")."""
        if dim not in self.groups:
            raise ArgumentError(f"dim must be one of {DIMS}, got {dim!r}")
        return self.groups[dim]

    def size(self, dim: str) -> int:
        return self.shape[dim]

    def describe(self) -> str:
        c, m = self.coords, self.members
        return (f"rank {self.rank} at dp={c['dp']} pp={c['pp']} tp={c['tp']}: dp group {m['dp']}, "
                f"pp group {m['pp']}, tp group {m['tp']}")


def build_mesh(ctx, dp: int = 1, pp: int = 1, tp: int = 1, pp_backend: str | None = None) -> Mesh:
    """The mesh for this rank (every rank must call it, with the same shape). Cached on ``ctx``.

    ``pp_backend="gloo"``: the pipeline group on gloo even under NCCL (lab 04's executor sends through gloo,
    because an NCCL send waits for its receive and 1F1B does not pair them); the default is gloo then."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dp, pp, tp = validate_shape(ctx.world_size, dp, pp, tp)
    if pp_backend is None and ctx.backend != "gloo":
        pp_backend = "gloo"
    key = ("mesh", dp, pp, tp, pp_backend)
    if key in ctx.cache:
        return ctx.cache[key]
    device_type = "cuda" if getattr(ctx.device, "type", "cpu") == "cuda" else "cpu"
    override = {"pp": pp_backend} if pp_backend and pp_backend != ctx.backend else None
    dm = init_device_mesh(device_type, (dp, pp, tp), mesh_dim_names=DIMS, backend_override=override)
    groups = {d: dm.get_group(d) for d in DIMS}
    members = members_of(ctx.rank, dp, pp, tp)
    for d in DIMS:  # the library's layout must be the one this module documents (and draws)
        got = dist.get_process_group_ranks(groups[d])
        if sorted(got) != members[d]:
            raise RuntimeError(f"init_device_mesh's {d} group on rank {ctx.rank} is {sorted(got)}, "
                               f"expected {members[d]}: its rank layout has changed")
    mesh = Mesh(ctx.rank, {"dp": dp, "pp": pp, "tp": tp}, coords_of(ctx.rank, dp, pp, tp), members, dm, groups)
    ctx.cache[key] = mesh
    return mesh
