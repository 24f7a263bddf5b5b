"""Lab 11's TinyGPT with its sequence split over ``cp`` ranks: every layer runs on this rank's tokens, attention by
:func:`~labkit.context_expert.ring.ring_attention`.

Everything in a transformer but attention works token by token (embeddings, LayerNorm, the MLP, the output layer
and the loss), so a rank computes it on its own tokens, with the positions its layout gives them; attention is the
one place tokens meet, and the ring brings every key to every query. The weights are replicated: each rank's
gradients cover its tokens only, so they are summed over the ranks (an all-reduce, as data parallelism does), and
the loss is this rank's sum over its tokens divided by the whole batch's token count, so that the ranks' losses add
up to the one-process mean.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .ring import positions, ring_attention

__all__ = ["forward_cp", "loss_cp", "all_reduce_grads"]


def forward_cp(model, ids: torch.Tensor, layout: str = "zigzag", group=None, stats: dict | None = None) -> torch.Tensor:
    """``model`` (a :class:`labkit.capstone.model.TinyGPT`) on this rank's tokens ``ids`` (``B × seq/cp``, as
    :func:`~labkit.context_expert.ring.shard` cuts them): its logits for those tokens. ``stats``: a dict that
    collects the bytes the rings send (:func:`~labkit.context_expert.ring.ring_attention`)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    pos = positions(ids.shape[1] * cp, cp, rank, layout).to(ids.device)
    x = model.tok(ids) + model.pos[pos]
    for blk in model.blocks:
        h = blk.qkv(blk.ln1(x))
        b, s, _ = h.shape
        q, k, v = h.view(b, s, blk.heads, 3, -1).permute(3, 0, 2, 1, 4)   # the capstone's head-major qkv layout
        a = ring_attention(q, k, v, layout, group, stats).transpose(1, 2).reshape(b, s, -1)
        x = x + blk.proj(a)
        x = x + blk.fc2(F.gelu(blk.fc1(blk.ln2(x))))
    return model.head(model.ln_f(x))


def loss_cp(logits: torch.Tensor, targets: torch.Tensor, cp: int) -> torch.Tensor:
    """This rank's share of the one-process mean cross-entropy: its tokens' sum over the whole batch's count."""
    total = logits.shape[0] * logits.shape[1] * cp
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum") / total


def all_reduce_grads(model, group=None) -> None:
    """Sum every parameter's gradient over the ranks (each covered only its own tokens)."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
