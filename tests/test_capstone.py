"""Lab 11: the mesh, each tensor-parallel layer against its unsplit version, and every dp × pp × tp grid of 2, 4 and
8 ranks against one process (float64), with the bytes per group equal to the formulas."""
import pytest
import torch

import labkit
from labkit._validate import ArgumentError
from labkit.capstone import grid as G
from labkit.capstone import model as M
from labkit.capstone import traffic
from labkit.capstone.bench import all_grids
from labkit.runtime import mesh as mesh_mod

CFG = M.Config()
SINGLE = {}


def single(steps=2):
    if steps not in SINGLE:
        SINGLE[steps] = M.train_single(steps, CFG)
    return SINGLE[steps]


# ------------------------------------------------------------------ the mesh
def test_mesh_arithmetic_is_torch_layout():
    ranks = torch.arange(8).view(2, 2, 2)  # init_device_mesh lays ranks out as arange(world).view(shape)
    for g in range(8):
        c = mesh_mod.coords_of(g, 2, 2, 2)
        assert ranks[c["dp"], c["pp"], c["tp"]] == g
        m = mesh_mod.members_of(g, 2, 2, 2)
        assert m["tp"] == ranks[c["dp"], c["pp"], :].tolist()
        assert m["pp"] == ranks[c["dp"], :, c["tp"]].tolist()
        assert m["dp"] == ranks[:, c["pp"], c["tp"]].tolist()
    assert mesh_mod.layout(1, 2, 4) == [[[0, 1, 2, 3], [4, 5, 6, 7]]]


def test_mesh_shape_errors():
    with pytest.raises(ArgumentError, match=r"dp=2 × pp=2 × tp=1 = 4 ranks, but the world has 8.*2×2×2"):
        mesh_mod.validate_shape(8, 2, 2, 1)
    with pytest.raises(ArgumentError, match="tp"):
        mesh_mod.validate_shape(8, 2, 2, 0)


def _mesh_and_torch_rank(ctx):
    import torch.distributed as dist

    from labkit.capstone.lab import compare_block_rank

    m = ctx.mesh(dp=2, pp=2, tp=2)
    got = {d: dist.get_process_group_ranks(m.group(d)) for d in ("dp", "pp", "tp")}
    sums = {}
    for d in ("dp", "pp", "tp"):
        t = torch.tensor([float(ctx.rank)])
        dist.all_reduce(t, group=m.group(d))
        sums[d] = t.item()
    again = ctx.mesh(dp=2, pp=2, tp=2) is m
    return {"coords": m.coords, "members": m.members, "got": got, "sums": sums, "cached": again,
            "torch": compare_block_rank(ctx, tp=2)}


@pytest.mark.slow
def test_mesh_groups_on_8_ranks_and_torch_tensor_parallel():
    res = labkit.launch(_mesh_and_torch_rank, world_size=8, timeout=300)
    for r, out in enumerate(res):
        assert out["coords"] == mesh_mod.coords_of(r, 2, 2, 2)
        for d in ("dp", "pp", "tp"):
            assert sorted(out["got"][d]) == out["members"][d] == mesh_mod.members_of(r, 2, 2, 2)[d]
            assert out["sums"][d] == sum(out["members"][d])  # a collective on the group reaches exactly its members
        assert out["cached"]
        t = out["torch"]
        assert t["labkit"] < 1e-12, t
        # torch's own tensor parallelism runs on gloo here and gives the same block (else say why)
        assert "torch_error" not in t, t.get("torch_error")
        assert t["torch"] < 1e-12 and t["torch_weight"] == "DTensor"


# ------------------------------------------------------------------ each layer against its unsplit version
def _layers_rank(ctx, sp):
    from labkit.capstone.tp import ParallelStage, TPBlock, VocabEmbedding, unsplit_loss

    tp = ctx.world_size
    m = ctx.mesh(dp=1, pp=1, tp=tp)
    group, r = m.group("tp"), m.coords["tp"]
    ref = M.build(CFG, seed=3)
    x_ids, y_ids = M.sort_batch(2, CFG, seed=5)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, CFG.seq, CFG.width, generator=g, dtype=torch.float64)
    s = CFG.seq // tp
    mine = slice(r * s, (r + 1) * s) if sp else slice(None)
    out = {}

    # one block: output and every gradient
    blk = ref.blocks[0]
    xr = x.clone().requires_grad_(True)
    yr = blk(xr)
    (yr * x).sum().backward()
    tpb = TPBlock(blk, group, r, tp, sp)
    xt = x[:, mine].clone().requires_grad_(True)
    yt = tpb(xt)
    (yt * x[:, mine]).sum().backward()
    if sp:
        for p in [tpb.ln1.weight, tpb.ln1.bias, tpb.ln2.weight, tpb.ln2.bias, tpb.proj_bias, tpb.fc2_bias]:
            torch.distributed.all_reduce(p.grad, group=group)
    out["block_out"] = float((yt - yr[:, mine]).abs().max())
    out["block_dx"] = float((xt.grad - xr.grad[:, mine]).abs().max())
    errs = []
    for local, (full, dim) in TPBlock.SPEC.items():
        gref = blk.get_parameter(full).grad
        if dim is not None:
            gref = gref.chunk(tp, dim=dim)[r]
        errs.append(float((tpb.get_parameter(local).grad - gref).abs().max()))
    out["block_grads"] = max(errs)

    # the embedding
    emb = VocabEmbedding(ref.tok, ref.pos, group, r, tp, sp)
    e_ref = ref.tok(x_ids) + ref.pos
    e = emb(x_ids)
    out["embed"] = float((e - e_ref[:, mine]).abs().max())

    # the last stage's output layer and the vocabulary-parallel loss against the whole model's loss
    st = ParallelStage(ref, 0, 1, group, r, tp, sp)
    loss = st.loss(st(x_ids), y_ids)
    loss.backward()
    ref.zero_grad()
    ref_loss = unsplit_loss(ref(x_ids), y_ids)
    ref_loss.backward()
    out["loss"] = abs(float(loss) - float(ref_loss))
    st.sync_sp_grads()
    head_ref = ref.head.weight.grad.chunk(tp, dim=0)[r]
    out["head_grad"] = float((st.head.weight.grad - head_ref).abs().max())
    out["emb_grad"] = float((st.embed.weight.grad - ref.tok.weight.grad.chunk(tp, dim=0)[r]).abs().max())
    out["pos_grad"] = float((st.embed.pos.grad - ref.pos.grad).abs().max())
    return out


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_tensor_parallel_layers_equal_unsplit(tp, sp):
    res = labkit.launch(_layers_rank, world_size=tp, args=(sp,), timeout=180)
    for out in res:
        for k, v in out.items():
            assert v < 1e-12, (k, v, out)


def test_vocab_cross_entropy_rejects_nothing_silently():
    """The reference loss is the mean over every token: a changed target changes it (the check can fail)."""
    x, y = M.sort_batch(2, CFG)
    model = M.build(CFG)
    a = M.lm_loss(model(x), y)
    y2 = y.clone()
    y2[0, 0] = (y2[0, 0] + 1) % CFG.vocab
    assert float(M.lm_loss(model(x), y2)) != float(a)


# ------------------------------------------------------------------ the grid against one process
def _check_grid(dp, pp, tp, sp=False, steps=2):
    run = G.run_grid(dp, pp, tp, sp=sp, steps=steps, batch=16, timeout=300)
    diff = run.compare(single(steps))
    assert diff["loss"] < 1e-9 and diff["params"] < 1e-9, (run.shape, diff)
    pred = traffic.predict(CFG, dp, pp, tp, sp, batch=16, n_micro=run.n_micro)
    assert set(run.bytes) == set(pred), (run.bytes, pred)
    for g_, ops in pred.items():
        for op, n in ops.items():
            assert run.bytes[g_][op] == pytest.approx(n, abs=0.5), (run.shape, g_, op, run.bytes[g_], ops)
    return run


SMALL = [g for g in all_grids((2, 4))]
EIGHT = [g for g in all_grids((8,))]


@pytest.mark.parametrize("grid", SMALL, ids=lambda g: "x".join(map(str, g)))
def test_grid_of_2_and_4_ranks_equals_one_process(grid):
    _check_grid(*grid)


@pytest.mark.slow
@pytest.mark.parametrize("grid", EIGHT, ids=lambda g: "x".join(map(str, g)))
def test_grid_of_8_ranks_equals_one_process(grid):
    _check_grid(*grid)


@pytest.mark.parametrize("grid", [(1, 1, 2), (1, 2, 2), (2, 1, 2)], ids=lambda g: "x".join(map(str, g)))
def test_sequence_parallel_grid_equals_one_process_and_moves_the_same_bytes(grid):
    run = _check_grid(*grid, sp=True)
    plain = traffic.predict(CFG, *grid, sp=False, batch=16, n_micro=run.n_micro)
    wire_sp = run.wire["tp"]
    # reduce-scatter + all-gather carry what the all-reduce did, in the layers; the rest is the LayerNorm sync
    layer = traffic.tp_layer_bytes(4, CFG.seq, CFG.width, 8, sp=True)
    assert sum(layer.values()) / 2 == traffic.tp_layer_bytes(4, CFG.seq, CFG.width, 8)["all_reduce"]
    assert wire_sp > 0 and plain["tp"]["all_reduce"] > 0


def test_every_grid_of_8_is_listed():
    assert len(all_grids((2, 4, 8))) == 19
    assert (2, 2, 2) in EIGHT and (8, 1, 1) in EIGHT and (1, 1, 8) in EIGHT and (1, 8, 1) in EIGHT


# ------------------------------------------------------------------ bad input, before any process starts
@pytest.mark.parametrize("kw,match", [
    (dict(dp=2, pp=2, tp=3), r"tp=3 does not divide the model's heads \(8\).*\[1, 2, 4, 8\]"),
    (dict(dp=1, pp=16, tp=1), r"pp=16 pipeline stages for 8 layers.*pp <= 8"),
    (dict(dp=3, pp=1, tp=1), r"batch=16 rows do not split evenly over dp=3"),
    (dict(dp=2, pp=2, tp=2, n_micro=3), r"n_micro=3 micro-batches do not divide the 8 rows.*\[1, 2, 4, 8\]"),
    (dict(dp=1, pp=1, tp=0), r"tp"),
])
def test_bad_grids_say_what_would_work(kw, match):
    with pytest.raises(ArgumentError, match=match):
        G.run_grid(**kw)


def test_bad_model_shapes():
    with pytest.raises(ArgumentError, match="width=60 does not split into heads=8"):
        M.Config(width=60)
    with pytest.raises(ArgumentError, match="tp=4 does not divide the model's seq"):
        G.validate_grid(1, 1, 4, M.Config(seq=6, vocab=16), sp=True, batch=4)


def test_stage_layers_cover_every_layer_once():
    for pp in range(1, 9):
        parts = M.stage_layers(8, pp)
        assert [i for r in parts for i in r] == list(range(8))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sort_task_is_deterministic_and_sorted():
    x, y = M.sort_batch(4, CFG, seed=1)
    x2, _ = M.sort_batch(4, CFG, seed=1)
    assert torch.equal(x, x2) and x.shape == (4, CFG.seq)
    k = CFG.seq // 2
    assert (x[:, k] == CFG.vocab - 1).all()
    full = torch.cat([x, y[:, -1:]], dim=1)
    assert torch.equal(full[:, k + 1:], full[:, :k].sort(dim=1).values)


def test_old_names_still_work_and_warn():
    """Issue 30's renames in lab 11 keep working one release, with a DeprecationWarning naming the new spelling."""
    import labkit.capstone as C
    from labkit.capstone.tp import TPBlock

    with pytest.warns(DeprecationWarning, match=r"Config\(ffn=\) is now ffn_width="):
        old = M.Config(ffn=128)
    assert old == M.Config(ffn_width=128) and old.resolved_ffn_width == 128
    with pytest.warns(DeprecationWarning, match=r"Config.hidden is now Config.resolved_ffn_width"):
        assert CFG.hidden == 4 * CFG.width == CFG.resolved_ffn_width  # the FFN width, as cfg.hidden was
    with pytest.warns(DeprecationWarning, match=r"Config.ffn is now Config.ffn_width"):
        assert CFG.ffn is None
    with pytest.warns(DeprecationWarning, match="labkit.capstone.grid.validate_grid"):
        assert C.check_grid is G.validate_grid
    with pytest.warns(DeprecationWarning, match="choose_n_micro"):
        assert G.micro_batches(16, 2, None) == G.choose_n_micro(16, 2) == 4
    with pytest.warns(DeprecationWarning, match="predict_stage"):
        assert traffic.predict_rank is traffic.predict_stage
    block = M.build(CFG).blocks[0]
    with pytest.warns(DeprecationWarning, match=r"TPBlock\(world=\) is now world_size="):
        tpb = TPBlock(block, None, 0, world=1)
    with pytest.warns(DeprecationWarning, match=r"TPBlock.world is now TPBlock.world_size"):
        assert tpb.world == tpb.world_size == 1


def test_sequence_parallel_splits_every_activation_but_the_gathered_column_inputs():
    """Activation memory per rank (what autograd holds for the backward, lab 04's executor's count): tensor
    parallelism lowers it, sequence parallelism lowers it further, and what it leaves above 1/t of one process is
    exactly the column layers' all-gathered inputs (qkv and fc1 per layer, and the output layer), saved whole."""
    one, plain = G.run_grid(1, 1, 1, steps=1), G.run_grid(1, 1, 2, steps=1)
    seq = G.run_grid(1, 1, 2, sp=True, steps=1)
    assert len(seq.activations) == 2 and seq.activations[0] == seq.activations[1]
    assert max(seq.activations) < max(plain.activations) < one.activations[0]
    gathered = (2 * CFG.layers + 1) * (16 // seq.n_micro) * CFG.seq * CFG.width * 8
    assert abs(seq.activations[0] - gathered / 2 - one.activations[0] / 2) < 0.01 * one.activations[0]


def test_train_single_after_reports_the_loss_of_each_batch_after_its_step():
    a, b = single(3), M.train_single(3, after=True)
    assert a["losses"] == b["losses"] and len(b["losses_after"]) == 3 and "losses_after" not in a
    assert all(x < y for x, y in zip(b["losses_after"], b["losses"]))
