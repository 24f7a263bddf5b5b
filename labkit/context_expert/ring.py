"""Context parallelism: causal attention with the sequence split over ``cp`` ranks (ring attention).

Each rank keeps its own queries and passes its keys and values around a ring: at step s it holds the key/value
chunk of rank (r - s) mod cp, computes that block of attention, and merges it into its running result by the
online-softmax (log-sum-exp) rule, while the next chunk is already travelling (``batch_isend_irecv`` posted before
the block's compute, the form NCCL needs). After cp steps every query has seen every key, and no rank ever held the
sequence's whole keys or its s × s scores (Liu et al. 2023, "Ring Attention with Blockwise Transformers"; Brandon
et al. 2023, "Striped Attention"; the Llama 3 paper's context parallelism).

**The merge.** A block gives, per query, its softmax-weighted values ``o_b`` and ``lse_b = log Σ exp(scores)``.
Two partial results combine exactly::

    lse = logaddexp(lse_1, lse_2);   o = o_1 · exp(lse_1 - lse) + o_2 · exp(lse_2 - lse)

A query whose keys in a block are all in its future (causal) gets ``lse_b = -inf`` and ``o_b = 0``, which the rule
leaves out. :func:`merge_partial` is this rule; lab 12's exercise asks for it.

**Layouts.** The sequence is cut into chunks. *Contiguous*: rank r holds tokens [r·L, (r+1)·L). Causally, rank 0's
queries see only their own chunk and rank cp-1's see all cp chunks: the last rank does cp times the work of the first,
and the ring waits for it. *Zigzag* (Llama 3's context parallelism, Dubey et al. 2024; Megatron-Core's and torch's
head-tail load balancing): 2·cp chunks, rank r holds chunks r and 2cp-1-r, so every rank holds one early and one late
chunk and does the same work. :func:`work_each_rank` counts the (query, key) pairs each rank computes.

**Backward** is written by hand (:class:`_Ring`, an autograd function), as the fused kernels do it: a second pass
around the ring. The keys and values travel ahead as in the forward (posted before each block's compute); behind them
travel the gradients ``dk, dv`` accumulated so far for the chunk just computed, and after cp moves every chunk's
gradients are home and whole. With 16-bit inputs the partial outputs, log-sum-exps and ``dk, dv`` are kept in float32.
Per block, with ``P = exp(scores - lse)`` (the forward's final log-sum-exp, saved) and ``D = rowsum(dO ∘ O)``: ``dV +=
Pᵀ dO``, ``dS = P ∘ (dO Vᵀ - D)``, ``dQ += dS K · scale``, ``dK += dSᵀ Q · scale``. The forward sends 2(cp-1)
key/value chunks per rank per layer; the backward 2(cp-1) key/value chunks again and 2·cp gradient chunks
(:func:`ring_bytes`).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .._validate import ArgumentError, validate_choice, validate_int
from ..distops import p2p

__all__ = ["LAYOUTS", "positions", "shard", "unshard_index", "merge_partial", "block", "ring_attention",
           "work_each_rank", "ring_bytes"]

LAYOUTS = ("contiguous", "zigzag")


def positions(seq: int, cp: int, rank: int, layout: str = "zigzag") -> torch.Tensor:
    """The global token positions rank ``rank`` of ``cp`` holds, in its local order."""
    validate_choice("layout", layout, LAYOUTS)
    cp = validate_int("cp", cp, minimum=1)
    rank = validate_int("rank", rank, minimum=0, maximum=cp - 1)
    parts = cp if layout == "contiguous" else 2 * cp
    if seq % parts:
        raise ArgumentError(f"seq={seq} does not split into {parts} equal chunks ({layout} layout on cp={cp}); pass "
                            f"a sequence length that is a multiple of {parts}")
    n = seq // parts
    chunks = [rank] if layout == "contiguous" else [rank, 2 * cp - 1 - rank]
    return torch.cat([torch.arange(c * n, (c + 1) * n) for c in chunks])


def shard(x: torch.Tensor, cp: int, rank: int, layout: str = "zigzag", dim: int = -2) -> torch.Tensor:
    """This rank's tokens of ``x`` along ``dim`` (the sequence dimension)."""
    return x.index_select(dim, positions(x.shape[dim], cp, rank, layout).to(x.device))


def unshard_index(seq: int, cp: int, layout: str = "zigzag") -> torch.Tensor:
    """The permutation that puts the ranks' local tokens, concatenated in rank order, back in sequence order."""
    return torch.argsort(torch.cat([positions(seq, cp, r, layout) for r in range(cp)]))


def merge_partial(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Two partial attention results over disjoint keys, combined: ``(o, lse)`` (the online-softmax rule)."""
    lse = torch.logaddexp(lse1, lse2)
    # a row with lse = -inf in both has no keys yet: keep it at zero instead of exp(-inf - -inf) = nan
    w1 = torch.where(torch.isinf(lse1) & (lse1 < 0), torch.zeros_like(lse1), torch.exp(lse1 - lse))
    w2 = torch.where(torch.isinf(lse2) & (lse2 < 0), torch.zeros_like(lse2), torch.exp(lse2 - lse))
    return o1 * w1[..., None] + o2 * w2[..., None], lse


def _scores(q, k, pq, pk, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    return s.masked_fill(pq[:, None] < pk[None, :], float("-inf"))   # causal: a key after its query is hidden


def block(q, k, v, pq, pk, scale):
    """One block of causal attention: ``(o, lse)`` of queries at positions ``pq`` over keys at ``pk``."""
    s = _scores(q, k, pq, pk, scale)
    m = s.amax(-1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m[..., None])
    total = p.sum(-1)
    lse = m + torch.log(total)                                  # -inf where every key was hidden
    o = (p @ v) / total.clamp_min(torch.finfo(total.dtype).tiny)[..., None]
    return o, lse


def _visible(pq, pk) -> bool:
    return bool(pq.max() >= pk.min())   # some query sees some key: else the block is skipped


def _runs(n: int, layout: str) -> list[tuple[int, int]]:
    """A rank's chunks as local index ranges: one (contiguous), or its early and its late chunk (zigzag)."""
    return [(0, n)] if layout == "contiguous" else [(0, n // 2), (n // 2, n)]


def _pairs(pq, pk, layout):
    """The (query chunk, key chunk) pairs with a visible (query, key) pair: the sub-blocks a rank computes. Under
    the zigzag layout half of an off-diagonal block is in the future and skipped, which is what balances the ranks."""
    return [((a, b), (c, d)) for a, b in _runs(pq.numel(), layout) for c, d in _runs(pk.numel(), layout)
            if _visible(pq[a:b], pk[c:d])]


def _exchange(tensors, rank, cp, group, stats=None, phase="forward", tag=0):
    """Send ``tensors`` to the next rank and receive the previous rank's into new buffers (posted, not waited);
    the bytes sent are added to ``stats[phase]`` when ``stats`` is a dict. Two exchanges in flight at once take
    different ``tag``s (gloo matches messages by tag)."""
    nxt, prv = (rank + 1) % cp, (rank - 1) % cp
    if stats is not None:
        stats[phase] = stats.get(phase, 0) + sum(t.numel() * t.element_size() for t in tensors)
    got = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    sends, recvs = p2p([(t.contiguous(), nxt, tag + i) for i, t in enumerate(tensors)],
                       [(g, prv, tag + i) for i, g in enumerate(got)], group=group)
    return got, sends + recvs


def _wait(works) -> None:
    for w in works:
        w.wait()


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial results are kept and merged in: float32 for 16-bit inputs (as fused kernels keep their
    softmax statistics), else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, group, stats):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        seq = q.shape[-2] * cp
        scale = 1 / math.sqrt(q.shape[-1])
        # which sub-blocks to compute is decided on the CPU's copy of the positions (no device sync per block);
        # the causal mask inside a block uses the device's copy
        cpu = [positions(seq, cp, r, layout) for r in range(cp)]
        pos = [p.to(q.device) for p in cpu]
        acc = _accumulator(q.dtype)
        qa = q.to(acc)
        runs = _runs(q.shape[-2], layout)
        outs = [torch.zeros_like(qa[..., a:b, :]) for a, b in runs]
        lses = [torch.full(q.shape[:-2] + (b - a,), float("-inf"), dtype=acc, device=q.device) for a, b in runs]
        kb, vb = k, v
        for s in range(cp):
            works = []
            if s < cp - 1:   # the next chunk travels while this one is computed
                (nk, nv), works = _exchange((kb, vb), rank, cp, group, stats, "forward")
            src = (rank - s) % cp
            for (a, b), (c, d) in _pairs(cpu[rank], cpu[src], layout):
                i = runs.index((a, b))
                ob, lb = block(qa[..., a:b, :], kb[..., c:d, :].to(acc), vb[..., c:d, :].to(acc), pos[rank][a:b],
                               pos[src][c:d], scale)
                outs[i], lses[i] = merge_partial(outs[i], lses[i], ob, lb)
            _wait(works)
            if s < cp - 1:
                kb, vb = nk, nv
        out, lse = torch.cat(outs, dim=-2).to(q.dtype), torch.cat(lses, dim=-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.pos, ctx.cpu, ctx.layout, ctx.stats = group, scale, pos, cpu, layout, stats
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, pos, cpu = ctx.group, ctx.scale, ctx.pos, ctx.cpu
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = _accumulator(q.dtype)
        q32, dout = q.to(acc), dout.contiguous().to(acc)
        d = (dout * out.to(acc)).sum(-1)
        dq = torch.zeros_like(q32)
        kb, vb = k, v
        dkb = dvb = None
        got, dworks = None, []
        for s in range(cp):
            # the next key/value chunk travels while this one is computed, as in the forward
            kvworks = []
            if s < cp - 1:
                (nk, nv), kvworks = _exchange((kb, vb), rank, cp, group, ctx.stats, "backward")
            # the gradients of this chunk's keys and values so far arrive from the rank that held it before
            _wait(dworks)
            dkb, dvb = (torch.zeros_like(kb, dtype=acc), torch.zeros_like(vb, dtype=acc)) if got is None else got
            src = (rank - s) % cp
            for (a, b), (c, e) in _pairs(cpu[rank], cpu[src], ctx.layout):
                qa, ka, va, do = q32[..., a:b, :], kb[..., c:e, :].to(acc), vb[..., c:e, :].to(acc), dout[..., a:b, :]
                sc = _scores(qa, ka, pos[rank][a:b], pos[src][c:e], scale)
                p = torch.exp(sc - lse[..., a:b, None])          # hidden keys: exp(-inf) = 0
                dvb[..., c:e, :] += p.transpose(-1, -2) @ do
                ds = p * (do @ va.transpose(-1, -2) - d[..., a:b, None])
                dq[..., a:b, :] += (ds @ ka) * scale
                dkb[..., c:e, :] += (ds.transpose(-1, -2) @ qa) * scale
            # the gradients move on with the chunk; after cp moves every chunk's gradients are home and whole
            if cp > 1:
                got, dworks = _exchange((dkb, dvb), rank, cp, group, ctx.stats, "backward", tag=2)
            _wait(kvworks)
            if s < cp - 1:
                kb, vb = nk, nv
        _wait(dworks)
        dk, dv = got if cp > 1 else (dkb, dvb)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str = "zigzag", group=None,
                   stats: dict | None = None):
    """Causal attention of this rank's queries over the whole sequence's keys, the sequence split over ``group``'s
    ranks in ``layout`` (``q, k, v``: ``B × heads × L × head_dim``, this rank's L = seq/cp tokens, as :func:`shard`
    cuts them). Returns this rank's outputs; differentiable. ``stats``: a dict to which the bytes this rank sends
    are added, under ``"forward"`` and ``"backward"`` (:func:`ring_bytes` is the formula)."""
    validate_choice("layout", layout, LAYOUTS)
    if not (q.shape == k.shape == v.shape):
        raise ArgumentError(f"q, k and v must have one shape (B x heads x L x head_dim), got {tuple(q.shape)}, "
                            f"{tuple(k.shape)}, {tuple(v.shape)}")
    return _Ring.apply(q, k, v, layout, group, stats)


def work_each_rank(seq: int, cp: int, layout: str = "zigzag") -> list[int]:
    """The (query, key) pairs each rank computes under the causal mask (sub-blocks with no visible pair skipped)."""
    pos = [positions(seq, cp, r, layout) for r in range(cp)]
    # a sub-block is computed whole, its masked pairs included
    return [sum((b - a) * (d - c) for r2 in range(cp) for (a, b), (c, d) in _pairs(pos[r], pos[r2], layout))
            for r in range(cp)]


def ring_bytes(batch: int, heads: int, seq: int, head_dim: int, cp: int, element_size: int,
               grad_element_size: int | None = None) -> dict:
    """Bytes one rank sends per attention layer: forward 2(cp-1) chunks (k and v), backward 2(cp-1) chunks of k and v
    again and 2·cp of their gradients (the last move brings them home). ``element_size``: the inputs' bytes per
    value; ``grad_element_size``: the gradients' (default the same; 4 for 16-bit inputs, whose key and value
    gradients are summed and sent in float32)."""
    values = batch * heads * (seq // cp) * head_dim
    grad = element_size if grad_element_size is None else grad_element_size
    return {"forward": 2 * (cp - 1) * values * element_size,
            "backward": 2 * (cp - 1) * values * element_size + 2 * cp * values * grad}
