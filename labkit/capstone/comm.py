"""What the capstone's ranks say to each other: the tensor-parallel operators, and a meter for every group.

**Operators** (autograd functions; each names its forward and backward collective):

- Megatron-LM's f and g (Shoeybi et al. 2019, section 3) are lab 03's :func:`~labkit.sliced.channels.copy_to_ranks`
  (identity, then all-reduce of the gradient) and :func:`~labkit.sliced.channels.reduce_from_ranks` (all-reduce,
  then identity), with ``group=`` the tensor-parallel group.
- Sequence parallelism (Korthikanti et al. 2022, section 4.2.2) replaces them with :func:`gather_seq` (all-gather
  along the sequence, reduce-scatter of the gradient) and :func:`scatter_seq` (reduce-scatter along the sequence,
  all-gather of the gradient). An all-reduce is a reduce-scatter followed by an all-gather, so a block moves the
  same bytes; in between, LayerNorm and the residual work on 1/t of the sequence.
- :func:`vocab_parallel_cross_entropy`: the loss over logits split by vocabulary (Megatron-LM section 3): three
  all-reduces of one value per token (the maximum, the sum of exponentials, the target's logit) instead of
  gathering the vocabulary.

**Meter** (:class:`CommMeter`): inside ``with meter:``, every ``torch.distributed`` collective and every point-to-
point send made by any code on this rank (lab 02's DDP, lab 03's operators, lab 04's executor) is recorded with
its group's name and its payload, the bytes handed to it. The meter wraps the functions of the
``torch.distributed`` module for the duration of the block, so code that calls ``dist.all_reduce(...)`` is
measured without being changed; lab 12's ring attention posts its sends through ``dist.batch_isend_irecv`` as the
executor does, so they count under the cp group. Bytes on the wire follow from the payload: a ring all-reduce
sends 2(n-1)/n of it, an all-gather or a reduce-scatter (n-1)/n of the whole tensor (Patarasuk and Yuan 2009; lab
01).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..distops import all_gather_tensor, reduce_scatter_tensor

_WRAPPED = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "reduce_scatter",
            "reduce_scatter_single", "reduce_scatter_tensor", "broadcast", "isend", "send")
# one operation, two names: torch 2.14 renamed the equal-size collectives (labkit.distops); both count under the new
# name, the one lab 11's formulas (:mod:`.traffic`) use, whichever this torch has
_SAME_AS = {"all_gather_into_tensor": "all_gather_single", "reduce_scatter_tensor": "reduce_scatter_single"}


_GROUP_AT = {"all_reduce": 2, "all_gather": 2, "all_gather_single": 2, "all_gather_into_tensor": 2,
             "reduce_scatter": 3, "reduce_scatter_single": 3, "reduce_scatter_tensor": 3, "broadcast": 2, "isend": 2,
             "send": 2}  # the group's position among each function's arguments
_GATHERS = ("all_gather", "all_gather_single", "all_gather_into_tensor")
_SCATTERS = ("reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor")


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class CommMeter:
    """Counts calls and payload bytes per (group name, operation) on this rank while active.

    Only the outermost call is counted: torch's ``send`` posts an ``isend``, and its deprecated collective names
    call the new ones, so a nested call is the same message again. ``isend`` is replaced in ``torch.distributed``
    and in ``distributed_c10d`` alike: ``dist.batch_isend_irecv`` (lab 04's executor, :mod:`labkit.distops`)
    accepts only a ``P2POp`` whose function *is* c10d's ``isend``, and calls it from there."""

    def __init__(self, groups: dict):
        self.names = {id(g): name for name, g in groups.items() if g is not None}
        self.calls = defaultdict(int)    # (group, op) -> calls
        self.payload = defaultdict(int)  # (group, op) -> bytes
        self._saved = {}
        self._depth = 0

    def _name(self, group) -> str:
        import torch.distributed as dist

        if id(group) in self.names:  # first: a mesh dimension that spans every rank is the default group itself
            return self.names[id(group)]
        return "world" if group is None or group is dist.group.WORLD else "other"  # a P2POp holds the default group

    def _wrap(self, op, fn):
        def counted(*args, **kwargs):
            if self._depth:  # inside a counted call: the same message again
                return fn(*args, **kwargs)
            at = _GROUP_AT[op]
            group = kwargs.get("group", args[at] if len(args) > at else None)
            if op in _GATHERS + _SCATTERS:
                # the whole tensor: the output of a gather, the input of a reduce-scatter
                whole = args[0] if op in _GATHERS else args[1]
                nbytes = _nbytes(whole)
            else:
                nbytes = _nbytes(args[0])
            key = (self._name(group), _SAME_AS.get(op, op))
            self.calls[key] += 1
            self.payload[key] += nbytes
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def __enter__(self):
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        if self._saved:
            raise RuntimeError("this CommMeter is already active")
        for op in _WRAPPED:
            fn = getattr(dist, op, None)
            if fn is None:  # a name this torch does not have (torch < 2.14: no *_single)
                continue
            counted = self._wrap(op, fn)
            for mod in (dist, c10d) if op == "isend" else (dist,):
                self._saved[(mod, op)] = getattr(mod, op)
                setattr(mod, op, counted)
        return self

    def __exit__(self, *exc):
        for (mod, op), fn in self._saved.items():
            setattr(mod, op, fn)
        self._saved = {}

    def by_group(self) -> dict:
        """``{group: {op: {"calls", "bytes"}}}``."""
        out: dict = defaultdict(dict)
        for (g, op), n in self.calls.items():
            out[g][op] = {"calls": n, "bytes": self.payload[(g, op)]}
        return dict(out)

    def reset(self) -> None:
        self.calls.clear()
        self.payload.clear()


def wire_bytes(op: str, payload: int, n: int) -> float:
    """Bytes one rank sends for ``payload`` bytes handed to ``op`` over ``n`` ranks with ring algorithms."""
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n * payload
    if op in _GATHERS + _SCATTERS:
        return (n - 1) / n * payload
    if op in ("isend", "send"):
        return float(payload)
    if op == "broadcast":
        return float(payload)
    raise ValueError(f"no wire model for {op!r}")


# --------------------------------------------------------------------------------------------- operators
def _all_gather_seq(x, group):
    """``b × s/n × ...`` on each of n ranks -> ``b × s × ...``, the ranks' slices in order along dim 1."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    x = x.contiguous()
    stacked = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_tensor(stacked, x, group=group)  # rank j's slice at rows j·b ... (j+1)·b - 1
    parts = stacked.view(n, *x.shape).transpose(0, 1)  # b × n × s/n × ...
    return parts.reshape(x.shape[0], n * x.shape[1], *x.shape[2:])


def _reduce_scatter_seq(x, group):
    """``b × s × ...`` partial sums on n ranks -> this rank's ``b × s/n × ...`` slice of their sum."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    b, s = x.shape[0], x.shape[1]
    if s % n:
        raise ValueError(f"sequence length {s} does not split over the {n} tensor-parallel ranks: "
                         f"pass a sequence length that is a multiple of {n} or tp dividing {s}")
    parts = x.reshape(b, n, s // n, *x.shape[2:]).transpose(0, 1).contiguous()  # n × b × s/n × ...
    out = torch.empty(parts.shape[1:], dtype=x.dtype, device=x.device)
    reduce_scatter_tensor(out, parts.view(n * b, *parts.shape[2:]), group=group)
    return out


def _seq_function(name: str, collective, its_gradient) -> type:
    """An autograd function over the sequence: ``collective(x, group)`` in the forward, ``its_gradient(g, group)``
    (the other collective of the pair) on the gradient; ``group`` is not differentiated."""

    class SeqFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return collective(x, group)

        @staticmethod
        def backward(ctx, g):
            return its_gradient(g, ctx.group), None

    SeqFunction.__name__ = SeqFunction.__qualname__ = name
    return SeqFunction


# each is the other's backward: an all-gather's gradient is a reduce-scatter, and a reduce-scatter's an all-gather
_GatherSeq = _seq_function("_GatherSeq", _all_gather_seq, _reduce_scatter_seq)
_ScatterSeq = _seq_function("_ScatterSeq", _reduce_scatter_seq, _all_gather_seq)


def gather_seq(x, group):
    """Forward: all-gather the sequence shards (dim 1). Backward: reduce-scatter the gradient along dim 1."""
    return _GatherSeq.apply(x, group)


def scatter_seq(x, group):
    """Forward: reduce-scatter partial sums along the sequence (dim 1). Backward: all-gather the gradient."""
    return _ScatterSeq.apply(x, group)


class _VocabCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, lo, group):
        import torch.distributed as dist

        z = logits.detach()
        m = z.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m.unsqueeze(-1)
        e = z.exp()
        s = e.sum(dim=-1)
        dist.all_reduce(s, group=group)
        local = targets - lo
        mine = (local >= 0) & (local < z.shape[-1])
        local = local.clamp(0, z.shape[-1] - 1)
        t = z.gather(-1, local.unsqueeze(-1)).squeeze(-1) * mine
        dist.all_reduce(t, group=group)
        ctx.save_for_backward(e / s.unsqueeze(-1), local, mine)
        return s.log() - t

    @staticmethod
    def backward(ctx, g):
        p, local, mine = ctx.saved_tensors
        grad = p.clone()
        grad.scatter_add_(-1, local.unsqueeze(-1), -mine.to(p.dtype).unsqueeze(-1))
        return grad * g.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits, targets, lo: int, group) -> torch.Tensor:
    """Mean cross-entropy over every token, where ``logits`` holds this rank's vocabulary slice
    ``[lo, lo + logits.shape[-1])``. Equals ``F.cross_entropy`` on the gathered logits."""
    per_token = _VocabCE.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), lo, group)
    return per_token.mean()
