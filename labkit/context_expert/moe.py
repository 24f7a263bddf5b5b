"""A mixture-of-experts MLP, in one process and with its experts sharded over ranks (expert parallelism).

**Routing** (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021; GShard, Lepikhin et al. 2020). A linear
*router* scores each token against the E experts; softmax gives probabilities p_e; each token goes to its top k
experts (k = 1: Switch; k = 2: GShard), and its output is the sum of those experts' outputs weighted by their
probabilities renormalised over the k chosen (k = 1: the probability itself, as Switch does, so the router learns).

**Capacity.** An expert takes at most C = ⌈capacity_factor · k · T / E⌉ of the T tokens routed in one call;
assignments past C (in token order, first choices before second choices, as GShard orders them) are *dropped*: that
expert contributes nothing to that token, which keeps its residual path only. :attr:`MoE.last` counts them.

**Load-balancing loss** (Switch, eq. 4): ``aux = E · Σ_e f_e · P_e`` with f_e the fraction of the T·k assignments
made to expert e and P_e the mean router probability of e over the tokens; 1 when both are uniform, larger when the
router favours a few experts. Add ``alpha · aux`` to the loss (Switch uses alpha = 0.01).

**Expert parallelism** (:class:`ExpertParallelMoE`): ``ep`` ranks each hold E/ep experts and their own tokens
(data parallelism for everything else). Each rank routes its tokens, sends every (token, expert) assignment to the
rank holding the expert with one ``all_to_all_single`` (the split sizes exchanged first with another, since each
rank must know how many rows to expect from each), the experts run on what they received, and a second
``all_to_all_single`` with the split sizes swapped brings the outputs home. gloo implements only the single-tensor
form with uneven splits (``dist.all_to_all`` with lists is not implemented there). Both exchanges are autograd
functions (:class:`_AllToAll`): the backward of an all-to-all is the all-to-all of the gradients with the split
sizes swapped. Capacity is per rank (each rank's T tokens, as a rank would route them); with no token dropped the
result equals the same MoE in one process on all the tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._validate import ArgumentError, validate_int, validate_number

__all__ = ["MoE", "ExpertParallelMoE", "Routing", "route", "capacity", "balance_loss", "all_to_all_bytes"]


def capacity(tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """C = ⌈capacity_factor · k · tokens / n_experts⌉: the most assignments one expert takes in a call."""
    return max(1, math.ceil(capacity_factor * k * tokens / n_experts))


@dataclass
class Routing:
    """Where each token goes: ``experts`` and ``weights`` are T × k (chosen experts, combine weights), ``kept`` T × k
    (False where the assignment was dropped for capacity), ``probs`` T × E (the router's softmax)."""

    experts: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor
    probs: torch.Tensor

    @property
    def dropped(self) -> int:
        return int((~self.kept).sum())

    def tokens_per_expert(self, n_experts: int) -> torch.Tensor:
        """Assignments each expert received, dropped ones included (the histogram of the router's choices)."""
        return torch.bincount(self.experts.reshape(-1), minlength=n_experts)


def route(logits: torch.Tensor, k: int, capacity_factor: float | None) -> Routing:
    """Top-k routing of T tokens (``logits`` T × E) with capacity (None: no limit)."""
    if logits.dim() != 2:
        raise ArgumentError(f"logits has shape {tuple(logits.shape)}; pass the router's scores as tokens × experts")
    t, e = logits.shape
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= e:
        raise ArgumentError(f"k={k!r} experts per token, but there are n_experts={e}; pass an int k in [1, {e}]")
    if capacity_factor is not None:
        capacity_factor = validate_number("capacity_factor", capacity_factor, minimum=0, open_low=True,
                                          hint="e.g. 1.25, or None for no limit")
    probs = logits.softmax(-1)
    top_p, top_e = probs.topk(k, dim=-1)
    weights = top_p if k == 1 else top_p / top_p.sum(-1, keepdim=True)
    kept = torch.ones_like(top_e, dtype=torch.bool)
    if capacity_factor is not None:
        cap = capacity(t, e, k, capacity_factor)
        # first choices of every token before any second choice, each in token order (GShard's priority)
        order = top_e.T.reshape(-1)                                    # k·T assignments, choice-major
        onehot = F.one_hot(order, e)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1             # its place in its expert's queue
        kept = (position < cap).reshape(k, t).T
    return Routing(top_e, weights, kept, probs)


def balance_loss(r: Routing, n_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, E · Σ_e f_e · P_e (f: share of the k·T assignments, P: mean prob)."""
    f = r.tokens_per_expert(n_experts).to(r.probs.dtype) / r.experts.numel()
    return n_experts * (f * r.probs.mean(0)).sum()


class MoE(nn.Module):
    """E expert MLPs (``width → ffn_width → width``, GELU) behind a top-``k`` router, in one process.

    ``forward(x)`` takes any ``... × width`` tensor and returns the same shape; :attr:`last` holds the call's
    :class:`Routing`, its auxiliary loss (``last_aux``) and dropped count."""

    def __init__(self, width: int, ffn_width: int, n_experts: int, k: int = 1, capacity_factor: float | None = 1.25,
                 dtype=torch.float32):
        super().__init__()
        self.width = validate_int("width", width, minimum=1)
        self.ffn_width = validate_int("ffn_width", ffn_width, minimum=1)
        self.n_experts = validate_int("n_experts", n_experts, minimum=1)
        self.k = validate_int("k", k, minimum=1, maximum=n_experts, hint=f"1 or 2, at most n_experts={n_experts}")
        if capacity_factor is not None:
            capacity_factor = validate_number("capacity_factor", capacity_factor, minimum=0, open_low=True,
                                              hint="e.g. 1.25, or None for no limit")
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(width, n_experts, bias=False, dtype=dtype)
        self.w1 = nn.Parameter(torch.empty(n_experts, width, ffn_width, dtype=dtype))
        self.b1 = nn.Parameter(torch.zeros(n_experts, ffn_width, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(n_experts, ffn_width, width, dtype=dtype))
        self.b2 = nn.Parameter(torch.zeros(n_experts, width, dtype=dtype))
        for w, fan_in in ((self.w1, width), (self.w2, ffn_width)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self.last: Routing | None = None
        self.last_aux: torch.Tensor | None = None

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` (an index into this module's experts) on rows ``x``."""
        return F.gelu(x @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.width:
            raise ArgumentError(f"x has {x.shape[-1]} features where the MoE's width is {self.width}; pass "
                                f"... × {self.width} tensors")
        flat = x.reshape(-1, self.width)
        r = route(self.router(flat), self.k, self.capacity_factor)
        self.last, self.last_aux = r, balance_loss(r, self.n_experts)
        out = torch.zeros_like(flat)
        for e in range(self.n_experts):
            tok, slot = ((r.experts == e) & r.kept).nonzero(as_tuple=True)
            if tok.numel():
                out = out.index_add(0, tok, self.expert(e, flat[tok]) * r.weights[tok, slot, None])
        return out.reshape(x.shape)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its backward sends the gradients back with the splits swapped."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        back = grad.new_empty((sum(send_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return back, None, None, None


def all_to_all_bytes(rows_sent: int, width: int, element_size: int) -> int:
    """Bytes one rank sends in one exchange (its rows for other ranks; each row ``width`` values): the formula the
    measurement is checked against. Dispatch and combine each send this, so a layer's forward sends it twice."""
    return rows_sent * width * element_size


class ExpertParallelMoE(nn.Module):
    """``moe``'s experts split over the ranks of ``group``: rank r keeps experts ``r·E/ep .. (r+1)·E/ep - 1``.

    Every rank builds the same full :class:`MoE` (same seed) and wraps it; the experts other ranks hold are dropped
    from this rank's copy. The router stays replicated (average its gradient over the ranks, as data parallelism
    does). :attr:`sent`: the bytes of token rows this rank sent to other ranks in the last forward, dispatch and combine
(from the split sizes, :func:`all_to_all_bytes`; the int64 split sizes and expert indices sent beside them, a few
percent more, are not in it)."""

    def __init__(self, moe: MoE, group=None):
        super().__init__()
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if moe.n_experts % self.ep:
            raise ArgumentError(f"n_experts={moe.n_experts} does not split over ep={self.ep} ranks; pass a multiple "
                                f"of {self.ep} experts (or another number of ranks)")
        self.per_rank = moe.n_experts // self.ep
        lo = self.rank * self.per_rank
        self.n_experts, self.k, self.capacity_factor, self.width = moe.n_experts, moe.k, moe.capacity_factor, moe.width
        self.router = moe.router
        self.w1 = nn.Parameter(moe.w1.detach()[lo:lo + self.per_rank].clone())
        self.b1 = nn.Parameter(moe.b1.detach()[lo:lo + self.per_rank].clone())
        self.w2 = nn.Parameter(moe.w2.detach()[lo:lo + self.per_rank].clone())
        self.b2 = nn.Parameter(moe.b2.detach()[lo:lo + self.per_rank].clone())
        self.first = lo
        self.last: Routing | None = None
        self.last_aux: torch.Tensor | None = None
        self.sent = 0

    def _splits(self, counts: torch.Tensor) -> list[int]:
        """What every rank will send to this one, from what this one sends to each (an all-to-all of the counts)."""
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        return recv.tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.width)
        r = route(self.router(flat), self.k, self.capacity_factor)
        self.last, self.last_aux = r, balance_loss(r, self.n_experts)
        tok, slot = r.kept.nonzero(as_tuple=True)
        expert = r.experts[tok, slot]
        order = torch.argsort(expert, stable=True)          # grouped by expert, so by the rank that holds it
        tok, slot, expert = tok[order], slot[order], expert[order]
        owner = expert // self.per_rank
        send = torch.bincount(owner, minlength=self.ep)
        recv = self._splits(send)
        send = send.tolist()
        # dispatch: the rows, and which of the receiver's experts each is for (as the same dtype, one exchange each)
        rows = _AllToAll.apply(flat[tok], send, recv, self.group)
        local = torch.empty(sum(recv), dtype=expert.dtype, device=expert.device)
        dist.all_to_all_single(local, (expert - owner * self.per_rank).contiguous(), recv, send, group=self.group)
        outs = []
        for e in range(self.per_rank):
            idx = (local == e).nonzero(as_tuple=True)[0]
            if idx.numel():
                y = F.gelu(rows[idx] @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]
                outs.append((idx, y))
        out_rows = torch.zeros_like(rows)
        for idx, y in outs:
            out_rows = out_rows.index_copy(0, idx, y)
        # combine: the outputs go back to the tokens' ranks with the split sizes swapped
        back = _AllToAll.apply(out_rows, recv, send, self.group)
        mine = send[self.rank]
        self.sent = all_to_all_bytes(sum(send) - mine, self.width, flat.element_size()) + \
            all_to_all_bytes(sum(recv) - recv[self.rank], self.width, flat.element_size())
        out = torch.zeros_like(flat).index_add(0, tok, back * r.weights[tok, slot, None])
        return out.reshape(x.shape)
