"""Lab 10's rank functions, exercise checks and tour: one small model trained with every sharding method against
one process.

The model is a 3-layer MLP whose layers differ in size (6->11->7->3, 185 values: no N in 2..4 divides it, so
shards end inside parameters and the last one is padded). Every rank builds it from the same seed, sees its own
equal slice of each global batch, and takes the mean loss over that slice, so averaging the gradients over the
ranks gives the gradient of the whole batch: every method must end where one process ends.

Methods (:data:`METHODS`): ``"single"`` (one process, whole batch), ``"ddp"`` (lab 02's ``BucketedDDP``),
``"zero1-naive"``, ``"zero1"``, ``"zero2"``, ``"zero3"`` (this lab), ``"zero-torch"`` (torch's
``ZeroRedundancyOptimizer`` under ``DistributedDataParallel``) and ``"fsdp2"`` (``fully_shard``).

The notebook's rank functions are reached here: :func:`train_rank` and :func:`zero1_exercise_rank` (defined here)
and :func:`memory_rank` (the memory measurement, from :mod:`.measure`).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
from torch import nn

from .._compat import moved_names, renamed_kwargs
from .._validate import validate_choice, validate_int
from ..checks import CheckResult, refusing, rng_for, run_cases
from ..ddp import make_ddp
from ..devices import now
from ..models import mlp as _models_mlp
from ..tour import lab_name
from . import measure as _measure
from .flat import FlatLayout
from .measure import BF16_METHODS, Method, memory_rank, validate_global_batch
from .optim import state_numel
from .torch_impl import fsdp2_full_parameters

__all__ = ["METHODS", "OPTIMIZERS", "WIDTHS", "mlp", "batches", "train_rank", "memory_rank", "zero1_exercise_rank",
           "check_zero1_step", "check_memory_each_rank", "tour"]

# ----------------------------------------------------------------------------- the lab's runs
#: The methods the lab trains and compares with one process (``"single"`` first: the others must end where it
#: ends). FSDP2 with bf16 compute (:data:`labkit.zero.measure.BF16_METHODS`) comes close, not equal: not listed.
METHODS = ("single", "ddp", "zero1-naive", "zero1", "zero2", "zero3", "zero-torch", "fsdp2")
#: The optimisers the lab trains with, and their settings: steps large enough that 3 of them move every parameter
#: of the lab's small model (the bench's model uses :data:`labkit.zero.measure.BENCH_OPTIMIZERS`).
OPTIMIZERS = {"sgd": (torch.optim.SGD, dict(lr=0.1)),
              "momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
              "adam": (torch.optim.Adam, dict(lr=0.01)),
              "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1))}
#: The lab's MLP: 185 values, so no N in 2..4 divides it (the bench's is :data:`labkit.zero.measure.BENCH_WIDTHS`).
WIDTHS = (6, 11, 7, 3)


@renamed_kwargs(sizes="widths")
def mlp(seed: int = 0, dtype: str = "float64", widths=WIDTHS) -> nn.Module:
    """Linear layers of ``widths`` with tanh between them, from ``seed`` (the same model on every rank):
    :func:`labkit.models.mlp`."""
    return _models_mlp(widths, activation=nn.Tanh, seed=seed, dtype=dtype)


@renamed_kwargs(sizes="widths")
def batches(steps: int, global_batch: int = 12, seed: int = 0, dtype: str = "float64", widths=WIDTHS) -> list:
    """``steps`` global batches ``(x, y)`` of a fixed random classification task (3 classes by default)."""
    return _measure.batches(steps, global_batch, widths, dtype, seed)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors])


class _Run(Method):
    """One method on one rank (:class:`labkit.zero.measure.Method`), with the flat layout of the model's
    parameters over ``world_size`` ranks and how the lab reads its results."""

    def __init__(self, method, model, opt_cls, kw, world_size, bucket_mb):
        shapes = tuple(tuple(p.shape) for p in model.parameters())  # before ZeRO-3 or FSDP2 takes them over
        super().__init__(method, model, (opt_cls, kw), bucket_mb)
        self.layout = FlatLayout(shapes, world_size)

    def params(self) -> list[torch.Tensor]:
        if self.z3 is not None:
            return self.z3.full_parameters()
        if self.method.startswith("fsdp2"):
            return fsdp2_full_parameters(self.model)
        return [p.detach() for p in self.model.parameters()]

    def grad_numel(self) -> int:
        return sum(self.grad_parts().values())

    def grad_parts(self) -> dict:
        """Gradient values this rank holds now: ``whole`` (full ``.grad`` tensors of the model's parameters),
        ``slice`` (gradients of this rank's shards: ZeRO-1/2's flat shard, ZeRO-3's unit shards, FSDP2's local
        pieces) and ``buckets`` (ZeRO-2's buffers still in flight)."""
        if hasattr(self.opt, "grad_parts"):
            return self.opt.grad_parts()
        sharded = self.z3 is not None or self.method.startswith("fsdp2")
        ps = self.z3.shards if self.z3 is not None else self.model.parameters()
        n = sum((g.to_local() if hasattr(g, "to_local") else g).numel() for g in (p.grad for p in ps)
                if g is not None)
        return {"whole": 0 if sharded else n, "slice": n if sharded else 0, "buckets": 0}


def _check_common(methods, steps, global_batch, world_size, optimizer):
    for m in methods:
        validate_choice("method", m, METHODS + BF16_METHODS)
    validate_choice("optimizer", optimizer, tuple(OPTIMIZERS))
    return validate_int("steps", steps, minimum=1), validate_global_batch(global_batch, world_size)


def train_rank(ctx, methods=METHODS, steps: int = 3, dtype: str = "float64", optimizer: str = "adam",
               global_batch: int = 12, seed: int = 0, bucket_mb: float = 0.0002, start=None, first_step: int = 0,
               save: bool = False) -> dict:
    """Train ``steps`` steps with each of ``methods`` and, on every rank, one process on the whole batch.

    Returns ``{method: {...}}`` with ``vs_single`` (largest difference from one process, relative to the largest
    parameter), ``losses`` (global mean loss per step), ``volume_per_step`` (bytes, the paper's units; None where
    not counted), ``state_numel``, ``grad_numel`` and ``grad_parts`` (on this rank, after the last step: the
    gradient values by where they sit, :meth:`_Run.grad_parts`), ``params`` (rank 0) and,
    with ``save``, ``state_dict`` (rank 0, ZeRO-1/2). ``start=(flat parameters, optimiser state dict)`` resumes
    from a checkpoint at global step ``first_step``."""
    world, rank = ctx.world_size, ctx.rank
    steps, global_batch = _check_common(methods, steps, global_batch, world, optimizer)
    opt_cls, kw = OPTIMIZERS[optimizer]
    data = batches(first_step + steps, global_batch, seed, dtype)[first_step:]
    n = global_batch // world
    out = {"P": sum(p.numel() for p in mlp(seed, dtype).parameters())}
    ref_p = None
    for method in ("single",) + tuple(m for m in methods if m != "single"):
        model = mlp(seed, dtype).to(ctx.device)
        if start is not None:
            with torch.no_grad():
                for p, v in zip(model.parameters(), FlatLayout.of(model.parameters(), 1).views(start[0])):
                    p.copy_(v)
        run = _Run(method, model, opt_cls, kw, 1 if method == "single" else world, bucket_mb)
        if start is not None:  # a copy: a plain optimiser keeps the loaded tensors and updates them in place
            run.opt.load_state_dict(copy.deepcopy(start[1]))
        run.reset_volume()
        losses, t0 = [], now(ctx.device)
        for x, y in data:
            if method != "single":
                x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
            loss = run.step(x.to(ctx.device), y.to(ctx.device))
            if loss.dtype in (torch.bfloat16, torch.float16):  # bf16 compute: report the loss in fp32
                loss = loss.float()
            if method != "single":
                dist.all_reduce(loss)  # for the report only (not part of the method's traffic)
                loss /= world
            losses.append(float(loss))
        seconds = now(ctx.device) - t0
        vol = run.volume()  # before gathering the parameters for the report
        traffic = None if run.traffic is None else run.traffic.as_dict()
        held = run.z3.held_numel() if run.z3 is not None else None  # ZeRO-3: what is left gathered after a step
        flat = _flat(run.params())
        if method == "single":
            ref_p = flat
        psi = sum(lay.padded for lay in run.z3.layouts) if run.z3 is not None else (
            run.layout.total if method == "ddp" else run.layout.padded)
        res = {"vs_single": float((flat - ref_p).abs().max() / ref_p.abs().max()), "losses": losses,
               "traffic": traffic,
               "volume_per_step": None if vol is None else vol / steps, "state_numel": run.state_numel(),
               "grad_numel": run.grad_numel(), "grad_parts": run.grad_parts(), "held_numel": held,
               "padded": run.layout.padded, "psi": psi,
               "seconds": seconds}
        if rank == 0:
            res["params"] = flat
        if save and method in ("zero1-naive", "zero1", "zero2"):
            res["state_dict"] = run.opt.state_dict()
        elif save and method == "single" and rank == 0:
            res["state_dict"] = run.opt.state_dict()
        out[method] = res
    return out


# ----------------------------------------------------------------------------- tour
def tour(world_size: int = 2) -> list[dict]:
    """Headless quick path: every method for 3 Adam steps in float64 on ``world_size`` ranks against one
    process, the optimiser state per rank, and the bytes per step against 2Ψ / 3Ψ."""
    from ..runtime import launch
    from ..tour import run_check

    lab, state = lab_name(__package__), {}

    def ran():
        t0 = time.perf_counter()
        state["res"] = launch(train_rank, world_size=world_size, echo=False, quiet=True, timeout=180)
        return True, f"{time.perf_counter() - t0:.1f} s incl. start-up"

    rows = [run_check(lab, f"every method ran on {world_size} ranks", ran)]
    if not rows[-1]["ok"]:
        return rows
    res = state["res"]

    def same(m):
        worst = max(r[m]["vs_single"] for r in res)
        return worst < 1e-12, f"max relative diff {worst:.1e}"

    def sharded():
        got = [r["zero1"]["state_numel"] for r in res]
        want = 2 * res[0]["zero1"]["padded"] // world_size
        torch_got = [r["zero-torch"]["state_numel"] for r in res]
        fsdp2 = [r["fsdp2"]["state_numel"] for r in res]
        return all(g == want for g in got), f"Adam state per rank {got} (torch's ZeRO: {torch_got}, FSDP2: {fsdp2})"

    def volume(m, k):
        r = res[0][m]
        psi, vol = r["psi"] * 8, r["volume_per_step"]
        if m == "zero3":  # the first layer is not gathered again in backward: its input needs no gradient
            again = r["traffic"]["volume_by_label"].get("backward", 0) / 3
            ok = vol == 2 * psi + again and again < psi
            return ok, f"{vol:.0f} B/step = 2Ψ + {again / psi:.2f}Ψ gathered again in backward"
        return vol == k * psi, f"{vol:.0f} B/step = {vol / psi:g} Ψ"

    for m in METHODS[1:]:
        rows.append(run_check(lab, f"{m} after 3 steps == single process (float64)", lambda m=m: same(m)))
    rows.append(run_check(lab, "ZeRO-1 Adam state per rank == 2·⌈P/N⌉ values", sharded))
    for m, k in (("ddp", 2), ("zero1", 2), ("zero2", 2), ("zero1-naive", 3), ("zero3", 3)):
        rows.append(run_check(lab, f"{m} moves {'at most ' if m == 'zero3' else ''}{k}Ψ per step",
                              lambda m=m, k=k: volume(m, k)))
    return rows


# ----------------------------------------------------------------------------- exercise 1: the ZeRO-1 step
_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter", "all_gather",
                "all_gather_into_tensor", "all_gather_single", "broadcast", "reduce")


def zero1_exercise_rank(ctx, step_fn, steps: int = 3, seed: int = 0, optimizer: str = "adam") -> dict:
    """Train the lab's MLP for ``steps`` Adam steps with the learner's ``step_fn(params_flat, grads_flat, shard,
    optimizer)`` and with lab 02's DDP, on this rank's slice of each batch; the largest difference between the two
    (relative), the bytes the learner's step put into collectives (every call counted by its input's size, the
    all-reduce twice: the paper's units) and the optimiser state this rank keeps."""
    world, rank = ctx.world_size, ctx.rank
    opt_cls, kw = OPTIMIZERS[optimizer]
    data = batches(steps, 12, seed)
    n = 12 // world
    model = mlp(seed).to(ctx.device)
    params = list(model.parameters())
    layout = FlatLayout.of(params, world)
    lo, hi = layout.shard_range(rank)
    shard = layout.flatten(params)[lo:hi].clone().requires_grad_(True)
    inner = opt_cls([shard], **kw)
    sent = {"bytes": 0}
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counted(name, fn):
        def call(*args, **kwargs):
            t = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if isinstance(t, torch.Tensor):
                sent["bytes"] += t.numel() * t.element_size() * (2 if name == "all_reduce" else 1)
            return fn(*args, **kwargs)
        return call

    for x, y in data:
        x, y = x[rank * n:(rank + 1) * n].to(ctx.device), y[rank * n:(rank + 1) * n].to(ctx.device)
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        params_flat = layout.flatten(params)
        grads_flat = layout.flatten([p.grad for p in params])
        for name, fn in originals.items():
            setattr(dist, name, counted(name, fn))
        try:
            step_fn(params_flat, grads_flat, shard, inner)
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
        with torch.no_grad():
            for p, v in zip(params, layout.views(params_flat)):
                p.copy_(v)
    ref = mlp(seed).to(ctx.device)
    ddp = make_ddp("bucketed", ref, 0.0002)
    opt = opt_cls(ref.parameters(), **kw)
    for x, y in data:
        x, y = x[rank * n:(rank + 1) * n].to(ctx.device), y[rank * n:(rank + 1) * n].to(ctx.device)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(x), y).backward()
        ddp.sync_grads()
        opt.step()
    mine, want = _flat(params), _flat(ref.parameters())
    return {"vs_ddp": float((mine - want).abs().max() / want.abs().max()), "bytes_per_step": sent["bytes"] / steps,
            "psi_bytes": layout.padded * 8, "state_numel": state_numel(inner), "shard": layout.shard_numel,
            "moved": bool((mine - _flat(mlp(seed).to(ctx.device).parameters())).abs().max() > 0)}


def check_zero1_step(step_fn, world_sizes=(2, 3)) -> CheckResult:
    """Run the learner's ZeRO-1 step on real ranks: after 3 Adam steps the parameters must equal lab 02's DDP
    (within 1e-12, float64) at every world size, the optimiser state per rank must stay one shard, and the step
    must move no more than 2Ψ per step (reduce-scatter + all-gather, as DDP's all-reduce)."""
    from ..runtime import launch

    results = {}

    def ran(n):
        if n not in results:
            results[n] = launch(zero1_exercise_rank, world_size=n, kwargs={"step_fn": step_fn}, echo=False,
                                quiet=True, timeout=180, pool=True)
        return results[n]

    def equal(n):
        def thunk():
            res = ran(n)
            if not all(r["moved"] for r in res):
                raise AssertionError("the parameters did not change: all-gather the stepped shards into params_flat")
            worst = max(r["vs_ddp"] for r in res)
            if worst > 1e-12:
                raise AssertionError(f"after 3 steps the parameters differ from DDP's by {worst:.2e} (relative); "
                                     "average the reduced gradient over the ranks before the step")
        return thunk

    def traffic():
        res = ran(world_sizes[0])
        got, psi = res[0]["bytes_per_step"], res[0]["psi_bytes"]
        if got > 2 * psi:
            raise AssertionError(f"{got / psi:.2g}Ψ per step: an all-reduce of the gradients (2Ψ) plus an all-gather "
                                 "(Ψ) is 3Ψ; reduce-scatter them instead (Ψ), so the step costs what DDP costs")

    cases = [(f"{n} ranks: parameters after 3 Adam steps == DDP's", equal(n)) for n in world_sizes]
    cases.append((f"{world_sizes[0]} ranks: at most 2Ψ moved per step", traffic))
    return run_cases("the ZeRO-1 step", cases,
                     hint="reduce-scatter grads_flat (sum) into a shard-sized tensor, divide by the world size, "
                          "set shard.grad, optimizer.step(), then all-gather shard into params_flat")


# ----------------------------------------------------------------------------- exercise 2: memory per rank
def check_memory_each_rank(predict, seed: int | None = None) -> CheckResult:
    """``predict(params, world_size, stage)`` -> bytes on each rank of weights + gradients + optimiser state for
    fp32 Adam (4 + 4 + 8 bytes per parameter) under ZeRO ``stage`` 0-3 over ``world_size`` ranks, for cases drawn
    afresh; the shared formulas refuse to run meanwhile."""
    from .. import memory_model as _mm

    rng = rng_for(seed)
    cases = [(rng.randrange(10 ** 6, 10 ** 10), rng.choice((2, 4, 8, 16, 64)), stage) for stage in (0, 1, 2, 3)]
    cases.append((rng.randrange(10 ** 6, 10 ** 9), 1, 3))  # one rank: nothing to shard

    def case(psi, world_size, stage):
        def thunk():
            want = _mm.zero_bytes_each_rank(psi, world_size, stage, "fp32", "adam")["total"]
            with refusing(_mm.bytes_per_parameter, _mm.zero_bytes_each_rank,
                          why="you called labkit's memory formulas: write the bytes per rank from the stage and N"):
                got = predict(psi, world_size, stage)
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                raise AssertionError(f"return a number of bytes, got {got!r}")
            if abs(got - want) > 1e-6 * want:
                raise AssertionError(f"predicted {got:,.0f} bytes, the paper's count is {want:,.0f}")
        return thunk

    return run_cases("memory per rank under ZeRO", [(f"Ψ = {p:,}, N = {n}, stage {s}", case(p, n, s))
                                                   for p, n, s in cases],
                     hint="fp32 Adam keeps 4 (weights) + 4 (gradients) + 8 (m and v) bytes per parameter; stage 1 "
                          "divides the 8 by N, stage 2 also the gradients' 4, stage 3 also the weights' 4")


# old names (issue 30): a per-rank quantity is *_each_rank, an MLP's layer widths are widths
__getattr__ = moved_names(__name__, {"check_memory_per_rank": "labkit.zero.lab:check_memory_each_rank",
                                     "SIZES": "labkit.zero.lab:WIDTHS"})
