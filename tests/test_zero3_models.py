"""Zero3 on models people bring, against torch's FSDP2 (``fully_shard``) on the same model and ranks.

A GPT with its output layer tied to the token embedding (lab 11's TinyGPT, tied), in float64 and in FSDP2-style
mixed precision; torchvision's ResNet-18 with a frozen backbone (BatchNorm buffers, frozen parameters inside
and outside the units); prefetch on and off; full and sharded checkpoints, the sharded one resumed on another
number of ranks.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import labkit
from labkit import zero
from labkit._validate import ArgumentError
from labkit.capstone.model import Config, build, lm_loss, sort_batch

CFG = Config(layers=3, width=32, heads=4, vocab=16, seq=16)
STEPS = 3


def tied_gpt(dtype=torch.float64) -> nn.Module:
    model = build(CFG, seed=0, dtype=dtype)
    model.head.weight = model.tok.weight  # GPT-2's tie: one tensor, used first and last
    return model


def _batches(steps: int, rows: int = 12):  # 12 rows: an equal slice on 2 and on 3 ranks
    return [sort_batch(rows, CFG, seed=s) for s in range(steps)]


def _opt(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)


def _train(model, opt, data, rank=0, world=1) -> list[float]:
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = lm_loss(model(x[rank::world]), y[rank::world]).float()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _diff(a, b) -> float:
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b, strict=True))


def _gpt_runs(ctx) -> dict:
    r, n, out = ctx.rank, ctx.world_size, {}
    data = _batches(STEPS)
    single = tied_gpt()
    out["single_losses"] = _train(single, _opt(single.parameters()), data)
    for mp in (False, True):
        dtype = torch.float32 if mp else torch.float64
        policy = zero.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp else None
        model = tied_gpt(dtype)
        z3 = zero.Zero3(model, units=list(model.blocks), mp_policy=policy)
        lz = _train(z3, _opt(z3.parameters()), data, r, n)
        f = tied_gpt(dtype)
        zero.torch_fsdp2(f, units=list(f.blocks), mixed_precision=mp)
        lf = _train(f, _opt(f.parameters()), data, r, n)
        key = "bf16" if mp else "f64"
        out[key] = {"vs_fsdp2": _diff(z3.full_parameters(), zero.fsdp2_full_parameters(f)),
                    "losses": (lz, lf), "traffic": z3.traffic.as_dict(),
                    "groups": [(g.unit, g.trainable, g.layout.padded) for g in z3._groups]}
        if not mp:
            out[key]["vs_single"] = _diff(z3.full_parameters(), single.parameters())
            out[key]["n_params"] = len(z3.full_parameters())
            # the full state dict: the unwrapped model's keys (both names of the tied weight) and values
            sd, want = z3.state_dict(), single.state_dict()
            out["sd_keys"] = (list(sd), list(want))
            out["sd_diff"] = max(float((sd[k] - want[k]).abs().max()) for k in want)
            fresh = tied_gpt()
            z_new = zero.Zero3(fresh, units=list(fresh.blocks))
            z_new.load_state_dict(single.state_dict())
            out["loaded_full"] = _diff(z_new.full_parameters(), single.parameters())
    # prefetch off gives the same numbers; the timeline says which gathers were issued before they were needed
    fulls, lines = {}, {}
    for prefetch in (True, False):
        model = tied_gpt()
        z3 = zero.Zero3(model, units=list(model.blocks), prefetch=prefetch, record=True)
        _train(z3, _opt(z3.parameters()), data, r, n)
        fulls[prefetch] = z3.full_parameters()
        lines[prefetch] = [(e["phase"], e["issued"] < e["waited"]) for e in z3.timeline if e["kind"] == "gather"]
        out[f"held_after_{prefetch}"] = (z3.held_numel(), sum(g.shard.numel() for g in z3._groups))
    # default units: the top-level children with parameters, a ModuleList's elements instead of the list
    model = tied_gpt()
    z3 = zero.Zero3(model)
    _train(z3, _opt(z3.parameters()), data, r, n)
    out["default_units"] = (_diff(z3.full_parameters(), single.parameters()),
                            [type(u).__name__ for u in z3.units])
    out["prefetch_equal"] = all(torch.equal(a, b) for a, b in zip(fulls[True], fulls[False]))
    # a forward whose graph is dropped without a backward (a validation loss with gradients on) leaves no count of
    # saved views behind, so the next backward still frees each re-gathered unit after its last use
    import gc

    x, y = data[0]
    lm_loss(z3(x[r::n]), y[r::n])
    gc.collect()
    out["recipes_after_dropped_graph"] = sum(z3._recipes.values())
    most = []
    unpack = z3._unpack

    def watched(packed):
        got = unpack(packed)
        most.append(len(z3._regathered) + len(z3._prefetched))
        return got

    z3._unpack = watched
    _train(z3, _opt(z3.parameters()), data[:1], r, n)
    out["most_gathered_in_backward"] = max(most)
    out["lines"] = lines
    return out


def _resnet_runs(ctx) -> dict:
    """torchvision's ResNet-18, backbone frozen (layer4 and fc trained), float64, 2 steps: Zero3 against FSDP2."""
    from torchvision.models import resnet18

    r, n = ctx.rank, ctx.world_size

    def make():
        torch.manual_seed(0)
        m = resnet18(num_classes=10).double()
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith(("layer4", "fc")))
        return m

    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4 * n, 3, 32, 32, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (4 * n,), generator=g)) for _ in range(2)]

    def train(model, opt):
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[r::n]), y[r::n]).backward()
            opt.step()

    def units(m):
        return [m.layer1, m.layer2, m.layer3, m.layer4, m.fc]

    model = make()
    z3 = zero.Zero3(model, units=units(model))  # conv1 and bn1: in no unit, the root's
    train(z3, torch.optim.SGD(z3.parameters(), lr=0.1, momentum=0.9))
    f = make()
    zero.torch_fsdp2(f, units=units(f))
    train(f, torch.optim.SGD([p for p in f.parameters() if p.requires_grad], lr=0.1, momentum=0.9))
    bz = dict(model.named_buffers())
    bf = dict(f.named_buffers())
    P = sum(p.numel() for p in make().parameters())
    trained = sum(p.numel() for name, p in make().named_parameters() if name.startswith(("layer4", "fc")))
    return {"vs_fsdp2": _diff(z3.full_parameters(), zero.fsdp2_full_parameters(f)),
            "buffers": max(float((bz[k].double() - bf[k].double()).abs().max()) for k in bf),
            "held": z3.held_numel(), "P": P, "trained": trained,
            "stepped": sum(s.numel() for s in z3.parameters()),
            "frozen_moved": _diff(z3.full_parameters()[:3], list(make().parameters())[:3])}


def _bad(ctx) -> dict:
    out = {}

    def catch(name, fn):
        try:
            fn()
            out[name] = None
        except ArgumentError as e:
            out[name] = str(e)

    catch("policy", lambda: zero.Zero3(tied_gpt(), mp_policy="bf16"))
    catch("policy_dtype", lambda: zero.Zero3(tied_gpt(), mp_policy=zero.MixedPrecision(param_dtype=torch.int8)))
    model = tied_gpt()
    z3 = zero.Zero3(model, units=list(model.blocks))
    opt = _opt(z3.parameters())
    mine = z3.sharded_state_dict(opt)
    catch("one_rank_only", lambda: z3.load_sharded_state_dict([mine], opt))
    catch("other_optimizer", lambda: z3.sharded_state_dict(_opt(tied_gpt().parameters())))
    bad = tied_gpt().state_dict()
    bad["tok.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    catch("shape", lambda: z3.load_state_dict(bad))
    catch("sharded_as_full", lambda: z3.load_state_dict(mine))
    m = tied_gpt()
    catch("container_unit", lambda: zero.Zero3(m, units=[m.blocks]))
    m = tied_gpt()
    zero.Zero3(m, units=list(m.blocks))
    x, _ = _batches(1)[0]
    catch("model_not_wrapper", lambda: m(x))  # the unwrapped model, whose blocks hold no weights now
    catch("block_alone", lambda: m.blocks[1].qkv(torch.zeros(2, CFG.width, dtype=torch.float64)))
    return out


def _everything(ctx, resume=None) -> dict:
    out = {}
    if resume is None:
        out["gpt"] = _gpt_runs(ctx)
        out["resnet"] = _resnet_runs(ctx)
        out["bad"] = _bad(ctx)
        # the checkpoint the 3-rank run resumes from: 2 steps here
        model = tied_gpt()
        z3 = zero.Zero3(model, units=list(model.blocks))
        opt = _opt(z3.parameters())
        _train(z3, opt, _batches(2), ctx.rank, ctx.world_size)
        out["saved"] = z3.sharded_state_dict(opt)
    else:
        model = tied_gpt()
        z3 = zero.Zero3(model, units=list(model.blocks))
        opt = _opt(z3.parameters())
        z3.load_sharded_state_dict(resume, opt)
        _train(z3, opt, _batches(4)[2:], ctx.rank, ctx.world_size)
        out["resumed"] = [t.clone() for t in z3.full_parameters()]
        out["state_numel"] = sum(v.numel() for st in opt.state.values() for k, v in st.items() if k != "step")
    return out


_CACHE: dict = {}


def _run(n: int, resume=None):
    if n not in _CACHE:
        _CACHE[n] = labkit.launch(_everything, world_size=n, kwargs=dict(resume=resume), pool=True, echo=False,
                                  timeout=300)
    return _CACHE[n]


def test_a_tied_gpt_equals_fsdp2_and_one_process():
    for r in _run(2):
        g = r["gpt"]
        assert g["f64"]["vs_fsdp2"] == 0.0          # the same sums in the same order: bit for bit
        assert g["f64"]["vs_single"] < 1e-9, g["f64"]["vs_single"]
        assert g["f64"]["losses"][0] == g["f64"]["losses"][1]
        assert g["f64"]["n_params"] == len(list(tied_gpt().parameters()))  # the tied weight once
        # the tied weight is the root's (with the position table and the last LayerNorm): one buffer gathered
        # once per forward, its gradient (both uses summed by autograd) reduce-scattered once per step
        root = [x for x in g["f64"]["groups"] if x[0] is None]
        assert len(root) == 1 and root[0][1]
        trained_groups = sum(1 for x in g["f64"]["groups"] if x[1])
        assert g["f64"]["traffic"]["calls"]["reduce_scatter"] == STEPS * trained_groups


def test_mixed_precision_equals_fsdp2s_policy():
    for r in _run(2):
        b = r["gpt"]["bf16"]
        assert b["vs_fsdp2"] == 0.0, b["vs_fsdp2"]
        assert b["losses"][0] == b["losses"][1]
        # bf16 gathers: 2 bytes a value, against float64's 8
        psi = sum(padded for _, _, padded in b["groups"])
        f64 = r["gpt"]["f64"]["traffic"]["volume_by_label"]["forward"]
        assert b["traffic"]["volume_by_label"]["forward"] == STEPS * psi * 2 == f64 // 4
        # and it trains: the bf16 run stays near float64's losses (the same data, the same steps)
        assert all(abs(a - c) / c < 0.05 for a, c in zip(b["losses"][0], r["gpt"]["single_losses"]))


def test_prefetch_changes_nothing_but_when_gathers_are_issued():
    for r in _run(2):
        g = r["gpt"]
        assert g["prefetch_equal"]
        assert g["default_units"][0] < 1e-9
        assert g["default_units"][1] == ["Embedding", *["Block"] * CFG.layers, "LayerNorm", "Linear"]
        assert g["recipes_after_dropped_graph"] == 0
        assert g["most_gathered_in_backward"] <= 2  # the unit in use and (with prefetch) the next: never all
        on, off = g["lines"][True], g["lines"][False]
        assert not any(early for _, early in off)  # without prefetch every gather is issued when it is needed
        # with it, after the first forward (which learns the order), gathers are issued ahead, in both directions
        assert any(early for phase, early in on if phase == "forward")
        assert any(early for phase, early in on if phase == "backward")
        for key in ("held_after_True", "held_after_False"):
            assert g[key][0] == g[key][1]  # nothing left gathered or in flight after a step


def test_frozen_backbone_resnet18_equals_fsdp2():
    for r in _run(2):
        z = r["resnet"]
        assert z["vs_fsdp2"] == 0.0 and z["buffers"] == 0.0, z
        assert z["frozen_moved"] == 0.0  # conv1, bn1 (frozen, the root's) never change
        assert z["stepped"] == pytest.approx(z["trained"] / 2, abs=8)       # only trained values are stepped
        assert z["held"] == pytest.approx(z["P"] / 2, abs=64)               # and every value is held once per 2


def test_state_dicts_full_and_sharded_on_another_world_size():
    two = _run(2)
    keys, want = two[0]["gpt"]["sd_keys"]
    assert keys == want and "head.weight" in keys and "tok.weight" in keys
    assert two[0]["gpt"]["sd_diff"] < 1e-9 and two[0]["gpt"]["loaded_full"] == 0.0
    # saved by 2 ranks after 2 steps, resumed on 3 for 2 more: as one process training 4 steps
    three = _run(3, resume=[r["saved"] for r in two])
    single = tied_gpt()
    _train(single, _opt(single.parameters()), _batches(4))
    n_state = 2 * sum(math.ceil(g[2] / 3) for g in two[0]["gpt"]["f64"]["groups"] if g[1])
    for r in three:
        assert _diff(r["resumed"], single.parameters()) < 1e-9
        assert r["state_numel"] == n_state  # Adam's two moments of this rank's third only


def test_bad_input_is_named():
    b = _run(2)[0]["bad"]
    assert "mp_policy must be a labkit.zero.MixedPrecision" in b["policy"]
    assert "mp_policy.param_dtype=torch.int8 is not a floating dtype" in b["policy_dtype"]
    assert "ranks [0] of a run of 2" in b["one_rank_only"]
    assert "build it from zero3.parameters()" in b["other_optimizer"]
    assert "state_dict['tok.weight'] has shape (3, 3)" in b["shape"]
    assert "load_sharded_state_dict" in b["sharded_as_full"]
    assert "units[0] is a ModuleList, which is never called" in b["container_unit"]
    assert "the model (TinyGPT) ran while the root (the model) was not gathered" in b["model_not_wrapper"]
    assert "Call the wrapper, not the model" in b["model_not_wrapper"]
    assert "model.blocks.1.qkv (Linear) ran while units[1] (Block) was not gathered" in b["block_alone"]
