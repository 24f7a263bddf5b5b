"""Lab 11's rank functions, exercise checks and tour.

- the rank functions the notebook launches, :func:`~labkit.capstone.grid.train_rank` (one rank of the grid) and
  :func:`~labkit.capstone.torch_impl.compare_block_rank` (one block three ways: unsplit, labkit's, torch's), and
  the argument validator :func:`~labkit.capstone.grid.validate_grid`, imported here from where they are defined.
- :func:`check_mesh_groups`: the learner places ranks on a mesh; the check compares every rank's three groups
  with the layout of ``init_device_mesh`` (``arange(world).view(dp, pp, tp)``, which the tests check against real
  process groups), for meshes drawn afresh, while labkit's own mesh arithmetic refuses to run.
- :func:`check_tp_mlp_bytes`: the learner predicts the bytes one rank sends for a tensor-parallel MLP's step; the
  check *measures* them on real ranks (lab 03's column and row layers under a
  :class:`~labkit.capstone.comm.CommMeter`, ring all-reduce) while launching ranks is refused to the prediction.
- :func:`check_configuration`: the learner's function picks (dp, pp, tp) for a model and cluster; the planner's rules
  (:func:`~labkit.capstone.planner.rule_out`) must find nothing against it, and its rank among the feasible
  choices is reported.
"""
from __future__ import annotations

import time

import torch

from ..checks import CheckResult, refusing, refusing_launches, run_cases
from ..runtime import mesh as _mesh
from ..tour import lab_name
from .comm import CommMeter, wire_bytes
from .grid import train_rank, validate_grid
from .torch_impl import compare_block_rank

__all__ = ["MESHES", "train_rank", "compare_block_rank", "validate_grid", "check_mesh_groups", "check_tp_mlp_bytes",
           "check_configuration", "tour"]

MESHES = ((2, 2, 2), (1, 2, 4), (4, 2, 1), (2, 1, 4), (2, 4, 1), (1, 1, 8), (3, 2, 2))


def check_mesh_groups(place) -> CheckResult:
    """``place(rank, dp, pp, tp) -> {"dp": [...], "pp": [...], "tp": [...]}``: the global ranks of each group of
    ``rank``, in the order of their coordinate, for a dp × pp × tp mesh with tensor parallel innermost."""

    def case(dp, pp, tp):
        def thunk():
            grid = torch.arange(dp * pp * tp).view(dp, pp, tp)
            with refusing(_mesh.coords_of, _mesh.members_of, _mesh.layout,
                          why="you called labkit's mesh arithmetic: compute the groups from the layout yourself"):
                for g in range(dp * pp * tp):
                    d, p, t = ((grid == g).nonzero()[0]).tolist()
                    want = {"dp": grid[:, p, t].tolist(), "pp": grid[d, :, t].tolist(), "tp": grid[d, p, :].tolist()}
                    got = place(g, dp, pp, tp)
                    if not isinstance(got, dict):
                        raise AssertionError(f"return a dict with keys 'dp', 'pp', 'tp', got {got!r}")
                    for dim in ("dp", "pp", "tp"):
                        if list(got.get(dim, [])) != want[dim]:
                            raise AssertionError(f"rank {g}: {dim} group {got.get(dim)!r}, expected {want[dim]}")
        return thunk

    return run_cases("ranks on a mesh", [(f"{d}×{p}×{t}", case(d, p, t)) for d, p, t in MESHES],
                     hint="global rank = (d·pp + p)·tp + t; a group varies one coordinate and keeps the other two")


def _mlp_bytes_rank(ctx, cases) -> list:
    """Run a column-then-row MLP on this world's ranks for each case and return the payload all-reduced."""
    from torch import nn

    from ..sliced.channels import ColumnParallel, RowParallel

    out = []
    m = ctx.mesh(dp=1, pp=1, tp=ctx.world_size)
    for b, s, h, e in cases:
        dtype = {8: torch.float64, 4: torch.float32, 2: torch.bfloat16}[e]
        torch.manual_seed(0)
        fc1, fc2 = nn.Linear(h, 4 * h).to(ctx.device, dtype), nn.Linear(4 * h, h).to(ctx.device, dtype)
        col = ColumnParallel(fc1, gather_output=False, group=m.group("tp"))
        row = RowParallel(fc2, input_is_split=True, group=m.group("tp"))
        x = torch.randn(b, s, h, dtype=dtype).to(ctx.device).requires_grad_(True)
        meter = CommMeter({"tp": m.group("tp")})
        with meter:
            row(torch.nn.functional.gelu(col(x))).sum().backward()
        out.append(meter.by_group()["tp"]["all_reduce"]["bytes"])
    return out


def check_tp_mlp_bytes(predict, cases=None) -> CheckResult:
    """``predict(b, s, h, t, e) -> bytes``: what one of ``t`` tensor-parallel ranks sends on the wire (ring
    algorithms) in one forward and backward of the MLP ``h -> 4h -> h`` on ``b × s`` tokens of ``e``-byte values.
    The truth is measured on ``t`` real ranks."""
    from .. import launch

    cases = cases or {2: [(2, 16, 64, 8), (3, 8, 32, 4)], 4: [(1, 16, 64, 8)]}
    measured = {}
    for t, cs in cases.items():
        res = launch(_mlp_bytes_rank, world_size=t, args=(cs,), echo=False, quiet=True, timeout=180)
        for c, payload in zip(cs, res[0]):
            measured[(t,) + tuple(c)] = wire_bytes("all_reduce", payload, t)

    def case(t, b, s, h, e):
        def thunk():
            with refusing_launches("the prediction must not run the MLP: predict it from b, s, h, t and e"):
                got = predict(b, s, h, t, e)
            want = measured[(t, b, s, h, e)]
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                raise AssertionError(f"return a number of bytes, got {got!r}")
            if abs(got - want) > 1e-6 * want:
                raise AssertionError(f"predicted {got:,.0f} bytes; measured on {t} ranks: {want:,.0f}")
        return thunk

    return run_cases("bytes of a tensor-parallel MLP",
                     [(f"b={b} s={s} h={h} t={t} e={e}", case(t, b, s, h, e)) for (t, b, s, h, e) in measured],
                     hint="one all-reduce of the b·s·h output in the forward and one of the input's gradient in "
                          "the backward; a ring all-reduce sends 2(t-1)/t of the tensor")


def check_configuration(choose, model, cluster) -> CheckResult:
    """``choose(model, cluster) -> (dp, pp, tp)`` for the planner's ``model`` and ``cluster``: no rule of the planner
    may rule the choice out (memory, tensor parallel across nodes, divisibility, bubble)."""
    from . import planner as _planner
    from .planner import plan, rule_out

    def thunk():
        with refusing(_planner.evaluate, why="you called the planner: choose from the model's memory and the "
                                             "placement rule yourself"):
            choice = choose(model, cluster)
        if not (isinstance(choice, (tuple, list)) and len(choice) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in choice)):
            raise AssertionError(f"return a tuple of three integers (dp, pp, tp), got {choice!r}")
        if choice[0] * choice[1] * choice[2] != cluster.gpus:
            raise AssertionError(f"dp·pp·tp = {choice[0] * choice[1] * choice[2]}, but the cluster has "
                                 f"{cluster.gpus} GPUs: use them all")
        reasons = rule_out(*choice, model, cluster)
        if reasons:
            raise AssertionError("; ".join(reasons))
        feasible = [c for c in plan(model, cluster) if not c.reasons]
        where = next(i for i, c in enumerate(feasible) if (c.dp, c.pp, c.tp) == tuple(choice))
        print(f"{tuple(choice)} is feasible: number {where + 1} of {len(feasible)} by the planner's estimated "
              "step time")

    return run_cases("a configuration for the cluster", [(f"{cluster.gpus} GPUs", thunk)],
                     hint="keep tensor parallel inside a node, add pipeline stages until the model fits, and give "
                          "the remaining GPUs to data parallelism")


def tour(world_size: int = 2) -> list[dict]:
    """Headless quick path: the 2×2×2 grid for 2 steps against one process, its bytes against the formulas,
    sequence parallelism on 2 ranks, torch's tensor parallelism, and the planner on a published configuration."""
    from ..tour import run_check
    from .grid import run_grid
    from .model import Config, train_single
    from .traffic import predict

    lab, state = lab_name(__package__), {}

    def grid():
        t0 = time.perf_counter()
        run = state["run"] = run_grid(2, 2, 2, steps=2, timeout=300)
        d = run.compare(train_single(2))
        return max(d.values()) < 1e-9, (f"loss {run.losses[-1]:.4f}, max diff {max(d.values()):.1e}, "
                                        f"{time.perf_counter() - t0:.1f} s incl. start-up")

    rows = [run_check(lab, "2×2×2 grid, 2 steps == one process (float64)", grid)]
    if "run" in state:
        def nbytes():
            run = state["run"]
            want = predict(Config(), 2, 2, 2, batch=16, n_micro=run.n_micro)
            got = {g: sum(v.values()) for g, v in run.bytes.items()}
            exp = {g: sum(v.values()) for g, v in want.items()}
            return got == exp, ", ".join(f"{g} {got[g] / 1e3:.1f} kB" for g in sorted(got)) + " per rank per step"
        rows.append(run_check(lab, "bytes per group == the formulas", nbytes))

    def sp():
        run = run_grid(1, 1, 2, sp=True, steps=2, timeout=180)
        d = run.compare(train_single(2))
        return max(d.values()) < 1e-9, f"max diff {max(d.values()):.1e}, tp wire {run.wire['tp'] / 1e3:.0f} kB"
    rows.append(run_check(lab, "sequence parallel 1×1×2 == one process", sp))

    def torch_tp():
        from .. import launch

        out = launch(compare_block_rank, world_size=2, echo=False, quiet=True, timeout=180)[0]
        if "torch_error" in out:
            return False, out["torch_error"]
        return max(out["labkit"], out["torch"]) < 1e-12, f"labkit {out['labkit']:.0e}, torch {out['torch']:.0e}"
    rows.append(run_check(lab, "a block == torch's parallelize_module", torch_tp))

    def planner():
        from .planner import megatron_check

        ok, detail = megatron_check()
        return ok, detail
    rows.append(run_check(lab, "planner picks Megatron-LM's published (tp, pp)", planner))

    def simulated():
        from .ranking import megatron_145b

        best = megatron_145b()[0]
        L = best.layout
        return ((L.tp, L.pp) == (8, 8) and best.feasible,
                f"simulator's first choice without ZeRO: tp={L.tp} pp={L.pp} {L.schedule}, {best.step_seconds:.1f} s "
                f"a step, MFU {best.result.mfu:.2f}" if best.result else "; ".join(best.reasons))
    rows.append(run_check(lab, "the simulator's ranking picks the published (tp, pp) too", simulated))
    return rows
