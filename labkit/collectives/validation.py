"""What the collectives check before they communicate: the tensor, the op, the log, the process group and this
rank's place in it (:func:`_group_position`; :func:`_rank_world` for lab 03's layers), and that every rank
passed the same shape and dtype (:func:`ranks_agree`, the course's one "same on every rank" check); and, for
the exercise checks, what a learner's code really did: :func:`watch_p2p` records every point-to-point message
in the log format of :mod:`.algorithms` (torch's collectives refused, labkit's own all-reduce named). Which
library functions an answer called is :func:`labkit.checks.calls_to`."""
from __future__ import annotations

import os
import sys
import zlib
from contextlib import contextmanager

from .schedules import OPS


def _op_name(op) -> str:
    if isinstance(op, str):
        name = {"average": "avg", "mean": "avg"}.get(op.lower(), op.lower())
        if name in OPS:
            return name
    else:
        import torch.distributed as dist

        for name, ro in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("avg", dist.ReduceOp.AVG)):
            if op == ro:
                return name
    raise ValueError(f"unsupported reduction op {op!r}; pass 'sum', 'max' or 'avg' (or dist.ReduceOp.SUM/MAX/AVG)")


def _check_tensor(tensor, what: str = "tensor"):
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}; wrap data with torch.tensor(...)")
    if not tensor.is_contiguous():
        raise ValueError(f"{what} is not contiguous (a transposed or strided view); pass tensor.contiguous() "
                         f"and copy the result back if you need it in the original view")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{what} has dtype {tensor.dtype}; pass a real numeric tensor (float32, float64, int64, ...)")
    return tensor


def _describe_group(group) -> str:
    """``"the default group"`` or ``"the group of global ranks [0, 1]"``, for messages."""
    import torch.distributed as dist

    if group is None or group is dist.GroupMember.WORLD:
        return "the default group"
    if isinstance(group, dist.ProcessGroup):
        return f"the group of global ranks {dist.get_process_group_ranks(group)}"
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        return f"the group (dist.new_group gave this process its placeholder for non-members, {group!r})"
    return f"group={group!r}"


def _group_position(group, fn: str) -> tuple[int, int]:
    """``(size, rank)`` of this process within ``group`` (None: the default group), as ``dist.get_world_size(group)``
    and ``dist.get_rank(group)``; refuses a missing ``torch.distributed``, a ``group`` that is not a process group,
    and a group this process is not in (``dist.new_group`` hands non-members a placeholder)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(f"torch.distributed is not initialised; run {fn} inside labkit.launch(fn, world_size=...)")
    outsider = isinstance(group, int) and not isinstance(group, bool) and group == dist.GroupMember.NON_GROUP_MEMBER
    if group is not None and not outsider and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (from dist.new_group(ranks) or "
                        f"mesh['tp'].get_group()) or None for the default group, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{fn}: this process (global rank {dist.get_rank()}) is not in {_describe_group(group)}; "
                         f"call it only on the group's own ranks, or pass group=None for the default group")
    return dist.get_world_size(group), rank


def _rank_world(rank, world, group, who: str) -> tuple[int, int]:
    """``(rank, world)`` of code split over ``group``'s ranks (lab 03's layers): the values given, the missing ones
    from the group (None: the default group). Given values must agree with a group; without one, both given, no
    ``torch.distributed`` is needed."""
    if group is None and rank is not None and world is not None:
        return rank, world
    g_world, g_rank = _group_position(group, who)
    if group is not None and (rank not in (None, g_rank) or world not in (None, g_world)):
        raise ValueError(f"{who} got rank={rank!r}, world={world!r}, but this process is rank {g_rank} of {g_world} in "
                         f"{_describe_group(group)}; pass group= alone (rank and world then come from it), or "
                         f"rank={g_rank}, world={g_world}")
    return (g_rank if rank is None else rank), (g_world if world is None else world)


def ranks_agree(values, group=None) -> bool:
    """True when every rank passed the same list of integers (one MAX and one MIN all-reduce).

    The one "same on every rank" check of the course: the collectives use it for shapes and dtypes,
    the DDP wrappers for the model's signature. Every rank gets the same answer, so all of them can
    raise together instead of one hanging.
    """
    import torch
    import torch.distributed as dist

    from ..devices import group_device

    hi = torch.tensor(list(values), dtype=torch.int64, device=group_device(group))  # NCCL needs it on the GPU
    lo = hi.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    return bool(torch.equal(hi, lo))


def _check_same_everywhere(tensor, what: str = "tensor", group=None) -> None:
    """Ranks passing different tensors get a clear error on every rank of ``group`` (None: the default group)
    instead of a hang or garbage; the ranks it names are ranks within the group."""
    import torch
    import torch.distributed as dist

    code = zlib.crc32(str(tensor.dtype).encode())  # the same number for the same dtype on every rank
    if tensor.dim() > 14:
        raise ValueError(f"{what} has {tensor.dim()} dimensions; flatten it to at most 14 first")
    desc = [0] * 16
    desc[0], desc[1] = code, tensor.dim()
    desc[2:2 + tensor.dim()] = list(tensor.shape)
    if ranks_agree(desc, group=group):
        return
    from ..devices import group_device

    mine = torch.tensor(desc, dtype=torch.int64, device=group_device(group))
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)  # only on disagreement, to say which rank had what
    where = "" if group is None else f" of {_describe_group(group)} (keys: ranks within it)"
    if any(not torch.equal(d[1:], everyone[0][1:]) for d in everyone):
        shapes = {r: tuple(d[2:2 + int(d[1])].tolist()) for r, d in enumerate(everyone)}
        raise ValueError(f"{what} shapes differ across ranks{where}: {shapes}; every rank must pass a tensor of the "
                         f"same shape")
    raise ValueError(f"{what} dtypes differ across ranks{where} (this rank has {tensor.dtype}); every rank must "
                     f"pass the same dtype")


def _check_log(log) -> None:
    if log is not None and not isinstance(log, list):
        raise TypeError(f"log must be a list (pass log=[] to record messages) or None, got {type(log).__name__}")


REFUSED = ("all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter", "all_gather_into_tensor",
           "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter")
_ALGORITHMS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "algorithms.py")


def _labkit_caller() -> str | None:
    """The outermost function of labkit's own algorithms (``all_reduce``, ...) on the call stack, if any."""
    f, found = sys._getframe(1), None
    while f is not None:
        if os.path.abspath(f.f_code.co_filename) == _ALGORITHMS_FILE:
            found = f.f_code.co_name
        f = f.f_back
    return found


@contextmanager
def watch_p2p(log: list, refuse=REFUSED):
    """While active, every ``dist.send/recv/isend/irecv`` on this rank (also through ``batch_isend_irecv``)
    appends ``{"step", "kind": "send"|"recv", "src", "dst", "bytes", "call", "via"}`` to ``log`` (``via``: the
    labkit all-reduce function that sent it, or None), and the collectives in ``refuse`` raise an
    ``AssertionError`` that says what to use instead. Everything is restored on exit."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    _check_log(log)
    rank = dist.get_rank()
    saved = {}

    def patch(name, fn):
        for mod in (dist, c10d):
            if hasattr(mod, name):
                saved[(mod, name)] = getattr(mod, name)
                setattr(mod, name, fn)

    depth = [0]  # a message is logged once, by the outermost call (torch's send is built on isend)

    def recorder(name, orig, kind):
        keys = ("dst", "group_dst") if kind == "send" else ("src", "group_src")

        def wrapped(tensor, *args, **kwargs):
            if depth[0]:
                return orig(tensor, *args, **kwargs)
            peer = args[0] if args else next((kwargs[k] for k in keys if kwargs.get(k) is not None), None)
            log.append({"step": len(log), "kind": kind, "src": rank if kind == "send" else peer,
                        "dst": peer if kind == "send" else rank, "bytes": tensor.numel() * tensor.element_size(),
                        "call": name, "via": _labkit_caller()})
            depth[0] += 1
            try:
                return orig(tensor, *args, **kwargs)
            finally:
                depth[0] -= 1
        wrapped.__name__ = wrapped.__qualname__ = name
        return wrapped

    def refuser(name):
        def refused(*args, **kwargs):
            via = _labkit_caller()
            if via:
                raise AssertionError(f"you called labkit.collectives.{via}, labkit's own implementation: write the "
                                     f"algorithm yourself with dist.P2POp and dist.batch_isend_irecv (or send/recv)")
            raise AssertionError(f"you called dist.{name}, torch's own collective: this exercise builds it from "
                                 f"point-to-point messages only: dist.P2POp and dist.batch_isend_irecv (or send/recv)")
        refused.__name__ = name
        return refused

    try:
        for name, kind in (("send", "send"), ("isend", "send"), ("recv", "recv"), ("irecv", "recv")):
            patch(name, recorder(name, getattr(c10d, name), kind))
        for name in refuse:
            if hasattr(c10d, name):
                patch(name, refuser(name))
        yield log
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
