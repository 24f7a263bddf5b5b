"""``group=`` for lab 01's collectives and lab 03's channel-parallel layers (what the capstone runs them on).

One launch of 4 gloo ranks runs every check and returns a dict per rank; the tests below read it. The groups:
``dist.new_group`` pairs {0,1} and {2,3}, the ``tp`` ({0,1}, {2,3}) and ``dp`` ({0,2}, {1,3}) groups of
``init_device_mesh("cpu", (2, 2))``, and a trio {1,2,3} (rank 0 outside it). Each group works on its own data,
all groups of one kind at the same time.
"""
import pytest
import torch
from torch import nn

import labkit
from labkit import collectives as C
from labkit import sliced as sc

VARIANTS = C.ALGORITHMS + ("ring_pipelined",)
NUMELS = (7, 12, 1001)  # 12 splits evenly over 2 and 3 ranks: torch's reduce_scatter then compares directly


def _data(global_rank, numel, dtype):
    """Integer-valued data, different on every rank and reproducible on any rank (exact sums)."""
    g = torch.Generator().manual_seed(1000 + global_rank)
    return torch.randint(-1000, 1000, (numel,), generator=g).to(dtype)


def _same(got, want):
    if got.dtype.is_floating_point:
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    return torch.equal(got, want)


def _collective_checks(ctx, g):
    """Every algorithm against torch's collective on ``g`` and against the sum of the members' own data."""
    import torch.distributed as dist

    from labkit.collectives.algorithms import _finish_avg

    n, gr = dist.get_world_size(g), dist.get_rank(g)
    members = [dist.get_global_rank(g, i) for i in range(n)]
    bad, cases = [], 0
    for dtype in (torch.float64, torch.int64):
        for numel in NUMELS:
            x = _data(ctx.rank, numel, dtype)
            total = sum(_data(m, numel, dtype) for m in members)
            assert not torch.equal(total, sum(_data(m, numel, dtype) for m in range(ctx.world_size)))
            for op in ("sum", "avg"):
                want = x.clone()
                if op == "avg" and not dtype.is_floating_point:  # gloo has no integer AVG
                    dist.all_reduce(want, group=g)
                    _finish_avg(want, n)
                else:
                    dist.all_reduce(want, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.AVG, group=g)
                mine = total.clone()
                if op == "avg":
                    _finish_avg(mine, n)
                got = {v: C.all_reduce(x.clone(), op=op, algorithm="ring" if v == "ring_pipelined" else v,
                                       segments=2 if v == "ring_pipelined" else 1, group=g) for v in VARIANTS}
                piece = C.reduce_scatter(x, op=op, group=g)
                ref_piece = torch.tensor_split(want, n)[gr]
                if numel % n == 0 and op == "sum":
                    ref_piece = torch.empty(numel // n, dtype=dtype)
                    dist.reduce_scatter(ref_piece, list(torch.tensor_split(x.clone(), n)), group=g)
                checks = [(f"{v} all-reduce", got[v], want) for v in VARIANTS]
                checks += [(f"{v} all-reduce vs members' data", got[v], mine) for v in VARIANTS]
                checks += [("reduce-scatter", piece, ref_piece),
                           ("reduce-scatter vs members' data", piece, torch.tensor_split(mine, n)[gr])]
                for name, a, b in checks:
                    cases += 1
                    if not _same(a, b):
                        bad.append(f"{name}, {numel} {dtype}, {op}, rank {ctx.rank}")
            ref = [torch.empty_like(x) for _ in range(n)]
            dist.all_gather(ref, x, group=g)
            got = C.all_gather(x, group=g)
            for name, want in (("all-gather", ref),
                               ("all-gather vs members' data", [_data(m, numel, dtype) for m in members])):
                cases += 1
                if not all(torch.equal(a, b) for a, b in zip(got, want)):
                    bad.append(f"{name}, {numel} {dtype}, rank {ctx.rank}")
    logs = {}
    for alg in C.SCHEDULE_NAMES + ("ring_pipelined",):
        log: list = []
        x = _data(ctx.rank, 12 * n, torch.float32)
        if alg == "reduce_scatter":
            C.reduce_scatter(x, log=log, group=g)
        elif alg == "all_gather":
            C.all_gather(x, log=log, group=g)
        else:
            C.all_reduce(x, algorithm="ring" if alg == "ring_pipelined" else alg, log=log,
                         segments=2 if alg == "ring_pipelined" else 1, group=g)
        logs[alg] = log
    return {"members": members, "group_rank": gr, "bad": bad, "cases": cases, "logs": logs}


def _megatron_checks(ctx, g):
    """Lab 03's layers on ``g`` against the unsplit modules, float64; this group's input is its own."""
    import torch.distributed as dist

    n, gr = dist.get_world_size(g), dist.get_rank(g)
    first = dist.get_global_rank(g, 0)
    torch.manual_seed(0)  # the same full layers on every rank
    ref = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6)).double()
    gen = torch.Generator().manual_seed(first)  # the same input within the group, another in the other group
    x = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    par = nn.Sequential(sc.ColumnParallel(ref[0], gather_output=False, group=g), nn.GELU(),
                        sc.RowParallel(ref[2], group=g))
    sc.COMM_BYTES.update(all_reduce=0, all_gather=0)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), par(xb)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    comm = sc.COMM_BYTES["all_reduce"] + sc.COMM_BYTES["all_gather"]
    err = {"out": (yb - ya).abs().max(), "x grad": (xb.grad - xa.grad).abs().max(),
           "column weight grad": (par[0].local.weight.grad - ref[0].weight.grad.chunk(n, 0)[gr]).abs().max(),
           "column bias grad": (par[0].local.bias.grad - ref[0].bias.grad.chunk(n, 0)[gr]).abs().max(),
           "row weight grad": (par[2].local.weight.grad - ref[2].weight.grad.chunk(n, 1)[gr]).abs().max(),
           "row bias grad": (par[2].bias.grad - ref[2].bias.grad).abs().max()}

    # gather_channels / scatter_channels: a gathered column layer, then a row layer that splits its input
    lin = nn.Sequential(ref[0], ref[2])
    split = nn.Sequential(sc.ColumnParallel(ref[0], gr, n, True, group=g),
                          sc.RowParallel(ref[2], input_is_split=False, group=g))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya2, yb2 = lin(xa), split(xb)
    (ya2 * w).sum().backward()
    (yb2 * w).sum().backward()
    err["gathered/scattered out"] = (yb2 - ya2).abs().max()
    err["gathered/scattered x grad"] = (xb.grad - xa.grad).abs().max()

    block = sc.conv_block(4, 8, 4).double()
    img = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen)
    ia, ib = img.clone().requires_grad_(), img.clone().requires_grad_()
    oa, ob = block(ia), sc.TensorParallelConvBlock(block, group=g)(ib)
    oa.square().sum().backward()
    ob.square().sum().backward()
    err["conv block out"] = (ob - oa).abs().max()
    err["conv block x grad"] = (ib.grad - ia.grad).abs().max()

    refused = []
    for make in (lambda: sc.ColumnParallel(ref[0], 1 - gr, n, group=g),
                 lambda: sc.RowParallel(ref[2], gr, 4, group=g),
                 lambda: sc.TensorParallelConvBlock(block, world_size=4, group=g)):
        try:
            make()
            refused.append(None)
        except ValueError as e:
            refused.append(str(e))
    return {"err": {k: float(v) for k, v in err.items()}, "out": yb.detach(), "comm": comm,
            "expected_comm": (ya.numel() + x.numel()) * 8, "refused": refused}


def _rank_checks(ctx):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    r = ctx.rank
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes every group
    trio = dist.new_group([1, 2, 3])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    groups = {"pairs": pairs[r // 2], "tp": mesh["tp"].get_group(), "dp": mesh["dp"].get_group(), "trio": trio}
    out = {"collectives": {}, "megatron": {}}
    for label, g in groups.items():
        if label == "trio" and r == 0:
            continue
        out["collectives"][label] = _collective_checks(ctx, g)
    for label in ("pairs", "tp"):
        out["megatron"][label] = _megatron_checks(ctx, groups[label])
    out["errors"] = []
    for call in (lambda: C.all_reduce(torch.ones(3), group=trio), lambda: C.all_gather(torch.ones(3), group=mesh)):
        try:
            call()
            out["errors"].append(None)
        except (ValueError, TypeError) as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
    torch.manual_seed(0)
    full = nn.Linear(6, 8)
    out["default_group_slice"] = torch.equal(sc.ColumnParallel(full).local.weight, full.weight.chunk(4, 0)[r])
    return out


@pytest.fixture(scope="module")
def results():
    return labkit.launch(_rank_checks, world_size=4, pool=True, timeout=180, echo=False)


@pytest.mark.timeout(300)
def test_collectives_on_groups_equal_torch_and_stay_within_the_group(results):
    for label, n in (("pairs", 2), ("tp", 2), ("dp", 2), ("trio", 3)):
        for r, res in enumerate(results):
            if label == "trio" and r == 0:
                assert label not in res["collectives"]
                continue
            c = res["collectives"][label]
            assert len(c["members"]) == n and c["members"][c["group_rank"]] == r
            assert c["cases"] == 2 * len(NUMELS) * (2 * (2 * len(VARIANTS) + 2) + 2)
            assert not c["bad"], (label, c["bad"][:5])
    members = {label: {tuple(res["collectives"][label]["members"]) for res in results if label in res["collectives"]}
               for label in ("pairs", "tp", "dp", "trio")}
    assert members == {"pairs": {(0, 1), (2, 3)}, "tp": {(0, 1), (2, 3)}, "dp": {(0, 2), (1, 3)}, "trio": {(1, 2, 3)}}


@pytest.mark.timeout(300)
def test_logs_name_group_ranks_and_match_the_schedules(results):
    for label in ("pairs", "tp", "dp", "trio"):
        groups = {tuple(res["collectives"][label]["members"]) for res in results if label in res["collectives"]}
        for members in groups:
            n = len(members)
            for alg in C.SCHEDULE_NAMES + ("ring_pipelined",):
                logs = [results[m]["collectives"][label]["logs"][alg] for m in members]
                for gr, log in enumerate(logs):
                    assert log, (label, alg, gr)
                    assert all(m["src"] == gr and 0 <= m["dst"] < n and m["dst"] != gr for m in log), (label, alg, log)
                assert C.log_matches_schedule(
                    logs, "ring" if alg == "ring_pipelined" else alg, n), (label, members, alg)


@pytest.mark.timeout(300)
def test_megatron_mlp_and_conv_block_on_tp_groups_equal_unsplit(results):
    for label in ("pairs", "tp"):
        for res in results:
            m = res["megatron"][label]
            assert all(v < 1e-12 for v in m["err"].values()), (label, m["err"])
            assert m["comm"] == m["expected_comm"]  # one all-reduce forward (output), one backward (input grad)
        outs = [res["megatron"][label]["out"] for res in results]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])
        assert not torch.allclose(outs[0], outs[2])  # the two groups had different inputs and kept them apart


@pytest.mark.timeout(300)
def test_rank_or_world_against_the_group_and_outsiders_are_refused(results):
    for r, res in enumerate(results):
        for label in ("pairs", "tp"):
            col, row, block = res["megatron"][label]["refused"]
            gr = r % 2
            assert col and f"ColumnParallel got rank={1 - gr}, world=2" in col and f"rank {gr} of 2" in col
            assert "pass group= alone" in col and f"rank={gr}, world=2" in col
            assert row and "RowParallel got rank=" in row and "world=4" in row
            assert block and "TensorParallelConvBlock got rank=None, world=4" in block
        not_member, not_group = res["errors"]
        if r == 0:
            assert not_member.startswith("ValueError: all_reduce: this process (global rank 0) is not in")
            assert "group=None" in not_member
        else:
            assert not_member is None
        assert (not_group.startswith("TypeError: group must be a torch.distributed ProcessGroup")
                and "DeviceMesh" in not_group)
        assert res["default_group_slice"]
