"""Lab 10's ZeRO-1/2 take what torch optimisers take: frozen parameters, tied weights, parameter groups with their
own options, add_param_group. Each equals the unsharded optimiser in one process and torch's own
ZeroRedundancyOptimizer (under DDP) over 10 AdamW steps with weight decay, on 2 and 3 ranks, in float64 and float32.

One launch per world size runs every case; the tests read its results."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import labkit
from labkit import zero
from labkit._validate import ArgumentError
from labkit.zero.lab import batches, mlp
from labkit.zero.optim import param_groups_of

STEPS = 10
TOL = {"float64": 1e-12, "float32": 1e-6}   # relative to the largest parameter
METHODS = {"zero1": zero.Zero1, "naive": zero.NaiveZero1, "zero2": zero.Zero2}


class Tied(nn.Module):
    """A tiny language model whose output layer is its token embedding (GPT's tied weights)."""

    def __init__(self, dtype, vocab=7, width=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, width, dtype=dtype)
        self.mix = nn.Linear(width, width, dtype=dtype)
        self.head = nn.Linear(width, vocab, bias=False, dtype=dtype)
        with torch.no_grad():
            for p in (self.embed.weight, self.mix.weight, self.mix.bias):
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def _case(name: str, dtype: str):
    """(model, data, groups of the model's parameters) for one case; ``groups(model)`` is what an optimiser gets."""
    dt = getattr(torch, dtype)
    if name == "tied":
        g = torch.Generator().manual_seed(1)
        data = [(torch.randint(0, 7, (12,), generator=g), torch.randint(0, 7, (12,), generator=g))
                for _ in range(STEPS)]
        return Tied(dt), data, lambda m: m.parameters()
    data = batches(STEPS, dtype=dtype)
    model = mlp(0, dtype)
    if name == "frozen":   # a frozen first layer (a fine-tune's backbone) and a frozen last bias
        model[0].weight.requires_grad_(False)
        model[4].bias.requires_grad_(False)
        return model, data, lambda m: m.parameters()
    # "groups": weights decayed at one learning rate, biases not decayed at another
    return model, data, lambda m: [{"params": [p for n, p in m.named_parameters() if n.endswith("weight")]},
                                   {"params": [p for n, p in m.named_parameters() if n.endswith("bias")],
                                    "lr": 0.02, "weight_decay": 0.0}]


OPT = dict(lr=0.01, weight_decay=0.1)


def _train(model, data, opt, ctx=None, ddp=None):
    net = ddp or model
    for x, y in data:
        if ctx is not None:
            x, y = x[ctx.rank::ctx.world_size], y[ctx.rank::ctx.world_size]
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return model


def _rel(model, ref) -> float:
    a = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    b = torch.cat([p.detach().reshape(-1) for p in ref.parameters()]).double()
    return float((a - b).abs().max() / b.abs().max())


def _groups_rank(ctx) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for case in ("frozen", "tied", "groups"):
        for dtype in ("float64", "float32"):
            ref, data, groups = _case(case, dtype)
            plain = torch.optim.AdamW(groups(ref), **OPT)
            _train(ref, data, plain)
            row = {}
            for name, cls in METHODS.items():
                model = _case(case, dtype)[0]
                opt = cls(groups(model), torch.optim.AdamW, **OPT)
                _train(model, data, opt, ctx)
                row[name] = _rel(model, ref)
                sd = opt.state_dict()
                if ctx.rank == 0:   # the plain optimiser's state dict, frozen parameters without state
                    want = plain.state_dict()
                    same = sd["param_groups"] == want["param_groups"] and sd["state"].keys() == want["state"].keys()
                    diffs = [float((sd["state"][i][k] - v).abs().max()) for i, st in want["state"].items()
                             for k, v in st.items()] if same else [float("inf")]
                    row[f"{name}_state"] = (same, max(diffs))
                if case == "frozen":
                    row[f"{name}_frozen_untouched"] = bool(torch.equal(model[0].weight, mlp(0, dtype)[0].weight))
            model = _case(case, dtype)[0]
            torch_zero = ZeroRedundancyOptimizer(groups(model), optimizer_class=torch.optim.AdamW, **OPT)
            _train(model, data, torch_zero, ctx, ddp=DDP(model))
            row["torch"] = _rel(model, ref)
            out[(case, dtype)] = row
    # add_param_group: the biases join after 3 steps, as they would in a plain AdamW
    ref, data, _ = _case("groups", "float64")
    weights = lambda m: [p for n, p in m.named_parameters() if n.endswith("weight")]  # noqa: E731
    biases = lambda m: [p for n, p in m.named_parameters() if n.endswith("bias")]  # noqa: E731
    plain = torch.optim.AdamW(weights(ref), **OPT)
    _train(ref, data[:3], plain)
    plain.add_param_group({"params": biases(ref), "lr": 0.02})
    _train(ref, data[3:], plain)
    for name, cls in METHODS.items():
        model = _case("groups", "float64")[0]
        opt = cls(weights(model), torch.optim.AdamW, **OPT)
        _train(model, data[:3], opt, ctx)
        opt.add_param_group({"params": biases(model), "lr": 0.02})
        _train(model, data[3:], opt, ctx)
        out[("added", name)] = (_rel(model, ref), [g["lr"] for g in opt.param_groups])
    # a plain optimiser's state dict (any N saved it) loads into a sharded one with groups, which continues
    ref, data, groups = _case("groups", "float64")
    plain = torch.optim.AdamW(groups(ref), **OPT)
    _train(ref, data[:4], plain)
    model = _case("groups", "float64")[0]
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            p.copy_(q)
    opt = zero.Zero2(groups(model), torch.optim.AdamW, **OPT)
    opt.load_state_dict(plain.state_dict())
    _train(ref, data[4:], plain)
    _train(model, data[4:], opt, ctx)
    out["loaded"] = _rel(model, ref)
    # bad input, on every rank at once
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    for key, make in (("twice", lambda: zero.Zero1([{"params": [w]}, {"params": [w], "lr": 0.1}], lr=0.1)),
                      ("no_params", lambda: zero.Zero1([{"lr": 0.1}], lr=0.1)),
                      ("all_frozen", lambda: zero.Zero1([nn.Parameter(torch.ones(3), requires_grad=False)]))):
        try:
            make()
            out[key] = "accepted"
        except ArgumentError as e:
            out[key] = str(e)
    return out


_CACHE: dict = {}


def _run(n: int) -> list[dict]:
    if n not in _CACHE:
        _CACHE[n] = labkit.launch(_groups_rank, world_size=n, pool=True, echo=False, timeout=300)
    return _CACHE[n]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("case", ["frozen", "tied", "groups"])
def test_zero1_and_zero2_equal_plain_adamw_and_torchs_zero(n, case):
    for r in _run(n):
        for dtype in ("float64", "float32"):
            row = r[(case, dtype)]
            for name in (*METHODS, "torch"):
                assert row[name] < TOL[dtype], (case, dtype, name, row[name])
            if case == "frozen":
                assert all(row[f"{m}_frozen_untouched"] for m in METHODS)
    for dtype in ("float64", "float32"):   # consolidated on rank 0: the plain optimiser's state dict
        row = _run(n)[0][(case, dtype)]
        for name in METHODS:
            same, diff = row[f"{name}_state"]
            assert same and diff < TOL[dtype], (name, row)


@pytest.mark.parametrize("n", [2, 3])
def test_add_param_group_and_loading_a_plain_state_with_groups(n):
    for r in _run(n):
        for name in METHODS:
            err, lrs = r[("added", name)]
            assert err < 1e-12 and lrs == [0.01, 0.02], (name, err, lrs)
        assert r["loaded"] < 1e-12


def test_bad_parameter_groups_say_what_to_pass():
    for r in _run(2):
        assert "also in parameter group 0" in r["twice"]
        assert "has no 'params'" in r["no_params"]
        assert "every parameter is frozen" in r["all_frozen"]


def test_param_groups_of_reads_what_torch_reads():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    assert [len(g["params"]) for g in param_groups_of([a, b, a])] == [2]       # a tied weight kept once
    groups = param_groups_of([{"params": a, "lr": 0.1}, {"params": [b]}])      # a lone tensor is a group of one
    assert groups[0]["lr"] == 0.1 and groups[0]["params"] == [a] and groups[1]["params"] == [b]
    with pytest.raises(ArgumentError, match="mixes tensors and dicts"):
        param_groups_of([a, {"params": [b]}])
    with pytest.raises(ArgumentError, match="empty"):
        param_groups_of([])
