"""What context parallelism costs and saves, measured on real ranks: activation memory and bytes per rank.

:func:`cp_memory_rank` runs lab 11's TinyGPT with its sequence split over this launch's ranks at several sequence
lengths and returns, per length, the bytes autograd saved for the backward on this rank (the activation memory,
weights excluded: :func:`labkit.sliced.models.saved_bytes`) and the bytes its rings sent forward and backward, beside
:func:`~labkit.context_expert.ring.ring_bytes`. Every layer but attention keeps per-token activations, and the ring
keeps this rank's q, k, v, output and log-sum-exp only, so the activation memory per rank falls as 1/cp.
"""
from __future__ import annotations

import torch

from ..sliced.models import saved_bytes
from .gpt import forward_cp, loss_cp
from .ring import ring_bytes, shard

__all__ = ["cp_memory_rank"]


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
