"""Lab 12's mixture of experts: routing, capacity and the balance loss by hand; expert parallelism over 2 and 4
gloo ranks equal to one process when no token is dropped (outputs and gradients, float64), drops counted."""
from __future__ import annotations

import pytest
import torch

import labkit
from labkit._validate import ArgumentError
from labkit.context_expert import ExpertParallelMoE, MoE, balance_loss, capacity, route

WIDTH, FFN, EXPERTS = 8, 16, 4


def test_routing_capacity_and_balance_by_hand():
    # 4 tokens, 2 experts, all prefer expert 0: with k = 1 and capacity factor 1, C = 2 and tokens 2, 3 are dropped
    logits = torch.tensor([[2.0, 0.0], [3.0, 0.0], [1.0, 0.0], [4.0, 0.0]])
    r = route(logits, 1, 1.0)
    assert capacity(4, 2, 1, 1.0) == 2
    assert r.experts.reshape(-1).tolist() == [0, 0, 0, 0]
    assert r.kept.reshape(-1).tolist() == [True, True, False, False] and r.dropped == 2
    # k = 2: every first choice (expert 0) before any second choice (expert 1); C = 4 each: nothing dropped
    r2 = route(logits, 2, 1.0)
    assert r2.dropped == 0 and torch.allclose(r2.weights.sum(-1), torch.ones(4, dtype=r2.weights.dtype))
    # the balance loss is 1 when routing and probabilities are uniform, 2 when everything goes to one of 2 experts
    uniform = route(torch.zeros(4, 2), 1, None)
    uniform.experts = torch.tensor([[0], [1], [0], [1]])
    assert balance_loss(uniform, 2).item() == pytest.approx(1.0)
    skew = route(torch.tensor([[50.0, 0.0]] * 4), 1, None)
    assert balance_loss(skew, 2).item() == pytest.approx(2.0, rel=1e-6)


def test_moe_is_the_weighted_sum_of_its_chosen_experts():
    torch.manual_seed(0)
    moe = MoE(WIDTH, FFN, EXPERTS, k=2, capacity_factor=None, dtype=torch.float64)
    x = torch.randn(5, WIDTH, dtype=torch.float64)
    y = moe(x)
    r = moe.last
    want = torch.stack([sum(r.weights[t, j] * moe.expert(int(r.experts[t, j]), x[t:t + 1])[0] for j in range(2))
                        for t in range(5)])
    assert torch.allclose(y, want, atol=1e-12)
    with pytest.raises(ArgumentError, match="k must be an int in \\[1, 4\\], got 5"):
        MoE(WIDTH, FFN, EXPERTS, k=5)


def _ep_rank(ctx, k=1, capacity_factor=None, tokens=12):
    torch.manual_seed(0)
    moe = MoE(WIDTH, FFN, EXPERTS, k=k, capacity_factor=capacity_factor, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens * ctx.world_size, WIDTH, generator=g, dtype=torch.float64)
    w = torch.randn(tokens * ctx.world_size, WIDTH, generator=g, dtype=torch.float64)
    mine = slice(ctx.rank * tokens, (ctx.rank + 1) * tokens)
    ep = ExpertParallelMoE(moe, group=None)
    y = ep(x[mine])
    (y * w[mine]).sum().backward()
    router_grad = ep.router.weight.grad.clone()
    torch.distributed.all_reduce(router_grad)                   # the replicated router: gradients summed
    out = {"y": y.detach(), "dropped": ep.last.dropped, "sent": ep.sent, "first": ep.first,
           "w1_grad": ep.w1.grad.clone(), "router_grad": router_grad}
    # this rank's tokens alone through the whole MoE in one process: the same routing and capacity
    alone = MoE(WIDTH, FFN, EXPERTS, k=k, capacity_factor=capacity_factor, dtype=torch.float64)
    alone.load_state_dict(moe.state_dict())
    alone(x[mine])
    out["dropped_alone"] = alone.last.dropped
    r = ep.last
    kept_owner = (r.experts[r.kept] // ep.per_rank)
    out["rows_out"] = int((kept_owner != ctx.rank).sum())
    return out


@pytest.mark.parametrize("n,k", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_expert_parallel_equals_one_process_when_nothing_is_dropped(n, k):
    res = labkit.launch(_ep_rank, world_size=n, kwargs=dict(k=k), pool=True, echo=False, timeout=120)
    torch.manual_seed(0)
    ref = MoE(WIDTH, FFN, EXPERTS, k=k, capacity_factor=None, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12 * n, WIDTH, generator=g, dtype=torch.float64)
    w = torch.randn(12 * n, WIDTH, generator=g, dtype=torch.float64)
    y = ref(x)
    (y * w).sum().backward()
    per = EXPERTS // n
    for r, got in enumerate(res):
        assert (got["y"] - y[12 * r:12 * (r + 1)].detach()).abs().max() < 1e-12
        assert (got["w1_grad"] - ref.w1.grad[got["first"]:got["first"] + per]).abs().max() < 1e-12
        assert (got["router_grad"] - ref.router.weight.grad).abs().max() < 1e-12
        assert got["dropped"] == 0


def test_drops_are_counted_per_rank_and_bytes_match_the_formula():
    res = labkit.launch(_ep_rank, world_size=2, kwargs=dict(k=2, capacity_factor=0.5), pool=True, echo=False,
                        timeout=120)
    assert sum(r["dropped"] for r in res) > 0
    for r in res:
        assert r["dropped"] == r["dropped_alone"]   # capacity is per rank: as this rank's tokens alone
    # dispatch sends this rank's rows for the other rank's experts; combine sends back what it received
    total_out = [r["rows_out"] for r in res]
    for i, r in enumerate(res):
        assert r["sent"] == (total_out[i] + total_out[1 - i]) * WIDTH * 8


def _uneven_rank(ctx):
    moe = MoE(WIDTH, FFN, 4, k=1, dtype=torch.float64)
    try:
        ExpertParallelMoE(moe)
    except ArgumentError as e:
        return str(e)
    return "no error"


def test_bad_input_names_the_argument_and_what_to_pass():
    with pytest.raises(ArgumentError, match="capacity_factor must be .*got 0"):
        MoE(WIDTH, FFN, EXPERTS, capacity_factor=0)
    with pytest.raises(ArgumentError, match="capacity_factor must be .*got -1"):
        MoE(WIDTH, FFN, EXPERTS, capacity_factor=-1.0)
    with pytest.raises(ArgumentError, match="k=3 .*n_experts=2"):
        route(torch.zeros(5, 2), 3, None)
    with pytest.raises(ArgumentError, match="capacity_factor"):
        route(torch.zeros(5, 2), 1, 0.0)
    # 4 experts do not split over 3 ranks
    msgs = labkit.launch(_uneven_rank, world_size=3, pool=True, echo=False, timeout=120)
    assert all("n_experts=4 does not split over ep=3 ranks" in m for m in msgs), msgs
