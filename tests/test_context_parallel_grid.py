"""Issue 27, item 4: context parallelism as a fourth dimension of the capstone's mesh. The mesh arithmetic with cp
(lab 11's numbering unchanged when cp = 1), the groups on real ranks, grids with cp = 2 (alone and with dp, pp, tp
and sequence parallelism) equal to one process in float64 with the bytes per group equal to the formulas, and the
bad inputs refused before any process starts."""
import pytest
import torch

import labkit
from labkit._validate import ArgumentError
from labkit.capstone import grid as G
from labkit.capstone import model as M
from labkit.capstone import traffic
from labkit.context_expert import ring
from labkit.context_expert.cp_grid import RingAttention, predict_cp, run_cp_grid
from labkit.runtime import mesh as mesh_mod

CFG = M.Config()
SINGLE = {}


def single(steps=2):
    if steps not in SINGLE:
        SINGLE[steps] = M.train_single(steps, CFG)
    return SINGLE[steps]


# ------------------------------------------------------------------ the mesh arithmetic
@pytest.mark.parametrize("shape", [(2, 2, 2, 2), (1, 1, 2, 2), (2, 1, 2, 1), (1, 2, 4, 1), (3, 1, 2, 2)])
def test_mesh_arithmetic_with_cp_is_torch_layout(shape):
    dp, pp, cp, tp = shape
    world = dp * pp * cp * tp
    ranks = torch.arange(world).view(dp, pp, cp, tp)  # init_device_mesh's layout for mesh dims (dp, pp, cp, tp)
    for g in range(world):
        c = mesh_mod.coords_of(g, dp, pp, tp, cp)
        assert ranks[c["dp"], c["pp"], c["cp"], c["tp"]] == g
        assert mesh_mod.rank_of(c["dp"], c["pp"], c["tp"], pp, tp, c["cp"], cp) == g
        m = mesh_mod.members_of(g, dp, pp, tp, cp)
        assert m["tp"] == ranks[c["dp"], c["pp"], c["cp"], :].tolist()
        assert m["cp"] == ranks[c["dp"], c["pp"], :, c["tp"]].tolist()
        assert m["pp"] == ranks[c["dp"], :, c["cp"], c["tp"]].tolist()
        assert m["dp"] == ranks[:, c["pp"], c["cp"], c["tp"]].tolist()
        assert m["dp_cp"] == ranks[:, c["pp"], :, c["tp"]].reshape(-1).tolist()
    assert mesh_mod.layout(dp, pp, tp, cp) == ranks.tolist()


def test_cp_1_keeps_every_rank_number_of_lab_11():
    for dp, pp, tp in [(2, 2, 2), (1, 2, 4), (4, 2, 1), (3, 2, 2)]:
        for g in range(dp * pp * tp):
            c = mesh_mod.coords_of(g, dp, pp, tp)
            assert c["cp"] == 0 and g == (c["dp"] * pp + c["pp"]) * tp + c["tp"]
            m = mesh_mod.members_of(g, dp, pp, tp)
            assert m["cp"] == [g] and m["dp_cp"] == m["dp"]
        assert mesh_mod.layout(dp, pp, tp) == torch.arange(dp * pp * tp).view(dp, pp, tp).tolist()
    assert mesh_mod.validate_shape(8, 2, 2, 2) == (2, 2, 2) == mesh_mod.validate_shape(16, 2, 2, 2, cp=2)


def test_mesh_shape_errors_with_cp():
    with pytest.raises(ArgumentError, match=r"dp=2 × pp=1 × cp=2 × tp=1 = 4 ranks, but the world has 8.*"
                                            r"dp×pp×cp×tp = 1×1×2×4"):
        mesh_mod.validate_shape(8, 2, 1, 1, cp=2)
    with pytest.raises(ArgumentError, match=r"cp=3.*none with cp=3: pass cp dividing 8"):
        mesh_mod.validate_shape(8, 1, 1, 1, cp=3)
    with pytest.raises(ArgumentError, match="cp"):
        mesh_mod.validate_shape(8, 8, 1, 1, cp=0)
    m = mesh_mod.Mesh(0, {}, {}, {}, groups={})
    with pytest.raises(ArgumentError, match="dp_cp"):
        m.group("sp")


def _mesh_rank(ctx, dp, cp, tp):
    import torch.distributed as dist

    m = ctx.mesh(dp=dp, cp=cp, tp=tp)
    got, sums = {}, {}
    for d in mesh_mod.GROUPS:
        got[d] = dist.get_process_group_ranks(m.group(d))
        t = torch.tensor([float(ctx.rank)])
        dist.all_reduce(t, group=m.group(d))
        sums[d] = t.item()
    return {"coords": m.coords, "members": m.members, "got": got, "sums": sums, "describe": m.describe(),
            "cached": ctx.mesh(dp=dp, cp=cp, tp=tp) is m, "lab11": ctx.mesh(dp=dp * cp, tp=tp).describe()}


@pytest.mark.parametrize("dp,cp,tp", [(1, 2, 2), (2, 2, 1)])
def test_mesh_groups_with_cp_on_4_ranks(dp, cp, tp):
    res = labkit.launch(_mesh_rank, world_size=4, args=(dp, cp, tp), timeout=180)
    for r, out in enumerate(res):
        assert out["coords"] == mesh_mod.coords_of(r, dp, 1, tp, cp)
        for d in mesh_mod.GROUPS:
            assert sorted(out["got"][d]) == out["members"][d] == mesh_mod.members_of(r, dp, 1, tp, cp)[d]
            assert out["sums"][d] == sum(out["members"][d])  # a collective on the group reaches exactly its members
        assert out["cached"]
        assert f"cp group {out['members']['cp']}" in out["describe"]
        assert "cp" not in out["lab11"]  # a cp = 1 mesh describes itself as lab 11's did


# ------------------------------------------------------------------ the grid against one process
def _check(dp, cp, pp, tp, sp=False, layout="zigzag", steps=2):
    run = run_cp_grid(dp, cp, pp, tp, layout=layout, sp=sp, steps=steps, batch=16, timeout=300)
    diff = run.compare(single(steps))
    assert diff["loss"] < 1e-9 and diff["params"] < 1e-9, (run.shape, diff)
    assert run.cp == cp and run.shape.endswith(f" cp{cp}") and len(run.per_rank) == dp * cp * pp * tp
    pred = predict_cp(CFG, dp, cp, pp, tp, sp, batch=16, n_micro=run.n_micro)
    assert set(run.bytes) == set(pred), (run.bytes, pred)
    for g_, ops in pred.items():
        for op, n in ops.items():
            assert run.bytes[g_][op] == pytest.approx(n, abs=0.5), (run.shape, g_, op, run.bytes[g_], ops)
    assert "dp" not in run.bytes and run.wire["cp"] == run.bytes["cp"]["isend"]  # gradients go over dp_cp
    return run


@pytest.mark.parametrize("layout", ring.LAYOUTS)
def test_cp_2_grid_equals_one_process(layout):
    _check(1, 2, 1, 1, layout=layout)


@pytest.mark.parametrize("dp,cp,pp,tp,sp", [(1, 2, 1, 2, False), (1, 2, 2, 1, False), (2, 2, 1, 1, False),
                                            (1, 2, 1, 2, True), (1, 4, 1, 1, False)],
                         ids=lambda v: str(v))
def test_mixed_grid_of_4_ranks_with_cp_equals_one_process(dp, cp, pp, tp, sp):
    _check(dp, cp, pp, tp, sp)


@pytest.mark.slow
@pytest.mark.parametrize("dp,cp,pp,tp", [(2, 2, 2, 1), (1, 2, 2, 2), (2, 2, 1, 2)], ids=lambda v: str(v))
def test_grid_of_8_ranks_with_cp_equals_one_process(dp, cp, pp, tp):
    _check(dp, cp, pp, tp)


def test_the_ring_halves_the_bytes_per_rank_when_tp_halves_its_heads():
    one, two = predict_cp(CFG, 1, 2, 1, 1), predict_cp(CFG, 1, 2, 1, 2)
    assert two["cp"]["isend"] * 2 == one["cp"]["isend"]
    b = 16 // 4  # a micro-batch's rows
    per_layer = ring.ring_bytes(b, CFG.heads, CFG.seq, CFG.head_dim, 2, 8)
    assert one["cp"]["isend"] == 4 * CFG.layers * (per_layer["forward"] + per_layer["backward"])


# ------------------------------------------------------------------ bad input, before any process starts
@pytest.mark.parametrize("kw,match", [
    (dict(cp=3), r"cp=3 does not divide the model's seq \(16\).*\[1, 2, 4, 8, 16\]"),
    (dict(cp=16), r"seq=16 does not split into 32 equal chunks \(zigzag layout on cp=16\)"),
    (dict(cp=0), r"cp"),
    (dict(cp=2, layout="diagonal"), r"layout"),
    (dict(cp=2, tp=8, sp=True, cfg=M.Config(seq=8)), r"tp=8 does not divide the model's seq / cp = 8/2 \(4\)"),
])
def test_bad_cp_grids_say_what_would_work(kw, match):
    with pytest.raises(ArgumentError, match=match):
        run_cp_grid(**kw)


def test_lab_11_alone_refuses_cp_and_names_lab_12s_ring():
    with pytest.raises(ArgumentError, match=r"cp=2 .*pass cp_attention=labkit.context_expert.cp_grid.RingAttention"):
        G.run_grid(1, 1, 1, cp=2)
    with pytest.raises(ArgumentError, match=r"cp=2: .*ring_bytes=labkit.context_expert.ring.ring_bytes"):
        traffic.predict(CFG, 1, 1, 1, cp=2)
    with pytest.raises(ArgumentError, match="layout"):
        RingAttention("diagonal")


def test_cp_1_changes_nothing_in_lab_11():
    assert predict_cp(CFG, 2, 1, 2, 2) == traffic.predict(CFG, 2, 2, 2)
    r = G.GridRun(2, 2, 2, False, 4, [], {}, {}, {}, 0.0, 0.0)
    assert r.cp == 1 and r.shape == "2×2×2"
