"""Lab 12's rank functions, exercise checks and tour.

Rank functions (``labkit.launch(fn, world_size=N, ...)``): :func:`ring_rank` (ring attention on this launch's
ranks against one process), :func:`gpt_rank` (TinyGPT with its sequence split), :func:`moe_rank` (the experts
split over the ranks, against one process). Exercises: :func:`check_merge` (the online-softmax merge of two partial
attention results) and :func:`check_split_sizes` (how many rows a rank sends to each rank in expert parallelism's
dispatch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import CheckResult, attempted, expect_close, expect_equal, not_attempted, refusing, rng_for, run_cases
from ..tour import lab_name, run_check
from . import ring
from .gpt import all_reduce_grads, forward_cp, loss_cp
from .measure import balance_run
from .moe import ExpertParallelMoE, MoE

__all__ = ["ring_rank", "gpt_rank", "moe_rank", "balance_run", "check_merge", "check_split_sizes", "tour"]


def _qkv(batch=2, heads=2, seq=16, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, head_dim, generator=g, dtype=torch.float64) for _ in range(4)]


def ring_rank(ctx, layout: str = "zigzag", seq: int = 16) -> dict:
    """Ring attention on this rank's share of a fixed q, k, v: ``{"out", "grads", "sent"}`` of this rank, and the
    largest difference from one process's causal attention (``out_err``, ``grad_err``) on this rank's tokens."""
    q, k, v, dout = (t.to(ctx.device) for t in _qkv(seq=seq))
    cp, r = ctx.world_size, ctx.rank
    mine = [ring.shard(t, cp, r, layout).clone().requires_grad_(True) for t in (q, k, v)]
    stats: dict = {}
    out = ring.ring_attention(*mine, layout=layout, stats=stats)
    out.backward(ring.shard(dout, cp, r, layout))
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*full, is_causal=True)
    want.backward(dout)
    return {"out_err": float((out - ring.shard(want, cp, r, layout)).abs().max()),
            "grad_err": max(float((m.grad - ring.shard(f.grad, cp, r, layout)).abs().max())
                            for m, f in zip(mine, full)),
            "sent": stats, "formula": ring.ring_bytes(q.shape[0], q.shape[1], seq, q.shape[3], cp, 8)}


def gpt_rank(ctx, layout: str = "zigzag", layers: int = 2) -> dict:
    """One step of lab 11's TinyGPT with the sequence split: this rank's loss share summed over the ranks, and the
    largest gradient difference from one process on the whole sequence."""
    from ..capstone.model import Config, build, lm_loss, sort_batch

    cfg = Config(layers=layers, width=32, heads=4, vocab=16, seq=16)
    model, ref = build(cfg, seed=0).to(ctx.device), build(cfg, seed=0).to(ctx.device)
    ids, targets = (t.to(ctx.device) for t in sort_batch(4, cfg, seed=1))
    cp, r = ctx.world_size, ctx.rank
    loss = loss_cp(forward_cp(model, ring.shard(ids, cp, r, layout, dim=1), layout),
                   ring.shard(targets, cp, r, layout, dim=1), cp)
    loss.backward()
    all_reduce_grads(model)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    want = lm_loss(ref(ids), targets)
    want.backward()
    return {"loss": total.item(), "loss_err": abs(total.item() - want.item()),
            "grad_err": max(float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(),
                                                                                  ref.parameters()))}


def moe_rank(ctx, k: int = 1, capacity_factor: float | None = None, experts: int = 4, tokens: int = 12) -> dict:
    """The experts split over this launch's ranks, each rank with its own ``tokens``: this rank's output and expert
    gradients against the same MoE in one process on every rank's tokens, the assignments it dropped and the bytes
    it sent."""
    torch.manual_seed(0)
    moe = MoE(8, 16, experts, k=k, capacity_factor=capacity_factor, dtype=torch.float64).to(ctx.device)
    torch.manual_seed(0)
    ref = MoE(8, 16, experts, k=k, capacity_factor=None, dtype=torch.float64).to(ctx.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens * ctx.world_size, 8, generator=g, dtype=torch.float64).to(ctx.device)
    w = torch.randn(tokens * ctx.world_size, 8, generator=g, dtype=torch.float64).to(ctx.device)
    mine = slice(ctx.rank * tokens, (ctx.rank + 1) * tokens)
    ep = ExpertParallelMoE(moe)
    y = ep(x[mine])
    (y * w[mine]).sum().backward()
    want = ref(x)
    (want * w).sum().backward()
    lo = ep.first
    return {"out_err": float((y - want[mine]).abs().max()),
            "grad_err": float((ep.w1.grad - ref.w1.grad[lo:lo + ep.per_rank]).abs().max()),
            "dropped": ep.last.dropped, "sent": ep.sent,
            "tokens_per_expert": ep.last.tokens_per_expert(experts).tolist()}


# ----------------------------------------------------------------------------- exercises
def check_merge(fn, seed: int | None = None) -> CheckResult:
    """Exercise: ``fn(o1, lse1, o2, lse2) -> (o, lse)`` merges two partial attention results over disjoint keys.
    Cases: keys cut at random places, each half's result from :func:`ring.block`, the merge against attention over
    all the keys at once; a row that sees no key of one half (``lse = -inf``); the merge called in either order."""
    title = "the online-softmax merge"
    t = torch.zeros(1, 1, 1, 2)
    if not attempted(fn, t, torch.zeros(1, 1, 1), t, torch.zeros(1, 1, 1)):
        return not_attempted(title, "write merge(o1, lse1, o2, lse2) -> (o, lse)")
    rng = rng_for(seed)

    def case(seq, cut, causal):
        def run():
            q, k, v, _ = _qkv(1, 2, seq, 4, seed=rng.randrange(10**6))
            pos = torch.arange(seq)
            pq = pos if causal else torch.full((seq,), seq)   # non-causal: every query sees every key
            halves = [ring.block(q, k[..., a:b, :], v[..., a:b, :], pq, pos[a:b], 0.5) for a, b in ((0, cut),
                                                                                                  (cut, seq))]
            with refusing(ring.merge_partial, why="write the merge yourself: two exponentials and a log-sum-exp"):
                o, lse = fn(*halves[0], *halves[1])
            want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.5)
            expect_close(o, want, rtol=1e-9, atol=1e-12, what="merged output")
            full = torch.logsumexp(((q @ k.transpose(-1, -2)) * 0.5).masked_fill(
                pos[:, None] < pos[None, :], float("-inf")) if causal else (q @ k.transpose(-1, -2)) * 0.5, -1)
            expect_close(lse, full, rtol=1e-9, atol=1e-12, what="merged log-sum-exp")
        return run

    cases = [(f"{seq} keys cut at {cut}{', causal' if causal else ''}", case(seq, cut, causal))
             for seq, cut, causal in ((8, 4, False), (10, 3, False), (12, rng.randrange(1, 11), False), (8, 4, True),
                                      (16, rng.randrange(1, 15), True))]
    return run_cases(title, cases, hint="lse = logaddexp(lse1, lse2); o = o1·exp(lse1 - lse) + o2·exp(lse2 - lse); "
                                        "a row with lse = -inf in a half takes nothing from it")


def check_split_sizes(fn, seed: int | None = None) -> CheckResult:
    """Exercise: ``fn(experts, n_experts, ep) -> list`` of ``ep`` ints: how many of this rank's (token, expert)
    assignments ``experts`` (a 1-D tensor of expert indices, dropped ones already removed) go to each rank, rank r
    holding experts ``r·E/ep .. (r+1)·E/ep - 1``: the send split sizes of the dispatch's ``all_to_all_single``."""
    title = "expert parallelism's split sizes"
    if not attempted(fn, torch.zeros(1, dtype=torch.long), 2, 2):
        return not_attempted(title, "write split_sizes(experts, n_experts, ep) -> list of ep ints")
    rng = rng_for(seed)

    def case(n, e, ep):
        def run():
            experts = torch.tensor([rng.randrange(e) for _ in range(n)], dtype=torch.long)
            got = fn(experts, e, ep)
            want = torch.bincount(experts // (e // ep), minlength=ep).tolist()
            expect_equal([int(c) for c in got], want, what=f"split sizes for {n} assignments, {e} experts, ep={ep}")
        return run

    cases = [(f"{n} assignments, {e} experts on {ep} ranks", case(n, e, ep))
             for n, e, ep in ((10, 4, 2), (7, 8, 4), (rng.randrange(1, 50), 8, 2), (5, 2, 2), (0, 4, 4))]
    return run_cases(title, cases, hint="the rank holding expert j is j // (n_experts // ep); count per rank, "
                                        "zeros included")


# ----------------------------------------------------------------------------- tour
def tour(world_size: int = 2) -> list[dict]:
    """The lab's quick path: the ring and the experts against one process on ``world_size`` ranks."""
    import labkit

    lab = lab_name(__package__)
    n = world_size if world_size in (2, 4) else 2

    def ring_ok():
        res = labkit.launch(ring_rank, world_size=n, kwargs=dict(layout="zigzag"), echo=False, quiet=True)
        err = max(max(r["out_err"], r["grad_err"]) for r in res)
        return err < 1e-12 and all(r["sent"] == r["formula"] for r in res), f"max difference {err:.1e}"

    def gpt_ok():
        res = labkit.launch(gpt_rank, world_size=n, echo=False, quiet=True)
        err = max(max(r["loss_err"], r["grad_err"]) for r in res)
        return err < 1e-12, f"loss and gradients within {err:.1e} of one process"

    def moe_ok():
        res = labkit.launch(moe_rank, world_size=n, kwargs=dict(k=2), echo=False, quiet=True)
        err = max(max(r["out_err"], r["grad_err"]) for r in res)
        return err < 1e-12 and not any(r["dropped"] for r in res), f"max difference {err:.1e}, nothing dropped"

    balance = ring.work_each_rank(64, 4, "zigzag")
    return [run_check(lab, f"ring attention on {n} ranks == one process (float64, zigzag)", ring_ok),
            run_check(lab, f"TinyGPT with its sequence over {n} ranks == one process", gpt_ok),
            run_check(lab, f"experts over {n} ranks, k = 2 == one process", moe_ok),
            run_check(lab, "zigzag balances the causal work over 4 ranks",
                      lambda: (len(set(balance)) == 1, f"pairs per rank {balance}"))]
