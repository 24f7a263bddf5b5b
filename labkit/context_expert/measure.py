"""What context parallelism costs and saves, measured on real ranks: activation memory and bytes per rank.

:func:`cp_memory_rank` runs lab 11's TinyGPT with its sequence split over this launch's ranks at several sequence
lengths and returns, per length, the bytes autograd saved for the backward on this rank (the activation memory,
weights excluded: :func:`labkit.sliced.models.saved_bytes`) and the bytes its rings sent forward and backward, beside
:func:`~labkit.context_expert.ring.ring_bytes`. Every layer but attention keeps per-token activations, and the ring
keeps this rank's q, k, v, output and log-sum-exp only, so the activation memory per rank falls as 1/cp.

For expert parallelism, :func:`count_all_to_all` counts the bytes a rank hands to ``dist.all_to_all_single`` for
other ranks (the rows themselves, and apart from them the integer split sizes and expert indices), and
:func:`expected_a2a_rows` the rows its routing should send and receive, for
:func:`~labkit.context_expert.moe.all_to_all_bytes`. :func:`balance_run` trains one MoE layer with and without
Switch's balance loss, in this process, and counts the tokens each expert then receives.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..sliced.models import saved_bytes
from .gpt import forward_cp, loss_cp
from .moe import MoE
from .ring import ring_bytes, shard

__all__ = ["cp_memory_rank", "count_all_to_all", "expected_a2a_rows", "balance_run"]


def cp_memory_rank(ctx, seqs=(64, 128, 256), layout: str = "zigzag", layers: int = 2, width: int = 32,
                   heads: int = 4, batch: int = 2) -> list[dict]:
    """One row per sequence length: ``seq``, ``activation bytes`` (this rank), ``sent forward``, ``sent backward``
    (this rank, measured), ``formula forward``, ``formula backward`` (:func:`ring_bytes`, summed over layers)."""
    from ..capstone.model import Config, build, sort_batch

    cp, rank = ctx.world_size, ctx.rank
    rows = []
    for seq in seqs:
        cfg = Config(layers=layers, width=width, heads=heads, vocab=16, seq=seq)
        model = build(cfg, seed=0).to(ctx.device)
        ids, targets = (t.to(ctx.device) for t in sort_batch(batch, cfg, seed=1))
        ids, targets = shard(ids, cp, rank, layout, dim=1), shard(targets, cp, rank, layout, dim=1)
        stats: dict = {}
        logits, saved = saved_bytes(lambda: forward_cp(model, ids, layout, stats=stats), exclude=model)
        loss_cp(logits, targets, cp).backward()
        formula = ring_bytes(batch, heads, seq, width // heads, cp, torch.finfo(logits.dtype).bits // 8)
        rows.append({"seq": seq, "cp": cp, "activation bytes": saved,
                     "sent forward": stats.get("forward", 0), "sent backward": stats.get("backward", 0),
                     "formula forward": layers * formula["forward"] if cp > 1 else 0,
                     "formula backward": layers * formula["backward"] if cp > 1 else 0})
    return rows


class _A2ACount:
    def __init__(self):
        self.phase = "forward"
        self.bytes: dict = {}

    def add(self, key, n):
        self.bytes[key] = self.bytes.get(key, 0) + n


@contextlib.contextmanager
def count_all_to_all(world_size: int, rank: int):
    """Within the block, every ``dist.all_to_all_single`` this process calls counts the bytes it sends to *other*
    ranks: floating-point payloads under ``count.bytes[count.phase]`` (set ``count.phase = "backward"`` before the
    backward), integer ones (split sizes, expert indices) under ``phase + " meta"``. Yields ``count``."""
    count, orig = _A2ACount(), dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        row = input[0].numel() * input.element_size() if input.dim() and input.shape[0] else 0
        if input_split_sizes is None:   # equal splits: 1/world_size of the rows to each rank
            n = input.numel() * input.element_size() * (world_size - 1) // world_size
        else:
            n = row * (sum(input_split_sizes) - input_split_sizes[rank])
        count.add(count.phase if input.is_floating_point() else count.phase + " meta", n)
        return orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counted
    try:
        yield count
    finally:
        dist.all_to_all_single = orig


def expected_a2a_rows(routing, per_rank: int, world_size: int, rank: int, group=None) -> dict:
    """The rows this rank's expert-parallel forward should send to other ranks in the dispatch (its kept assignments
    to experts another rank holds) and in the combine (the assignments other ranks made to its experts), from the
    routing of every rank (an all-gather of each rank's counts per owner; every rank must call it)."""
    kept = routing.experts[routing.kept]
    send = torch.bincount(kept // per_rank, minlength=world_size)
    table = [torch.empty_like(send) for _ in range(world_size)]
    dist.all_gather(table, send, group=group)
    m = torch.stack(table).tolist()   # m[i][j]: rows rank i sends to rank j
    return {"dispatch": sum(m[rank]) - m[rank][rank],
            "combine": sum(m[i][rank] for i in range(world_size)) - m[rank][rank]}


def balance_run(alpha: float, steps: int = 200, experts: int = 8, seed: int = 0) -> dict:
    """Train one MoE layer (k = 1, no capacity limit) to imitate a fixed random MLP, with ``alpha`` times Switch's
    balance loss added, in this process: ``{"tokens_per_expert", "aux", "mse"}`` on 1,024 fresh tokens after.
    Without the balance loss the router tends to send everything to the expert that learned first.

    It runs on one thread (restored after): its tensors are small, so more threads only wait for each other, and on a
    busy machine a parallel region waits for a thread the scheduler has put aside, step after step (measured: over
    5 minutes beside one busy process, against seconds on one thread). One thread also gives the same numbers on
    every machine load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _balance_run(alpha, steps, experts, seed)
    finally:
        torch.set_num_threads(before)


def _balance_run(alpha: float, steps: int, experts: int, seed: int) -> dict:
    torch.manual_seed(seed)
    moe = MoE(16, 32, experts, k=1, capacity_factor=None)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16))
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(256, 16, generator=g) + 1.0
        with torch.no_grad():
            y = teacher(x)
        loss = F.mse_loss(moe(x), y) + alpha * moe.last_aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(1024, 16, generator=g) + 1.0
    with torch.no_grad():
        mse = F.mse_loss(moe(x), teacher(x)).item()
    return {"tokens_per_expert": moe.last.tokens_per_expert(experts).tolist(), "aux": moe.last_aux.item(),
            "mse": mse, "logits": moe.router(x).detach()}
