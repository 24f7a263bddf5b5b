"""``torch.distributed`` calls written the way every backend and every admitted torch accepts them.

Two rules of the GPU path (DESIGN, "Pitfalls already known") live here, beside :mod:`labkit.devices`' three:

4. **Hand-written point-to-point goes through** ``dist.batch_isend_irecv``. With the device bound when the
   process group starts (the launcher passes ``device_id``), NCCL runs a rank's unbatched ``isend``/``irecv``
   on one communicator, in the order they were posted: a ring step in which every rank posts its receive
   before its send waits on itself (each rank's send sits behind its own receive, which waits for the
   neighbour's send, which sits behind the neighbour's receive, ...). A batch is one NCCL group call, whose
   sends and receives progress together. gloo runs a batch as separate messages, so the same code serves
   both. :func:`p2p` posts one exchange (its sends and its receives) as one batch.
5. **Collective names the oldest admitted torch has.** torch 2.14 renamed the equal-size collectives
   (``all_gather_single``, ``reduce_scatter_single``) and deprecated the old names
   (``all_gather_into_tensor``, ``reduce_scatter_tensor``, which every torch since 1.13 has; 2.11 has only
   these). :func:`all_gather_tensor` and :func:`reduce_scatter_tensor` call the new name where this torch has
   it (no deprecation warning) and the old one elsewhere. They look the name up on ``torch.distributed`` at
   each call, so whatever wraps the module's functions for a while (lab 11's ``CommMeter``, lab 01's
   ``watch_p2p``, a test that hides the new names) sees the call.

Nothing here starts a process; every function runs inside a rank whose process group is initialised.
"""
from __future__ import annotations

from typing import Iterable

__all__ = ["require_dist", "p2p", "send", "recv", "wait_all", "all_gather_tensor", "reduce_scatter_tensor"]



def require_dist(group=None) -> int:
    """The world size of ``group``; a clear error when no process group is running (a wrapper or optimiser made
    outside a rank function)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("no process group: run this inside a rank function started by labkit.launch(fn, "
                           "world_size=N) (or torchrun), where torch.distributed is already initialised")
    return dist.get_world_size(group)

def _global(group, peer: int) -> int:
    """``peer``, a rank in ``group``, as a rank of the default group (what ``P2POp(peer=...)`` takes on every
    admitted torch; ``group_peer=`` is newer)."""
    import torch.distributed as dist

    return peer if group is None else dist.get_global_rank(group, peer)


def p2p(sends: Iterable = (), recvs: Iterable = (), *, group=None) -> tuple[list, list]:
    """Post one exchange as one ``dist.batch_isend_irecv``: ``sends`` and ``recvs`` are ``(tensor, peer, tag)``
    triples, ``peer`` a rank in ``group`` (None: the default group, so a global rank). Returns
    ``(send_requests, recv_requests)``, one request per triple, in order; ``.wait()`` on each.

    Within a batch the order of sends and receives does not matter (it cannot deadlock); between two ranks in
    one direction, messages match in the order they were posted, on NCCL regardless of ``tag``. When the backend
    coalesces the batch into one request (NCCL), every triple's request is that one: waiting for a receive then
    also waits for the sends posted with it.
    """
    import torch.distributed as dist

    sends, recvs = list(sends), list(recvs)
    ops = [dist.P2POp(dist.irecv, t, _global(group, peer), group=group, tag=tag) for t, peer, tag in recvs]
    ops += [dist.P2POp(dist.isend, t, _global(group, peer), group=group, tag=tag) for t, peer, tag in sends]
    if not ops:
        return [], []
    works = dist.batch_isend_irecv(ops)
    if len(works) != len(ops):
        if len(works) != 1:
            raise RuntimeError(f"dist.batch_isend_irecv returned {len(works)} requests for {len(ops)} messages: "
                               f"expected one per message (gloo) or one for the batch (NCCL)")
        works = works * len(ops)
    return works[len(recvs):], works[:len(recvs)]


def send(tensor, peer: int, tag: int = 0, *, group=None) -> None:
    """Send ``tensor`` to ``peer`` (a rank in ``group``) and wait: ``dist.send``, as a batch of one."""
    wait_all(p2p([(tensor, peer, tag)], group=group)[0])


def recv(tensor, peer: int, tag: int = 0, *, group=None) -> None:
    """Receive into ``tensor`` from ``peer`` (a rank in ``group``) and wait: ``dist.recv``, as a batch of one."""
    wait_all(p2p(recvs=[(tensor, peer, tag)], group=group)[1])


def wait_all(requests: Iterable) -> None:
    """Wait for each request (a request listed twice, as :func:`p2p` gives for a coalesced batch, is harmless)."""
    for q in requests:
        q.wait()


def all_gather_tensor(output, input, group=None, async_op: bool = False):
    """All-gather equal-size ``input`` tensors into ``output`` (group rank ``j``'s at rows ``j·len(input)``...):
    ``dist.all_gather_single`` where this torch has it, else ``dist.all_gather_into_tensor`` (torch < 2.14)."""
    import torch.distributed as dist

    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


def reduce_scatter_tensor(output, input, group=None, async_op: bool = False):
    """Sum ``input`` over ``group`` and keep this rank's equal slice in ``output``: ``dist.reduce_scatter_single``
    where this torch has it, else ``dist.reduce_scatter_tensor`` (torch < 2.14)."""
    import torch.distributed as dist

    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)
