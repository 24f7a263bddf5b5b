"""Lab 10: the flat layout (pure), and ZeRO-1/2/3 from scratch against one process, lab 02's DDP and torch's own.

One launch per world size (2, 3, 4) runs every check that needs ranks; the tests read its results."""
from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch import nn

import labkit
from labkit import zero
from labkit._validate import ArgumentError
from labkit.zero import FlatLayout, unique_params
from labkit.zero.lab import METHODS, OPTIMIZERS, batches, mlp, train_rank
from labkit.zero.optim import validate_optimizer_class

P, UNITS = 185, (77, 84, 24)  # the lab's MLP 6->11->7->3: no N in 2..4 divides 185
TIGHT, LOOSE = 1e-12, 1e-6     # relative to the largest parameter: float64, float32


# ----------------------------------------------------------------------------- the flat layout (pure)
def test_layout_shards_equal_padded_and_cut_inside_parameters():
    lay = FlatLayout(((11, 6), (11,), (7, 11), (7,), (3, 7), (3,)), 4)
    assert (lay.total, lay.shard_numel, lay.padded, lay.padding) == (185, 47, 188, 3)
    assert lay.offsets == (0, 66, 77, 154, 161, 182)
    assert [lay.shard_range(r) for r in range(4)] == [(0, 47), (47, 94), (94, 141), (141, 188)]
    assert lay.pieces(40, 100) == [(0, 40, 47), (1, 47, 94), (2, 94, 100)]
    assert [lay.owner(i) for i in (0, 46, 47, 187)] == [0, 0, 1, 3]
    rows = lay.table()
    assert [r["values"] for r in rows] == [47, 47, 47, 44] and rows[3]["padding"] == 3
    assert rows[1]["params"] == [0, 1, 2]  # rank 1: the end of w1, all of b1, the start of w2
    for n in range(1, 12):
        lay = FlatLayout(((5,), (3, 2)), n)
        assert lay.shard_numel == math.ceil(11 / n) and lay.padded % n == 0
        assert sum(hi - lo for lo, hi in map(lay.shard_range, range(n))) == lay.padded


def test_layout_flatten_and_views_round_trip():
    ts = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64), torch.randn(2, 1, 2)]
    ts[2] = ts[2].double()
    lay = FlatLayout.of(ts, 3)
    flat = lay.flatten(ts)
    assert flat.shape == (lay.padded,) and lay.padded == 21 and torch.all(flat[lay.total:] == 0)
    views = lay.views(flat)
    assert all(torch.equal(v, t) for v, t in zip(views, ts))
    views[1][0] = 42.0  # views, not copies
    assert flat[12] == 42.0
    assert torch.equal(lay.flatten([None, ts[1], None])[12:17], ts[1])
    with pytest.raises(ArgumentError, match="one tensor per parameter"):
        lay.flatten(ts[:2])
    with pytest.raises(ArgumentError, match=r"shape \(4, 3\)"):
        lay.flatten([ts[0].T, ts[1], ts[2]])
    with pytest.raises(ArgumentError, match="1-D"):
        lay.views(flat[:5])


def test_layout_bad_inputs_say_what_to_pass():
    with pytest.raises(ArgumentError, match=r"world_size=5 is larger than the 4 values.*world_size <= 4"):
        FlatLayout(((2, 2),), 5)
    with pytest.raises(ArgumentError, match="world_size"):
        FlatLayout(((2,),), 0)
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ArgumentError, match=r"mix dtypes.*model.to"):
        unique_params([w, nn.Parameter(torch.ones(2, dtype=torch.float64))])
    with pytest.raises(ArgumentError, match="mix dtypes or devices"):
        unique_params([w, nn.Parameter(torch.ones(2, device="meta"))])
    with pytest.raises(ArgumentError, match="empty"):
        unique_params([])
    with pytest.raises(ArgumentError, match=r"one tensor.*\[params\]"):
        unique_params(w)
    with pytest.raises(ArgumentError, match="parameter group"):
        unique_params([{"params": [w]}])
    with pytest.raises(ArgumentError, match="must be a tensor"):
        unique_params([w, 3.0])
    base = torch.zeros(10)
    with pytest.raises(ArgumentError, match="sharing memory"):
        unique_params([base[:6], base[4:]])


def test_tied_parameters_are_kept_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # weight tying, as in a language model
    model = nn.Sequential(emb, head)
    assert unique_params([emb.weight, head.weight, emb.weight]) == [emb.weight]
    assert FlatLayout.of(model.parameters(), 3).total == 40
    # two halves of one storage that do not overlap are two parameters, fine
    base = torch.zeros(10)
    assert len(unique_params([base[:5], base[5:]])) == 2


def test_supported_optimizers_and_errors_without_ranks():
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        assert validate_optimizer_class(cls) is cls
    with pytest.raises(ArgumentError, match=r"LBFGS is not element-wise.*torch.optim.SGD, torch.optim.Adam"):
        validate_optimizer_class(torch.optim.LBFGS)
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ArgumentError, match="class \\(not an instance\\)"):
        validate_optimizer_class(opt)
    with pytest.raises(RuntimeError, match="labkit.launch"):
        zero.Zero1(nn.Linear(2, 2).parameters(), torch.optim.Adam, lr=0.1)
    with pytest.raises(RuntimeError, match="labkit.launch"):
        zero.Zero3(nn.Linear(2, 2))


def test_comm_accounting_is_the_papers():
    assert zero.TRAFFIC_FACTORS == {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2, "reduce": 1}


def test_old_names_still_work_and_warn():
    """Issue 30's renames keep the old names one release, each with a DeprecationWarning naming the new one."""
    import labkit.zero.bench as bench
    import labkit.zero.lab as lab
    import labkit.zero.measure as measure
    import labkit.zero.plots as plots
    from labkit.zero import comm, torch_impl

    old_to_new = [(zero, "FACTORS", comm.TRAFFIC_FACTORS), (zero, "torch_ref", torch_impl),
                  (zero, "validate_optimizer_class", validate_optimizer_class),
                  (zero, "check_optimizer_class", validate_optimizer_class),
                  (lab, "check_memory_per_rank", lab.check_memory_each_rank), (lab, "SIZES", lab.WIDTHS),
                  (plots, "bytes_per_rank", plots.bytes_each_rank), (plots, "state_per_rank", plots.state_each_rank),
                  (measure, "METHODS", measure.MEASURED_METHODS), (measure, "SIZES", measure.BENCH_WIDTHS),
                  (measure, "OPTIMIZERS", measure.BENCH_OPTIMIZERS), (bench, "QUICK_SIZES", measure.BENCH_WIDTHS)]
    for module, old, new in old_to_new:
        with pytest.warns(DeprecationWarning, match=old):
            assert getattr(module, old) is new
    with pytest.warns(DeprecationWarning, match="sizes="):
        model = lab.mlp(sizes=(4, 3))
    assert [tuple(p.shape) for p in model.parameters()] == [(3, 4), (3,)]
    with pytest.warns(DeprecationWarning, match="world="):
        assert measure.validate_global_batch(8, world=4) == 8


# ----------------------------------------------------------------------------- on ranks
def _bad_inputs(ctx) -> dict:
    """Each bad input on real ranks: the error's type and message (all ranks raise together, none hangs)."""
    out = {}

    def catch(name, fn):
        try:
            fn()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - the test reads the message
            out[name] = f"{type(e).__name__}: {e}"

    catch("not_sub", lambda: zero.Zero3(mlp(0), [nn.Linear(2, 2)]))
    m2 = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    catch("nested", lambda: zero.Zero3(m2, [m2[0], m2[0][0]]))
    catch("lbfgs", lambda: zero.Zero1(mlp(0).parameters(), torch.optim.LBFGS))
    catch("mixed", lambda: zero.Zero2([nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3).double())]))
    catch("too_many_ranks", lambda: zero.Zero1([nn.Parameter(torch.ones(1))], torch.optim.SGD, lr=0.1))
    catch("bucket", lambda: zero.Zero2(mlp(0).parameters(), torch.optim.SGD, bucket_mb=0, lr=0.1))
    opt = zero.Zero1(mlp(0).parameters(), torch.optim.Adam, lr=0.1)
    other = torch.optim.Adam(nn.Linear(2, 2).parameters())
    catch("wrong_state", lambda: opt.load_state_dict(other.state_dict()))
    catch("not_a_state", lambda: opt.load_state_dict({"lr": 1}))
    return out


def _freed(refs, patience_s: float = 30.0) -> list[bool]:
    """Which weakly referenced buffers are gone. Gloo's worker thread drops its reference to a collective's output
    a moment after the call returns, so wait for that (a deadline for a slow machine, not a timing assert)."""
    import time

    import torch.distributed as dist

    dist.barrier()
    deadline = time.monotonic() + patience_s
    while any(r() is not None for r in refs) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [r() is None for r in refs]


def _stage3_exact(ctx) -> dict:
    """ZeRO-3 when the input needs a gradient too: every unit is gathered again in the backward, exactly 3Ψ."""
    model = mlp(0)
    z3 = zero.Zero3(model)
    opt = torch.optim.SGD(z3.parameters(), lr=0.1)
    x, y = batches(1)[0]
    x = x[ctx.rank::ctx.world_size].clone().requires_grad_(True)
    during, refs = {}, []
    issue = z3._issue

    def watched(g, label, async_op):  # keep a weak reference to every buffer ZeRO-3 gathers
        full, *rest = issue(g, label, async_op)
        refs.append(weakref.ref(full))
        return (full, *rest)

    z3._issue = watched
    out = z3(x)
    during["freed_after_forward"] = _freed(refs)  # autograd kept recipes, not the weights
    during["after_forward"] = z3.held_numel()
    nn.functional.cross_entropy(out, y[ctx.rank::ctx.world_size]).backward()
    during["after_backward"] = z3.held_numel()
    during["freed_after_backward"] = _freed(refs)
    opt.step()
    psi = sum(lay.padded for lay in z3.layouts)
    return {"traffic": z3.traffic.as_dict(), "psi": psi, **during,
            "shards": [s.numel() for s in z3.shards], "x_grad": x.grad is not None}


class _Tied(nn.Module):
    """A tiny language-model shape: the output head shares the embedding's weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb, self.mid, self.head = nn.Embedding(10, 5), nn.Linear(5, 5), nn.Linear(5, 10, bias=False)
        self.head.weight = self.emb.weight
        self.double()

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))))


class _Unused(nn.Module):
    """The lab's MLP plus a layer that no forward uses (registered last: its bucket is the first to reduce)."""

    def __init__(self):
        super().__init__()
        self.mlp, self.spare = mlp(0), nn.Linear(3, 3).double()

    def forward(self, x):
        return self.mlp(x)


def _train(model, opt, data, rank=None, world=1, accum=1, after_backward=None):
    for x, y in data:
        if rank is not None:
            x, y = x[rank::world], y[rank::world]
        opt.zero_grad()
        for k in range(accum):
            (nn.functional.cross_entropy(model(x[k::accum]), y[k::accum]) / accum).backward()
            if after_backward is not None:
                after_backward()
        opt.step()


def _rel(a, b) -> float:
    a = torch.cat([t.detach().reshape(-1) for t in a])
    b = torch.cat([t.detach().reshape(-1) for t in b])
    return float((a - b).abs().max() / b.abs().max())


def _edges(ctx) -> dict:
    """Gradient accumulation, unused and tied parameters, explicit units, evaluation without gradients."""
    r, n, out = ctx.rank, ctx.world_size, {}
    data = batches(2, global_batch=24)
    ref = mlp(0)
    _train(ref, torch.optim.Adam(ref.parameters(), lr=0.01), data)
    # ZeRO-2 with 2 micro-batches per step: each backward reduces its buckets while it runs
    model = mlp(0)
    opt = zero.Zero2(model.parameters(), torch.optim.Adam, bucket_mb=0.0002, lr=0.01)
    seen = []
    _train(model, opt, data, r, n, accum=2, after_backward=lambda: seen.append(opt.traffic.calls["reduce"]))
    out["accum"], out["reduces_after_each_backward"] = _rel(model.parameters(), ref.parameters()), seen
    # a parameter no forward uses: reduced as zeros by step(); Adam leaves it where it was, as one process does
    ref_u, model = _Unused(), _Unused()
    _train(ref_u, torch.optim.Adam(ref_u.parameters(), lr=0.01), data)
    _train(model, zero.Zero2(model.parameters(), torch.optim.Adam, bucket_mb=0.0002, lr=0.01), data, r, n)
    out["unused"] = _rel(model.parameters(), ref_u.parameters())
    # tied weights: ZeRO-2 keeps the shared tensor once; ZeRO-3 with the whole model as one unit
    idx = torch.randint(0, 10, (2, 12), generator=torch.Generator().manual_seed(5))
    tied_data = [(idx[s], idx[s].flip(0)) for s in range(2)]
    ref_t = _Tied()
    _train(ref_t, torch.optim.Adam(ref_t.parameters(), lr=0.05), tied_data)
    model = _Tied()
    _train(model, zero.Zero2(model.parameters(), torch.optim.Adam, bucket_mb=0.0002, lr=0.05), tied_data, r, n)
    out["tied_zero2"] = _rel(model.parameters(), ref_t.parameters())
    model = _Tied()
    z3 = zero.Zero3(model, units=[model])
    _train(z3, torch.optim.Adam(z3.parameters(), lr=0.05), tied_data, r, n)
    out["tied_zero3"] = _rel(z3.full_parameters(), ref_t.parameters())
    # a weight tied across units (the default units: emb, mid, head), or held by a module outside every unit,
    # belongs to the root: gathered for the whole forward, its two gradients summed before one reduce-scatter
    for key, units in (("tied_default_units", None), ("tied_outside", lambda t: [t.emb, t.mid])):
        model = _Tied()
        z3 = zero.Zero3(model, units if units is None else units(model))
        _train(z3, torch.optim.Adam(z3.parameters(), lr=0.05), tied_data, r, n)
        out[key] = _rel(z3.full_parameters(), ref_t.parameters())
    # explicit units, then evaluation under no_grad: gathered, used and freed, with no autograd
    model = mlp(0)
    z3 = zero.Zero3(model, units=[model[0], model[2], model[4]])
    _train(z3, torch.optim.Adam(z3.parameters(), lr=0.01), data, r, n)
    out["units"] = _rel(z3.full_parameters(), ref.parameters())
    with torch.no_grad():
        x = data[0][0]
        out["eval"] = float((z3(x) - ref(x)).abs().max())
    out["eval_held"] = z3.held_numel() == sum(s.numel() for s in z3.shards)
    # a learning-rate scheduler and gradient clipping by the global norm, as on a plain optimiser
    def clipped(make, model, sched=True):
        opt = make(model)
        lr = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if sched else None
        for x, y in data:
            if make is not plain:
                x, y = x[r::n], y[r::n]
            opt.zero_grad()
            nn.functional.cross_entropy(fwd(model)(x), y).backward()
            norms.append(float(clip(opt, model)))
            opt.step()
            if lr is not None:
                lr.step()
        return model

    def plain(m):
        return torch.optim.Adam(m.parameters(), lr=0.01)

    def clip(opt, model):
        if hasattr(opt, "clip_grad_norm_"):
            return opt.clip_grad_norm_(0.05)
        if isinstance(model, zero.Zero3):
            return model.clip_grad_norm_(0.05)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)

    def fwd(model):
        return model

    norms = []
    ref_c = clipped(plain, mlp(0))
    want = list(norms)
    for name, make in (("zero1", lambda m: zero.Zero1(m.parameters(), torch.optim.Adam, lr=0.01)),
                       ("zero2", lambda m: zero.Zero2(m.parameters(), torch.optim.Adam, bucket_mb=0.0002, lr=0.01))):
        norms.clear()
        out[f"clip_{name}"] = (_rel(clipped(make, mlp(0)).parameters(), ref_c.parameters()),
                               max(abs(a - b) for a, b in zip(norms, want)))
    norms.clear()
    z3 = clipped(lambda m: torch.optim.Adam(m.parameters(), lr=0.01), zero.Zero3(mlp(0)))
    out["clip_zero3"] = (_rel(z3.full_parameters(), ref_c.parameters()), max(abs(a - b) for a, b in zip(norms, want)))
    out["clip_was_active"] = (min(want), min(want) > 0.05)
    # a frozen first weight, and parameters in no unit (the root's): as one process with the same model
    ref_f, model = mlp(0), mlp(0)
    for m in (ref_f, model):
        m[0].weight.requires_grad_(False)
    _train(ref_f, torch.optim.Adam([p for p in ref_f.parameters() if p.requires_grad], lr=0.01), data)
    z3 = zero.Zero3(model, units=[model[0], model[2]])  # model[4] is in no unit: the root holds it
    _train(z3, torch.optim.Adam(z3.parameters(), lr=0.01), data, r, n)
    out["frozen3"] = _rel(z3.full_parameters(), ref_f.parameters())
    out["frozen3_state"] = sum(s.numel() for s in z3.parameters())  # the frozen weight's shard is not a parameter
    out["frozen3_unchanged"] = bool(torch.equal(z3.full_parameters()[0], ref_f[0].weight))
    return out


def _everything(ctx, resume=None) -> dict:
    out = {"adam64": train_rank(ctx, METHODS, steps=3, dtype="float64", optimizer="adam"),
           "adam32": train_rank(ctx, ("ddp", "zero1", "zero2", "zero3", "fsdp2"), steps=3, dtype="float32"),
           # one 25 MiB bucket for ZeRO-2 here (the others use buckets of about one parameter)
           "momentum64": train_rank(ctx, ("zero1", "zero2", "zero3"), steps=3, optimizer="momentum", bucket_mb=25),
           "adamw64": train_rank(ctx, ("zero1-naive", "zero2", "zero-torch"), steps=2, optimizer="adamw")}
    if ctx.world_size == 2:
        out["saved"] = train_rank(ctx, ("zero1", "zero2"), steps=2, save=True)
        out["bad"] = _bad_inputs(ctx)
        out["exact3"] = _stage3_exact(ctx)
        out["edges"] = _edges(ctx)
    if resume is not None:
        out["resumed"] = train_rank(ctx, ("zero1", "zero2"), steps=2, start=resume, first_step=2)
    return out


_CACHE: dict = {}


def _run(n: int) -> list[dict]:
    if n not in _CACHE:
        resume = None
        if n == 3:  # load what 2 ranks saved after 2 steps onto 3 ranks (and into one plain optimiser)
            saved = _run(2)[0]["saved"]
            resume = (saved["zero1"]["params"], saved["zero1"]["state_dict"])
        _CACHE[n] = labkit.launch(_everything, world_size=n, kwargs=dict(resume=resume), pool=True, echo=False,
                                  timeout=300)
    return _CACHE[n]


def _single(steps: int, dtype="float64", optimizer="adam"):
    model = mlp(0, dtype)
    cls, kw = OPTIMIZERS[optimizer]
    opt = cls(model.parameters(), **kw)
    for x, y in batches(steps, dtype=dtype):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_method_equals_one_process(n):
    res = _run(n)
    for config, tol in (("adam64", TIGHT), ("adam32", LOOSE), ("momentum64", TIGHT), ("adamw64", TIGHT)):
        for r in res:
            for m, got in r[config].items():
                if m == "P":
                    continue
                assert got["vs_single"] < tol, (config, m, r[config][m]["vs_single"])
                ref = r[config]["single"]["losses"]
                assert max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref)) < tol, (config, m)
    # the reference in the workers is the one this process computes
    model, _ = _single(3)
    want = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(res[0]["adam64"]["single"]["params"], want)
    assert (res[0]["adam64"]["zero3"]["params"] - want).abs().max() / want.abs().max() < TIGHT


def test_two_ranks_are_bit_for_bit_ddp():
    """With 2 ranks a sum of two values has one order, so ZeRO's reduce-scatter equals DDP's all-reduce exactly."""
    r = _run(2)[0]["adam64"]
    for m in ("zero1-naive", "zero1", "zero2", "zero3", "zero-torch", "fsdp2"):
        assert torch.equal(r[m]["params"], r["ddp"]["params"]), m


@pytest.mark.parametrize("n", [2, 3, 4])
def test_optimizer_state_is_one_shard_per_rank(n):
    res = _run(n)
    shard = math.ceil(P / n)
    for r in res:
        a = r["adam64"]
        assert a["zero1"]["state_numel"] == a["zero2"]["state_numel"] == a["zero1-naive"]["state_numel"] == 2 * shard
        assert a["zero3"]["state_numel"] == 2 * sum(math.ceil(u / n) for u in UNITS)
        assert a["single"]["state_numel"] == a["ddp"]["state_numel"] == 2 * P
        assert r["momentum64"]["zero1"]["state_numel"] == shard  # SGD momentum: one buffer
        # float32 Adam: two buffers of ⌈P/N⌉ values, 4 bytes each
        assert r["adam32"]["zero2"]["state_numel"] * 4 == math.ceil(P / n) * 8
    torch_zero = [r["adam64"]["zero-torch"]["state_numel"] for r in res]
    assert sum(torch_zero) == 2 * P  # whole parameters given to ranks: nothing padded, nothing repeated
    assert max(torch_zero) > 2 * shard  # and uneven: some rank holds more than ⌈P/N⌉ per buffer
    fsdp2 = [r["adam64"]["fsdp2"]["state_numel"] for r in res]  # rows of each matrix split over the ranks
    assert sum(fsdp2) == 2 * P and max(fsdp2) > 2 * shard


@pytest.mark.parametrize("n", [2, 3, 4])
def test_bytes_per_step_are_2psi_and_3psi(n):
    for r in _run(n):
        a = r["adam64"]
        padded = a["zero1"]["padded"]
        assert padded == n * math.ceil(P / n)
        assert a["ddp"]["volume_per_step"] == 2 * P * 8
        for m in ("zero1", "zero2"):
            assert a[m]["volume_per_step"] == 2 * padded * 8, m
        assert a["zero1-naive"]["volume_per_step"] == 3 * padded * 8
        t, psi3 = a["zero3"]["traffic"], sum(n * math.ceil(u / n) for u in UNITS)
        assert t["volume_by_op"]["reduce_scatter"] == 3 * psi3 * 8
        assert t["volume_by_label"]["forward"] == 3 * psi3 * 8
        # in the backward, all units but the first are gathered again (the first layer's input needs no gradient)
        assert t["volume_by_label"]["backward"] == 3 * (psi3 - n * math.ceil(UNITS[0] / n)) * 8
        zero2 = a["zero2"]["traffic"]
        assert zero2["volume_by_op"]["reduce"] == 3 * padded * 8 and zero2["calls"]["all_reduce"] == 0


def test_stage3_moves_exactly_3psi_when_every_unit_is_needed_in_backward():
    for r in _run(2):
        e = r["exact3"]
        assert e["x_grad"]
        assert e["traffic"]["volume"] == 3 * e["psi"] * 8
        assert e["traffic"]["volume_by_label"] == {"forward": e["psi"] * 8, "backward": e["psi"] * 8}
        # nothing stays gathered after the forward or the backward: only the shards
        assert e["after_forward"] == e["after_backward"] == sum(e["shards"])
        # and the gathered buffers are really gone, not just forgotten by Zero3
        assert e["freed_after_forward"] == [True] * 3 and e["freed_after_backward"] == [True] * 6


@pytest.mark.parametrize("n", [2, 3, 4])
def test_gradients_held_after_a_step(n):
    shard = math.ceil(P / n)
    for r in _run(n):
        a = r["adam64"]
        assert a["zero2"]["grad_numel"] == shard            # only this rank's 1/N of the gradients
        assert a["zero1"]["grad_numel"] == P + shard        # ZeRO-1 keeps every full gradient
        # ... and its own averaged slice, the shard's .grad that the inner optimiser steps
        assert a["zero1"]["grad_parts"] == {"whole": P, "slice": shard, "buckets": 0}
        assert a["zero2"]["grad_parts"] == {"whole": 0, "slice": shard, "buckets": 0}
        assert a["ddp"]["grad_parts"] == {"whole": P, "slice": 0, "buckets": 0}
        assert a["zero3"]["grad_parts"]["whole"] == 0
        assert a["zero3"]["grad_numel"] == sum(math.ceil(u / n) for u in UNITS)
        assert a["zero3"]["held_numel"] == sum(math.ceil(u / n) for u in UNITS)


def test_state_dict_is_the_plain_optimizers_and_reshards():
    saved = _run(2)
    assert saved[1]["saved"]["zero1"]["state_dict"] is None  # consolidated on rank 0 only
    model, plain = _single(2)
    want = plain.state_dict()
    for m in ("zero1", "zero2"):
        got = saved[0]["saved"][m]["state_dict"]
        assert got["param_groups"] == want["param_groups"]
        assert got["state"].keys() == want["state"].keys()
        for i, st in want["state"].items():
            for k, v in st.items():
                assert got["state"][i][k].shape == v.shape
                assert torch.allclose(got["state"][i][k], v, rtol=TIGHT, atol=1e-15), (m, i, k)
    # it loads into a plain single-process optimiser, which then continues as if never interrupted
    fresh = mlp(0)
    with torch.no_grad():
        for p, q in zip(fresh.parameters(), model.parameters()):
            p.copy_(q)
    opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    opt.load_state_dict(saved[0]["saved"]["zero1"]["state_dict"])
    for x, y in batches(4)[2:]:
        opt.zero_grad()
        nn.functional.cross_entropy(fresh(x), y).backward()
        opt.step()
    four, _ = _single(4)
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    assert (flat(fresh) - flat(four)).abs().max() < 1e-14
    # saved on 2 ranks, loaded on 3 (and into the plain optimiser of each rank's reference): 2 more steps
    for r in _run(3):
        res = r["resumed"]
        assert res["single"]["vs_single"] == 0
        for m in ("zero1", "zero2"):
            assert res[m]["vs_single"] < TIGHT
            assert res[m]["state_numel"] == 2 * math.ceil(P / 3)
    got = _run(3)[0]["resumed"]["zero2"]["params"]
    assert (got - flat(four)).abs().max() / flat(four).abs().max() < TIGHT


def test_bad_inputs_raise_clear_errors_on_every_rank():
    for r in _run(2):
        bad = r["bad"]
        assert "not a submodule" in bad["not_sub"]
        assert "units[1] (Linear) is inside units[0] (Sequential)" in bad["nested"]
        assert "LBFGS is not element-wise" in bad["lbfgs"] and "torch.optim.AdamW" in bad["lbfgs"]
        assert "mix dtypes" in bad["mixed"]
        assert "world_size=2 is larger than the 1 values" in bad["too_many_ranks"]
        assert "bucket_mb" in bad["bucket"]
        assert "one group of 6 parameters" in bad["wrong_state"]
        assert "'state' and 'param_groups'" in bad["not_a_state"]


def test_accumulation_unused_and_tied_parameters_units_and_eval():
    for r in _run(2):
        e = r["edges"]
        assert e["accum"] < TIGHT and e["unused"] < TIGHT, e
        # every backward sent its buckets before step() was called: ZeRO-2 reduces during backward
        assert e["reduces_after_each_backward"][0] > 0
        assert e["reduces_after_each_backward"][1] == 2 * e["reduces_after_each_backward"][0]
        assert e["tied_zero2"] < TIGHT and e["tied_zero3"] < TIGHT, e
        assert e["tied_default_units"] < TIGHT and e["tied_outside"] < TIGHT, e
        assert e["units"] < TIGHT and e["eval"] < 1e-14 and e["eval_held"]
        assert e["frozen3"] < TIGHT and e["frozen3_unchanged"], e
        # the trained shards: the first bias (11 values), the second layer (84), the root's last layer (24); the
        # frozen 6x11 weight is sharded too, but outside zero3.parameters(): no gradient, no optimiser state
        assert e["frozen3_state"] == math.ceil(11 / 2) + math.ceil(84 / 2) + math.ceil(24 / 2), e
        assert e["clip_was_active"][1], e["clip_was_active"]  # clipping was active: the check bites
        for m in ("zero1", "zero2", "zero3"):  # StepLR + global-norm clipping == one process doing the same
            assert e[f"clip_{m}"][0] < TIGHT and e[f"clip_{m}"][1] < 1e-12, (m, e[f"clip_{m}"])


@pytest.mark.parametrize("n", [2, 3, 4])
def test_measured_bytes_per_rank_match_the_memory_model(n):
    """labkit.memory_model's ZeRO formulas (fp32 Adam: 4 + 4 + 8 bytes per value) against float32 runs: equal up to
    the padding (a shard is ⌈P/N⌉ values where the formula has P/N) and, for ZeRO-3, the per-unit rounding."""
    from labkit.memory_model import zero_bytes_each_rank

    for r in _run(n):
        a = r["adam32"]
        for stage, _name, measured in ((1, "zero1", {"optimizer": a["zero1"]["state_numel"] * 4}),
                                      (2, "zero2", {"optimizer": a["zero2"]["state_numel"] * 4,
                                                    "grads": a["zero2"]["grad_numel"] * 4}),
                                      (3, "zero3", {"optimizer": a["zero3"]["state_numel"] * 4,
                                                    "grads": a["zero3"]["grad_numel"] * 4,
                                                    "weights": a["zero3"]["held_numel"] * 4})):
            model = zero_bytes_each_rank(P, n, stage, precision="fp32", optimizer="adam")
            slack = len(UNITS) if stage == 3 else 1  # values of rounding up, per buffer
            per_value = {"optimizer": 8, "grads": 4, "weights": 4}
            for k, got in measured.items():
                assert 0 <= got - model[k] < slack * per_value[k], (stage, k, got, model[k])
        plain = zero_bytes_each_rank(P, n, 0, precision="fp32", optimizer="adam")
        assert a["ddp"]["state_numel"] * 4 == plain["optimizer"] and a["ddp"]["grad_numel"] * 4 == plain["grads"]


def test_fsdp2_with_bf16_compute_stays_close_to_one_process():
    """FSDP2's MixedPrecisionPolicy (bf16 gathers and compute, fp32 shards, optimiser and reduction) trains on gloo:
    its losses follow one process's to bf16's precision, and the sharded parameters stay fp32."""
    res = labkit.launch(train_rank, world_size=2, kwargs=dict(methods=("fsdp2-bf16",), steps=3, dtype="float32"),
                        echo=False, pool=True)
    single, mixed = res[0]["single"]["losses"], res[0]["fsdp2-bf16"]["losses"]
    assert all(abs(a - b) <= 0.01 * abs(a) for a, b in zip(single, mixed)), (single, mixed)
    assert res[0]["fsdp2-bf16"]["vs_single"] < 0.1 and res[0]["fsdp2-bf16"]["params"].dtype == torch.float32
