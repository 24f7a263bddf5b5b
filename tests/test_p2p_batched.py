"""Every hand-written point-to-point exchange goes through ``dist.batch_isend_irecv`` (the form NCCL needs).

With the device bound at initialisation, NCCL runs a rank's unbatched ``isend``/``irecv`` in posting order on one
communicator, so a ring step in which every rank posts its receive first waits on itself; gloo does not, so a CPU
run cannot show the hang. Instead each rank below replaces ``send``, ``recv``, ``isend`` and ``irecv`` (in
``torch.distributed`` and ``distributed_c10d``) with functions that raise "unbatched p2p" unless
``batch_isend_irecv`` called them, then runs every lab's hand-written exchange and checks its result: the
all-reduce algorithms (every one, with and without ``group=``), ring reduce-scatter and all-gather, lab 04's
pipeline executor and lab 01's ping-pong benchmark. A static check over ``labkit/`` keeps new code from calling
the unbatched functions; the exchanges still written unbatched in files outside this change are listed in
``PENDING`` (the check fails once one of them is converted, until its entry goes).
"""
import ast
import contextlib
import pathlib

import pytest
import torch

import labkit

ROOT = pathlib.Path(__file__).resolve().parents[1] / "labkit"
UNBATCHED = ("send", "recv", "isend", "irecv")
LABKIT_DEVICE_CHECK = True  # this module's rank functions are held to the device check too (ctx.device is its
#                             stand-in, cpu:0): what they time and send must be on the rank's device


@contextlib.contextmanager
def refuse_unbatched():
    """Inside the block, a point-to-point call that ``dist.batch_isend_irecv`` did not make raises."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    inside = [0]
    saved = {}

    def refuse(name, fn):
        def guarded(*args, **kwargs):
            if name in ("isend", "irecv") and inside[0]:
                return fn(*args, **kwargs)
            raise RuntimeError(f"unbatched p2p: dist.{name} called outside dist.batch_isend_irecv (NCCL can wait on "
                               f"itself); post the exchange with labkit.distops.p2p")
        guarded.__name__ = name
        return guarded

    def batched(fn):
        def batch_isend_irecv(ops):
            inside[0] += 1
            try:
                return fn(ops)
            finally:
                inside[0] -= 1
        return batch_isend_irecv

    try:
        for name in UNBATCHED:  # one guard object in both modules: P2POp checks `op in (c10d.isend, c10d.irecv)`
            guard = refuse(name, getattr(c10d, name))
            for mod in (dist, c10d):
                saved[(mod, name)] = getattr(mod, name)
                setattr(mod, name, guard)
        for mod in (dist, c10d):
            saved[(mod, "batch_isend_irecv")] = mod.batch_isend_irecv
            mod.batch_isend_irecv = batched(mod.batch_isend_irecv)
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


def _guard_works_rank(ctx):
    """The guard itself: an unbatched isend raises, the same message batched goes through."""
    import torch.distributed as dist

    other = 1 - ctx.rank
    x = torch.full((3,), float(ctx.rank), device=ctx.device)
    got = torch.empty(3, device=ctx.device)
    with refuse_unbatched():
        try:
            dist.isend(x, other)
            refused = None
        except RuntimeError as e:
            refused = str(e)
        for q in dist.batch_isend_irecv([dist.P2POp(dist.irecv, got, other), dist.P2POp(dist.isend, x, other)]):
            q.wait()
    return refused, got.tolist()  # a list: the device check refuses .numpy() of a device tensor, not tolist()


def test_the_guard_refuses_unbatched_and_passes_batched():
    res = labkit.launch(_guard_works_rank, world_size=2, timeout=120)
    for r, (refused, got) in enumerate(res):
        assert refused and "unbatched p2p" in refused
        assert got == [float(1 - r)] * 3


def _collectives_rank(ctx):
    import torch.distributed as dist

    from labkit import collectives as C

    n, r = ctx.world_size, ctx.rank
    kw = dict(dtype=torch.float64, device=ctx.device)
    sub = dist.new_group(list(range(n)))  # the same ranks as another group object: messages name group ranks
    bad = []
    for group in (None, sub):
        for alg in C.ALGORITHMS + ("ring_pipelined",):
            x = torch.arange(13, **kw) * (r + 1) + r
            want = x.clone()
            dist.all_reduce(want, group=group)
            log = []
            with refuse_unbatched():
                C.all_reduce(x, algorithm="ring" if alg == "ring_pipelined" else alg, log=log, group=group,
                             segments=2 if alg == "ring_pipelined" else 1)
            if not torch.equal(x, want):
                bad.append((alg, group is not None))
            if alg != "ring_pipelined" and group is None:
                bad += [("log", alg)] if not log and n > 1 else []
        x = torch.arange(13, **kw) + 10 * r
        want = x.clone()
        dist.all_reduce(want, group=group)
        with refuse_unbatched():
            piece = C.reduce_scatter(x, group=group)
            parts = C.all_gather(x, group=group)
        if not torch.equal(piece, torch.tensor_split(want, n)[r]):
            bad.append(("reduce_scatter", group is not None))
        if not all(torch.equal(p, torch.arange(13, **kw) + 10 * k) for k, p in enumerate(parts)):
            bad.append(("all_gather", group is not None))
    logs = {}
    for alg in C.ALGORITHMS:
        log = []
        with refuse_unbatched():
            C.all_reduce(torch.ones(12, device=ctx.device), algorithm=alg, log=log)
        logs[alg] = log
    return bad, logs


@pytest.mark.parametrize("world_size", [2, 3])
def test_lab01_algorithms_send_only_batched_and_still_follow_their_schedules(world_size):
    """Fails on the unbatched ``dist.irecv``/``dist.isend``/``dist.send``/``dist.recv`` of lab 01's algorithms."""
    from labkit import collectives as C

    res = labkit.launch(_collectives_rank, world_size=world_size, timeout=180)
    for bad, _ in res:
        assert bad == []
    for alg in C.ALGORITHMS:  # the messages really sent are still the pure schedule's
        assert C.log_matches_schedule([logs[alg] for _, logs in res], alg, world_size), alg


def _pipeline_and_pingpong_rank(ctx):
    from labkit.collectives.bench import pingpong_rank
    from labkit.pipeline import ModelStages
    from labkit.pipeline.executor import pipeline_rank

    make = ModelStages("mlp", n_stages=ctx.world_size)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 32, generator=g), torch.randint(0, 10, (6,), generator=g))
    out = {}
    with refuse_unbatched():
        for schedule in ("gpipe", "1f1b"):
            run = pipeline_rank(ctx, make, batch, n_micro=3, schedule=schedule, warmup=1, repeats=1)
            out[schedule] = {"loss": run["loss"], "grads": run["grads"]}
        rows = pingpong_rank(ctx, sizes=(4, 256), repeats=1)
    out["pingpong"] = rows
    return out


def test_pipeline_executor_and_pingpong_send_only_batched():
    """Fails on lab 04's unbatched header/activation messages and lab 01's ping-pong ``dist.send``/``dist.recv``."""
    from labkit.pipeline import ModelStages
    from labkit.pipeline.reference import reference_step

    res = labkit.launch(_pipeline_and_pingpong_rank, world_size=2, timeout=180)
    make = ModelStages("mlp", n_stages=2)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 32, generator=g), torch.randint(0, 10, (6,), generator=g))
    ref = reference_step(make, 2, batch, n_micro=3)
    for schedule in ("gpipe", "1f1b"):
        loss = next(r[schedule]["loss"] for r in res if r[schedule]["loss"] is not None)
        assert loss == pytest.approx(ref["loss"], rel=1e-6)
        for r in res:
            for stage, grads in r[schedule]["grads"].items():
                for name, gr in grads.items():
                    torch.testing.assert_close(gr, ref["grads"][stage][name], rtol=1e-5, atol=1e-6)
    rows = res[0]["pingpong"]
    assert [row["bytes"] for row in rows] == [4, 256] and all(row["seconds"] > 0 for row in rows)


# path -> {function: what to change}: exchanges still unbatched, in files owned by other changes of issue 25. The
# static test below fails on any other unbatched call, and on an entry here once its call is gone.
PENDING: dict = {}


# ------------------------------------------------------------------ static: no new unbatched call
def _unbatched_calls(path: pathlib.Path) -> dict[str, list[int]]:
    """``{function: [lines]}`` of calls ``dist.send/recv/isend/irecv(...)`` (or ``torch.distributed.<same>``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, list[int]] = {}

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            name = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = child.name if where == "<module>" else where
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr in UNBATCHED:
                owner = child.func.value
                if (isinstance(owner, ast.Name) and owner.id in ("dist", "c10d")) or ast.unparse(owner) in (
                        "torch.distributed", "torch.distributed.distributed_c10d"):
                    found.setdefault(name, []).append(child.lineno)
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_no_unbatched_point_to_point_in_labkit(tmp_path):
    """Every hand-written message goes through ``dist.batch_isend_irecv`` (:func:`labkit.distops.p2p`, ``send``,
    ``recv``); the exceptions still to convert are listed in ``PENDING``, and a listed one that is gone fails too."""
    found = {}
    for p in sorted(ROOT.rglob("*.py")):
        calls = _unbatched_calls(p)
        if calls:
            found[str(p.relative_to(ROOT))] = calls
    new = {f"{path}:{fn} (lines {lines})" for path, fns in found.items() for fn, lines in fns.items()
           if fn not in PENDING.get(path, {})}
    assert not new, ("unbatched point-to-point: post it with labkit.distops.p2p (or distops.send/recv), the form "
                     "NCCL needs:\n" + "\n".join(sorted(new)))
    stale = {f"{path}:{fn}" for path, fns in PENDING.items() for fn in fns if fn not in found.get(path, {})}
    assert not stale, f"converted, so delete from PENDING: {sorted(stale)}"
    bad = tmp_path / "bad.py"  # the check can fail
    bad.write_text("import torch.distributed as dist\n\ndef ring(x):\n    dist.irecv(x, 0).wait()\n")
    assert _unbatched_calls(bad) == {"ring": [4]}
