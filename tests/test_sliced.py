"""Lab 03: stage slicing and channel slicing equal the unsliced model (gloo, 2-4 ranks)."""
import copy

import pytest
import torch
from torch import nn

import labkit
from labkit import sliced
from labkit import sliced as sc
from labkit.partition import cuts_to_sizes, even_cuts, sizes_to_cuts
from labkit.sliced import (
    StagedModel,
    build_model,
    candidate_cuts,
    flatten_resnet,
    small_resnet,
    split_costs,
    split_stages,
)
from labkit.sliced import lab as sliced_lab


def _grads(m):
    return {n: p.grad.clone() for n, p in flatten_resnet(m).named_parameters()}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ------------------------------------------------------------------ flattening and splitting
@pytest.mark.parametrize("name,n_layers", [("small", 11), ("resnet18", 15), ("resnet50", 23)])
def test_flatten_equals_model(name, n_layers):
    model = build_model(name).eval()
    flat = flatten_resnet(model)
    assert len(flat) == n_layers
    assert candidate_cuts(model) == list(range(1, n_layers))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(flat(x), model(x), rtol=0, atol=0)
    # parameters are shared, not copied
    assert {id(p) for p in flat.parameters()} == {id(p) for p in model.parameters()}


def test_build_model_is_deterministic_and_small_resnet_shape():
    a, b = build_model("small", seed=3), build_model("small", seed=3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert small_resnet(num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name,bounds", [("small", [4, 7]), ("resnet18", [5, 10])])
def test_staged_model_equals_unsliced_forward_and_backward(name, bounds):
    torch.manual_seed(0)
    model = build_model(name).train()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)  # torchvision ResNets accept 32x32 too (1x1 after layer4)
    stages = split_stages(model, bounds)
    assert len(stages) == len(bounds) + 1
    assert sum(len(s) for s in stages) == len(flatten_resnet(model))
    staged = StagedModel(stages, ["cpu"] * len(stages))
    out, out_ref = staged(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    assert len(staged.transfer_bytes) == len(bounds)
    out.logsumexp(1).sum().backward()
    out_ref.logsumexp(1).sum().backward()
    ga, gb = _grads(model), _grads(ref)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert _rel(ga[k], gb[k]) < 1e-5, k
    # stage parameter names match the flattened model's names
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert names == [n for n, _ in flatten_resnet(model).named_parameters()]


def test_cut_helpers():
    assert sizes_to_cuts([3, 4, 5]) == [3, 7]
    assert cuts_to_sizes([3, 7], 12) == [3, 4, 5]
    assert even_cuts(15, 3) == [5, 10]
    assert even_cuts(11, 1) == []
    with pytest.raises(ValueError, match="positive layer counts"):
        sizes_to_cuts([3, 0])
    with pytest.raises(ValueError, match="into 6 stages"):
        even_cuts(5, 6)


@pytest.mark.parametrize("bounds,err,msg", [
    ([0], ValueError, "out of range"),
    ([11], ValueError, "out of range"),
    ([-2], ValueError, "out of range"),
    ([7, 4], ValueError, "strictly increasing"),
    ([4, 4], ValueError, "strictly increasing"),
    (list(range(1, 12)), ValueError, "only 11 layers"),
    ([2.5], TypeError, "integers"),
    (5, TypeError, "list of layer indices"),
])
def test_bad_split_points(bounds, err, msg):
    with pytest.raises(err, match=msg):
        split_stages(small_resnet(), bounds)


def test_bad_models_and_devices():
    with pytest.raises(TypeError, match="ResNet"):
        flatten_resnet(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="ResNet"):
        flatten_resnet("resnet18")
    with pytest.raises(ValueError, match="one of"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="one device per stage"):
        StagedModel(split_stages(small_resnet(), [4]), ["cpu"])
    with pytest.raises(ValueError, match="batch"):
        sliced_lab.run_staged("small", [4], batch=0)


def test_split_costs_counts_exact_tensors():
    model = small_resnet().train()
    shape = (4, 3, 32, 32)
    rows = split_costs(model, [4, 7], shape)
    assert [r["stage"] for r in rows] == [0, 1, 2]
    total = sum(p.numel() for p in model.parameters())
    assert sum(r["params"] for r in rows) == total
    # the activation crossing boundary 4 is the stem's output, 16 channels at 32x32, float32
    assert rows[0]["send_MB"] == pytest.approx(4 * 16 * 32 * 32 * 4 / 1e6)
    with torch.no_grad():
        h = flatten_resnet(model)[:7](torch.randn(*shape))
    assert rows[1]["send_MB"] == pytest.approx(h.numel() * 4 / 1e6)
    assert rows[2]["send_MB"] == 0 and all(r["saved_MB"] > 0 for r in rows)
    # moving a boundary later moves parameters into the earlier stage
    later = split_costs(model, [5, 7], shape)
    assert later[0]["params"] > rows[0]["params"] and later[1]["params"] < rows[1]["params"]
    # a batch twice as big sends and saves twice as much
    big = split_costs(model, [4, 7], (8, 3, 32, 32))
    assert big[0]["send_MB"] == pytest.approx(2 * rows[0]["send_MB"])
    for a, b in zip(big, rows):  # activations only (weights excluded): proportional to the batch
        assert a["saved_MB"] == pytest.approx(2 * b["saved_MB"], rel=0.02)  # BN's per-channel stats do not grow


# ------------------------------------------------------------------ one process per stage
@pytest.mark.timeout(240)
def test_send_recv_stages_equal_unsliced():
    for model, bounds, size in [("small", [5], None), ("resnet18", [6], 32), ("resnet50", [9], 32)]:
        r = sliced_lab.run_staged(model, bounds, batch=2, pool=True, image_size=size)
        assert r["max_output_err"] < 1e-5, model
        assert r["max_grad_rel"] < 1e-5, model
        assert r["loss"] == pytest.approx(r["ref_loss"], abs=1e-6)
        ranks = r["ranks"]
        # each rank holds only its stage's parameters; together they hold the whole model
        full = sliced.param_bytes(flatten_resnet(build_model(model)))
        assert sum(x["param_bytes"] for x in ranks) == full
        assert all(x["param_bytes"] < full for x in ranks)
        # what rank 0 sends forward equals what rank 1 receives; the gradient comes back the same size
        assert ranks[0]["sent_bytes"] == ranks[1]["recv_bytes"] > 0
        assert ranks[1]["sent_bytes"] == ranks[1]["recv_bytes"]
    # a module (not a name) is pickled to the ranks; its class count is read from the model
    torch.manual_seed(0)
    r = sliced_lab.run_staged(small_resnet(num_classes=5), [3], batch=2, pool=True)
    assert r["max_output_err"] < 1e-5 and r["max_grad_rel"] < 1e-5
    assert r["ranks"][-1]["output"].shape == (2, 5)


@pytest.mark.timeout(240)
def test_four_stages_and_world_size_mismatch():
    r = sliced_lab.run_staged("small", [3, 6, 9], batch=3, pool=True)
    assert r["max_output_err"] < 1e-5 and r["max_grad_rel"] < 1e-5
    assert [x["layers"][0] for x in r["ranks"]] == ["conv1", "maxpool", "layer3_0", "flatten"]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with pytest.raises(labkit.RankError) as e:
        labkit.launch(sliced_lab.stage_rank, world_size=2, kwargs=dict(model="small", cuts=[3, 6], x=x, y=y), pool=True,
                      echo=False)
    assert "world_size=3" in str(e.value) or "world_size=3" in "".join(e.value.tracebacks.values())


# ------------------------------------------------------------------ channel slicing
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_channel_split_layers_equal_unsplit(world_size):
    rows = sliced_lab.run_channel_checks(world_size, pool=True)
    assert {r["case"] for r in rows} == {"column conv", "row conv", "column linear", "row linear",
                                         "column->row linears", "TP conv block"}
    for r in rows:
        assert r["max_err"] < 1e-5, r
        # parameters per rank fall as 1/N (row layers keep one replicated bias; the block its last BN)
        assert 1 / world_size <= r["params/rank"] <= 1 / world_size + 0.02, r
    col = next(r for r in rows if r["case"] == "column conv")
    assert col["params/rank"] == pytest.approx(1 / world_size)
    rowc = next(r for r in rows if r["case"] == "row conv")
    assert rowc["saved/rank"] == pytest.approx(1 / world_size)  # it saves only its input slice
    # communication, counted: the TP block all-reduces its output forward and the input gradient backward
    blk = next(r for r in rows if r["case"] == "TP conv block")
    assert blk["comm_kB/rank"] == pytest.approx(blk["output_kB"] + blk["input_kB"])
    # a gathered column layer all-gathers its 1/N output slice forward; backward all-reduces the input grad
    assert col["comm_kB/rank"] == pytest.approx(col["output_kB"] / world_size + col["input_kB"])


def test_shard_layer_and_bad_input():
    conv = nn.Conv2d(6, 4, 3)
    a = sc.shard_layer(conv, "column", 1, 2)
    assert torch.equal(a.weight, conv.weight[2:4]) and torch.equal(a.bias, conv.bias[2:4])
    b = sc.shard_layer(conv, "row", 2, 3)
    assert torch.equal(b.weight, conv.weight[:, 4:6]) and b.bias is None
    with pytest.raises(ValueError, match="evenly"):
        sc.shard_layer(conv, "column", 0, 3)
    with pytest.raises(ValueError, match="mode"):
        sc.shard_layer(conv, "diagonal", 0, 2)
    with pytest.raises(ValueError, match="rank"):
        sc.shard_layer(conv, "row", 2, 2)
    with pytest.raises(TypeError, match="Conv2d or nn.Linear"):
        sc.shard_layer(nn.ReLU(), "row", 0, 2)
    with pytest.raises(ValueError, match="groups"):
        sc.shard_layer(nn.Conv2d(4, 4, 3, groups=2), "row", 0, 2)
    with pytest.raises(RuntimeError, match="labkit.launch"):
        sc.ColumnParallel(nn.Linear(4, 4), 0, 2)(torch.randn(2, 4))


def test_article_block_fails_and_patch_fails_too():
    assert sc.article_block_error().startswith("AttributeError: 'BatchNorm2d' object has no attribute 'out_channels'")
    assert "channels" in sc.article_block_error(patched=True)
    assert sc.article_block_error(patched=True).startswith("RuntimeError")


def _stub(*args):
    raise NotImplementedError


def test_row_parallel_exercise_check():
    assert sliced_lab.check_row_parallel(sc.row_parallel_reference).passed

    def bias_every_rank(x, conv, world_size):  # a classic mistake: the bias is added N times
        parts = [nn.functional.conv2d(x.chunk(world_size, 1)[r], conv.weight.chunk(world_size, 1)[r],
                                      conv.bias, conv.stride, conv.padding) for r in range(world_size)]
        return sum(parts)

    res = sliced_lab.check_row_parallel(bias_every_rank)
    assert res.attempted and not res.passed and "max abs error" in res.summary()

    def unsplit(x, conv, world_size):  # shortcut: the right value, from the whole layer
        return conv(x)

    res = sliced_lab.check_row_parallel(unsplit)
    assert res.attempted and not res.passed
    assert "unsplit layer" in res.summary() and "hint:" in res.summary()

    def whole_weight_split_work(x, conv, world_size):  # world_size "partials", but each uses every input channel
        out = sum(nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding) / world_size
                  for _ in range(world_size))
        return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)

    res = sliced_lab.check_row_parallel(whole_weight_split_work)
    assert not res.passed and "all" in res.summary() and "input channels" in res.summary()

    def one_partial(x, conv, world_size):  # slices the input, but runs a single partial and scales it
        k = x.shape[1] // world_size
        out = nn.functional.conv2d(x[:, :k], conv.weight[:, :k], None, conv.stride, conv.padding) * world_size
        return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)

    res = sliced_lab.check_row_parallel(one_partial)
    assert not res.passed and "partial convolutions" in res.summary()

    res = sliced_lab.check_row_parallel(_stub)
    assert not res.attempted and not res.passed and "not attempted" in res.summary()


@pytest.mark.slow
def test_stage_params_exercise_check():
    def right(model, cuts):
        return [sum(p.numel() for p in s.parameters()) for s in split_stages(model, cuts)]

    def off_by_one(model, cuts):
        return right(model, [b + 1 for b in cuts])

    answers = {}
    for name, cuts in (("small", (4,)), ("small", (2, 5, 8)), ("resnet18", (9,))):  # copied from a first run
        model = build_model(name)
        answers[(len(flatten_resnet(model)), cuts)] = right(model, list(cuts))

    def hard_coded(model, cuts):
        return answers.get((len(flatten_resnet(model)), tuple(cuts)), [0] * (len(cuts) + 1))

    def via_split_costs(model, cuts):  # shortcut: the library's own cost table (runs the model)
        return [r["params"] for r in split_costs(model, cuts, (2, 3, 32, 32))]

    assert sliced_lab.check_stage_params(right).passed
    res = sliced_lab.check_stage_params(off_by_one)
    assert not res.passed and "wrong count" in res.summary()
    res = sliced_lab.check_stage_params(hard_coded)
    assert not res.passed and "(drawn now)" in "".join(c.name for c in res.failed_cases)
    assert all("drawn now" in c.name for c in res.failed_cases) and "add up to" in res.summary()
    res = sliced_lab.check_stage_params(via_split_costs)
    assert not res.passed and "split_costs" in res.summary() and "hint:" in res.summary()
    assert not sliced_lab.check_stage_params(_stub).attempted
    # the hint points at the method, it does not print the answer
    assert "numel" in res.hint and "return" not in res.hint


@pytest.mark.timeout(240)
def test_tour():
    rows = sliced_lab.tour()
    assert len(rows) == 4
    for r in rows:
        assert set(r) == {"lab", "check", "ok", "detail"}
        assert r["ok"], r


def test_old_names_still_work_and_warn():
    """Issue 30's renames keep working one release, each with a DeprecationWarning naming the new spelling."""
    with pytest.warns(DeprecationWarning, match="unsliced_step"):
        assert sliced.reference_step is sliced.unsliced_step
    for name in ("stage_rank", "replica_rank", "channel_rank", "run_staged", "run_replicas", "run_channel_checks"):
        with pytest.warns(DeprecationWarning, match=rf"labkit.sliced.lab.{name}"):
            assert getattr(sliced, name) is getattr(sliced_lab, name)
        assert name not in sliced.__all__
    conv = nn.Conv2d(6, 4, 3)
    with pytest.warns(DeprecationWarning, match=r"world=\) is now world_size="):
        old = sc.shard_layer(conv, "column", 1, world=2)
    assert torch.equal(old.weight, sc.shard_layer(conv, "column", 1, world_size=2).weight)
    with pytest.warns(DeprecationWarning, match="world_size"):
        layer = sc.ColumnParallel(nn.Linear(4, 4), 0, world=2)
    assert layer.world_size == 2
    with pytest.warns(DeprecationWarning, match="world_size"):
        assert sc.row_parallel_reference(torch.randn(2, 4, 5, 5), nn.Conv2d(4, 2, 3), world=2).shape == (2, 2, 3, 3)
