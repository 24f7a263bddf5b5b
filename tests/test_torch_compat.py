"""The torch floor: labs 10 and 11 run on a torch without the 2.14 collective names (torch 2.11, the GPU machine's).

torch 2.14 added ``all_gather_single`` / ``reduce_scatter_single`` and deprecated ``all_gather_into_tensor`` /
``reduce_scatter_tensor``; ``requirements.txt`` admits torch >= 2.4, which has only the old names. Each rank below
deletes the new names from ``torch.distributed`` first (inside the rank: ranks are separate processes), which is
what a torch < 2.14 looks like to labkit, then runs the capstone's tensor- and sequence-parallel layers against
their unsplit versions, lab 11's ``CommMeter`` and lab 10's counted collectives. A static check keeps every call
of these collectives in :mod:`labkit.distops`, the one place that picks the name.
"""
import ast
import pathlib
import warnings

import pytest
import torch

import labkit

NEW_NAMES = ("all_gather_single", "reduce_scatter_single")
ROOT = pathlib.Path(__file__).resolve().parents[1] / "labkit"


def _hidden(fn):
    """Run ``fn()`` with the 2.14 names gone from ``torch.distributed`` (and put back after: a rank process may
    be reused). Only the public module: torch 2.14's old names call the new ones through ``distributed_c10d``."""
    import torch.distributed as dist

    saved = {name: getattr(dist, name) for name in NEW_NAMES if hasattr(dist, name)}
    for name in saved:
        delattr(dist, name)
    try:
        assert not any(hasattr(dist, name) for name in NEW_NAMES)
        return fn()
    finally:
        for name, f in saved.items():
            setattr(dist, name, f)


def _old_torch_rank(ctx, sp):
    from test_capstone import _layers_rank  # the capstone's own layer-by-layer check

    return _hidden(lambda: _layers_rank(ctx, sp))


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_capstone_layers_equal_unsplit_without_the_new_collective_names(sp):
    """Fails when lab 11 calls ``dist.all_gather_single``/``reduce_scatter_single`` (AttributeError on torch < 2.14)."""
    res = labkit.launch(_old_torch_rank, world_size=2, args=(sp,), timeout=180)
    for out in res:
        for k, v in out.items():
            assert v < 1e-12, (k, v, out)


def _meter_and_zero_rank(ctx):
    import torch.distributed as dist

    from labkit.capstone.comm import CommMeter, gather_seq, scatter_seq
    from labkit.zero.comm import Traffic

    n, r = ctx.world_size, ctx.rank
    kw = dict(dtype=torch.float64, device=ctx.device)

    def run():
        out = {}
        x = (torch.arange(2 * 4 * 3, **kw).reshape(2, 4, 3) + 100 * r).requires_grad_(True)
        meter = CommMeter({"tp": None})
        with meter:
            whole = gather_seq(x, None)  # b x s/n x h on each rank -> b x s x h
            whole.sum().backward()
        out["gathered"] = whole.detach().cpu()
        out["grad"] = x.grad.cpu()
        out["meter"] = meter.by_group()
        out["scattered"] = scatter_seq(torch.ones(2, 4 * n, 3, **kw), None).cpu()
        t = Traffic()
        full = torch.empty(4 * n, **kw)
        t.all_gather(full, torch.full((4,), float(r), **kw))
        out["zero_gather"] = full.cpu()
        shard = torch.empty(4, **kw)
        t.reduce_scatter(shard, torch.arange(4 * n, **kw))
        out["zero_scatter"] = shard.cpu()
        out["zero_calls"] = dict(t.calls)
        return out

    hidden = _hidden(run)
    with warnings.catch_warnings():  # with the new names present, labkit uses them: no deprecation warning
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        present = run()
    dist.barrier()
    return hidden, present


def test_meter_and_zero_collectives_without_the_new_names_and_without_warnings_with_them():
    """lab 11's CommMeter wrapped every name in its list and failed on a torch lacking one; lab 10's fallback must
    keep working; on a torch that has the new names, neither lab may call a deprecated one."""
    res = labkit.launch(_meter_and_zero_rank, world_size=2, timeout=180)
    n = 2
    for r, (hidden, present) in enumerate(res):
        for out in (hidden, present):
            want = torch.cat([torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(2, 4, 3) + 100 * k
                              for k in range(n)], dim=1)
            assert torch.equal(out["gathered"], want)
            assert torch.equal(out["grad"], torch.full((2, 4, 3), float(n), dtype=torch.float64))
            assert torch.equal(out["scattered"], torch.full((2, 4, 3), float(n), dtype=torch.float64))
            assert torch.equal(out["zero_gather"], torch.repeat_interleave(torch.arange(n, dtype=torch.float64), 4))
            assert torch.equal(out["zero_scatter"], n * torch.arange(4 * r, 4 * r + 4, dtype=torch.float64))
            assert out["zero_calls"]["all_gather"] == 1 and out["zero_calls"]["reduce_scatter"] == 1
            # one operation under one name whichever this torch calls it (lab 11's formulas use the new names)
            world = out["meter"]["world"]
            assert set(world) == {"all_gather_single", "reduce_scatter_single"}, world
            assert world["all_gather_single"] == {"calls": 1, "bytes": 2 * 4 * n * 3 * 8}
            assert world["reduce_scatter_single"] == {"calls": 1, "bytes": 2 * 4 * n * 3 * 8}


# ------------------------------------------------------------------ static: one place picks the name
_RENAMED = {"all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor"}


def _calls_of_renamed(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.name if ROOT not in path.parents else path.relative_to(ROOT.parent)}:{node.lineno} calls "
            f".{node.func.attr}()" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _RENAMED]


def test_only_distops_calls_the_renamed_collectives(tmp_path):
    """A direct ``dist.all_gather_single(...)`` breaks torch < 2.14; a direct ``dist.all_gather_into_tensor(...)``
    warns on 2.14 and goes when torch drops the name. Call :func:`labkit.distops.all_gather_tensor` /
    :func:`labkit.distops.reduce_scatter_tensor` instead."""
    found = [c for p in sorted(ROOT.rglob("*.py")) if p.name != "distops.py" for c in _calls_of_renamed(p)]
    assert not found, ("call labkit.distops.all_gather_tensor / reduce_scatter_tensor instead of torch's renamed "
                       "collectives:\n" + "\n".join(found))
    bad = tmp_path / "bad.py"  # the check can fail
    bad.write_text("import torch.distributed as dist\n\ndef f(a, b):\n    dist.reduce_scatter_single(a, b)\n")
    assert _calls_of_renamed(bad) == ["bad.py:4 calls .reduce_scatter_single()"]
