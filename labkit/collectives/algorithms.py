"""All-reduce built from point-to-point messages, executed on real ranks: naive, binomial tree, ring,
recursive halving-doubling; plus ring reduce-scatter and all-gather.

Every algorithm here is written with point-to-point messages only, and is checked against
``dist.all_reduce`` / ``dist.reduce_scatter`` / ``dist.all_gather`` by the tests. Pass ``log=[]`` and each
rank appends one dict per message it *sends* (step, src, dst, chunks, op, bytes, start, end); the tests
check that the messages really sent equal the pure schedule in :mod:`.schedules`.

Every message goes through ``dist.batch_isend_irecv`` (:func:`labkit.distops.p2p`), a step's send and receive in
one batch: that is the form NCCL needs. Unbatched, NCCL queues a rank's ``irecv`` and ``isend`` one behind the
other on one communicator, and a ring step in which every rank posts its receive first waits on itself.

``group=`` (a process group, e.g. ``mesh["tp"].get_group()``) runs a collective among that group's ranks
only: ``n`` and ``rank`` are the size of the group and the position in it, every message names its peer by
group rank (:func:`labkit.distops.p2p` translates it), and the log records group ranks. ``None``: the default
group.
"""
from __future__ import annotations

from .._validate import validate_int
from ..devices import now
from ..distops import p2p, recv, send, wait_all
from .schedules import _check_algorithm, _hd_layout, chunk_bounds
from .validation import _check_log, _check_same_everywhere, _check_tensor, _group_position, _op_name


def _reduce_into(dst, src, op: str) -> None:
    import torch

    if op == "max":
        torch.maximum(dst, src, out=dst)
    else:  # sum, and avg (divided once at the end)
        dst.add_(src)


def _finish_avg(tensor, n: int) -> None:
    if tensor.is_floating_point():
        tensor.div_(n)
    else:  # integers: divide and round toward zero, like C integer division
        tensor.copy_(tensor.div(n, rounding_mode="trunc"))


def _prepare(tensor, log, check: bool, group, collective: str) -> tuple[int, int]:
    """What every collective here does before it communicates: check the tensor and the log, find this rank's
    ``(n, rank)`` in ``group``, and with ``check`` verify that every rank passed the same shape and dtype."""
    _check_tensor(tensor)
    _check_log(log)
    n, rank = _group_position(group, collective)
    if check and n > 1:
        _check_same_everywhere(tensor, group=group)
    return n, rank


class _Recorder:
    """Appends one dict per message this rank sends to ``log`` (when a list is given); ``rank`` and the
    peers are positions in the group the collective runs on."""

    def __init__(self, log, rank: int, itemsize: int, device=None):
        _check_log(log)
        self.log, self.rank, self.itemsize, self.device = log, rank, itemsize, device

    def now(self) -> float:
        """The clock for a message's start and end, read after a synchronise of the device (queued NCCL work
        and kernels done: :func:`labkit.devices.now`); 0.0 when nothing is logged, so an unlogged run is not
        slowed by synchronising at every message."""
        return now(self.device) if self.log is not None else 0.0

    def __call__(self, step, dst, chunks, op, numel, start, end, data_from=None):
        if self.log is not None and dst is not None:
            self.log.append({"step": step, "src": self.rank, "dst": dst, "chunks": tuple(chunks), "op": op,
                             "bytes": numel * self.itemsize, "start": start, "end": end, "data_from": data_from})


def _exchange(send_buf, dst, recv_buf, src, tag: int, pending_sends: list | None = None, *, group) -> None:
    """Send and receive at the same time (one ``batch_isend_irecv``, then wait): a ring step cannot deadlock.
    With ``pending_sends``, only the receive is waited for and the send request is appended there, to be
    waited for later (the caller promises not to write into ``send_buf`` before then). ``dst`` and ``src``
    are ranks in ``group`` (None: the default group); a ``None`` buffer leaves that direction out."""
    sq, rq = p2p([(send_buf, dst, tag)] if send_buf is not None else [],
                 [(recv_buf, src, tag)] if recv_buf is not None else [], group=group)
    wait_all(rq)
    if pending_sends is None:
        wait_all(sq)
    else:
        pending_sends.extend(sq)


# --------------------------------------------------------------------------------------- algorithms
def _naive(flat, op, n, rank, rec, *, group):
    import torch

    if rank == 0:  # reduce: rank 0 receives every other rank's tensor in turn
        buf = torch.empty_like(flat)
        for k in range(1, n):
            recv(buf, k, k - 1, group=group)
            _reduce_into(flat, buf, op)
        for k in range(1, n):  # broadcast: rank 0 sends the result to every other rank in turn
            t0 = rec.now()
            send(flat, k, n - 2 + k, group=group)
            rec(n - 2 + k, k, (0,), "copy", flat.numel(), t0, rec.now())
    else:
        t0 = rec.now()
        send(flat, 0, rank - 1, group=group)
        rec(rank - 1, 0, (0,), "reduce", flat.numel(), t0, rec.now())
        recv(flat, 0, n - 2 + rank, group=group)


def _tree(flat, op, n, rank, rec, *, group):
    import torch

    levels = (n - 1).bit_length()
    buf = torch.empty_like(flat)
    for k in range(levels):  # reduce up a binomial tree: round k pairs ranks 2^k apart
        d = 1 << k
        if rank % (2 * d) == d:
            t0 = rec.now()
            send(flat, rank - d, k, group=group)
            rec(k, rank - d, (0,), "reduce", flat.numel(), t0, rec.now())
        elif rank % (2 * d) == 0 and rank + d < n:
            recv(buf, rank + d, k, group=group)
            _reduce_into(flat, buf, op)
    for j in range(levels):  # broadcast down the same tree
        d = 1 << (levels - 1 - j)
        if rank % (2 * d) == 0 and rank + d < n:
            t0 = rec.now()
            send(flat, rank + d, levels + j, group=group)
            rec(levels + j, rank + d, (0,), "copy", flat.numel(), t0, rec.now())
        elif rank % (2 * d) == d:
            recv(flat, rank - d, levels + j, group=group)


def _ring_reduce_scatter(chunks, op, n, rank, rec, own, step0=0, *, group):
    """n-1 steps; at step s send chunk (rank+own-1-s) right, receive chunk (rank+own-2-s) from the left and
    reduce it in. Afterwards chunk (rank+own) % n holds every rank's contribution."""
    import torch

    right, left = (rank + 1) % n, (rank - 1) % n
    buf = torch.empty(max(c.numel() for c in chunks), dtype=chunks[0].dtype, device=chunks[0].device)
    sends: list = []  # a chunk sent at step s is not written again in this phase: wait for the sends at the end
    for s in range(n - 1):
        i_send, i_recv = (rank + own - 1 - s) % n, (rank + own - 2 - s) % n
        incoming = buf[: chunks[i_recv].numel()]
        t0 = rec.now()
        _exchange(chunks[i_send], right, incoming, left, tag=step0 + s, pending_sends=sends, group=group)
        rec(step0 + s, right, (i_send,), "reduce", chunks[i_send].numel(), t0, rec.now())
        _reduce_into(chunks[i_recv], incoming, op)
    for q in sends:
        q.wait()


def _ring_all_gather(chunks, n, rank, rec, own, step0=0, *, group):
    """n-1 steps; rank starts owning chunk (rank+own) % n; at step s it forwards chunk (rank+own-s) and
    receives chunk (rank+own-1-s) straight into place."""
    right, left = (rank + 1) % n, (rank - 1) % n
    sends: list = []  # the chunk sent at step s arrived at step s-1 and is not overwritten again
    for s in range(n - 1):
        i_send, i_recv = (rank + own - s) % n, (rank + own - 1 - s) % n
        t0 = rec.now()
        _exchange(chunks[i_send], right, chunks[i_recv], left, tag=step0 + s, pending_sends=sends, group=group)
        rec(step0 + s, right, (i_send,), "copy", chunks[i_send].numel(), t0, rec.now())
    for q in sends:
        q.wait()


def _ring(flat, op, n, rank, rec, *, group):
    chunks = [flat[a:b] for a, b in chunk_bounds(flat.numel(), n)]
    _ring_reduce_scatter(chunks, op, n, rank, rec, own=1, step0=0, group=group)
    _ring_all_gather(chunks, n, rank, rec, own=1, step0=n - 1, group=group)


def _ring_pipelined(flat, op, n, rank, rec, segments: int, *, group):
    """The ring's messages, but each chunk travels as ``segments`` pieces and every piece is passed on as
    soon as it has been added in: sending, receiving and adding overlap instead of taking turns (gloo's
    own ring works this way). The log still has one entry per chunk and step, as in :func:`schedule`.

    Each piece's batch holds its send to the right and the matching receive from the left for the same step
    (posted together, as NCCL needs); step t+1's piece k is posted as soon as step t's piece k is in."""
    right, left = (rank + 1) % n, (rank - 1) % n
    chunks = [flat[a:b] for a, b in chunk_bounds(flat.numel(), n)]
    pieces = [chunk_bounds(c.numel(), segments) for c in chunks]
    steps = 2 * (n - 1)
    width = max(c.numel() for c in chunks)
    bufs = [flat.new_empty(width), flat.new_empty(width)]  # two steps in flight: alternate scratch buffers

    def chunk_in(t):  # the chunk received at step t; it is the one sent at step t+1
        return (rank - 1 - t) % n if t < n - 1 else (rank - (t - (n - 1))) % n

    def post(t, k, send_chunk):  # step t's piece k: send it right, receive its counterpart from the left
        c = chunk_in(t)
        a, b = pieces[c][k]
        into = bufs[t % 2] if t < n - 1 else chunks[c]  # all-gather steps receive straight into place
        sa, sb = pieces[send_chunk][k]
        sq, rq = p2p([(chunks[send_chunk][sa:sb], right, t * segments + k)],
                     [(into[a:b], left, t * segments + k)], group=group)
        return sq, rq[0]

    started = [rec.now()] * steps
    sends, recvs = [], []
    for k in range(segments):
        sq, rq = post(0, k, rank % n)
        sends += sq
        recvs.append(rq)
    for t in range(steps):
        c = chunk_in(t)
        if t + 1 < steps:
            started[t + 1] = rec.now()
        nxt = []
        for k, (a, b) in enumerate(pieces[c]):
            recvs[k].wait()
            if t < n - 1:
                _reduce_into(chunks[c][a:b], bufs[t % 2][a:b], op)
            if t + 1 < steps:  # forward this piece at once, with the receive of the next step's piece
                sq, rq = post(t + 1, k, c)
                sends += sq
                nxt.append(rq)
        sent = (rank - t) % n if t < n - 1 else (rank + 1 - (t - (n - 1))) % n
        rec(t, right, (sent,), "reduce" if t < n - 1 else "copy", chunks[sent].numel(), started[t], rec.now())
        recvs = nxt
    wait_all(sends)


def _ring_unchunked(flat, op, n, rank, rec, *, group):
    """Pass whole tensors around the ring: each rank forwards what it received last step, n-1 times.
    Correct, but every rank sends (n-1)*S bytes instead of the chunked ring's 2(n-1)/n*S."""
    import torch

    right, left = (rank + 1) % n, (rank - 1) % n
    outgoing, incoming = flat.clone(), torch.empty_like(flat)
    for s in range(n - 1):
        t0 = rec.now()
        _exchange(outgoing, right, incoming, left, tag=s, group=group)
        rec(s, right, (0,), "reduce", flat.numel(), t0, rec.now(), data_from=(rank - s) % n)
        _reduce_into(flat, incoming, op)
        outgoing, incoming = incoming, outgoing


def _halving_doubling(flat, op, n, rank, rec, *, group):
    import torch

    p, r, new, old = _hd_layout(n)
    bounds = chunk_bounds(flat.numel(), p)

    def span(lo, hi):  # elements of blocks [lo, hi)
        return flat[bounds[lo][0]: bounds[hi - 1][1]]

    everything = tuple(range(p))
    buf = torch.empty_like(flat)
    step = 0
    if r:  # fold: among the first 2r ranks, each even rank hands its data to the odd rank above it
        if rank < 2 * r and rank % 2 == 0:
            t0 = rec.now()
            _exchange(flat, rank + 1, None, None, tag=0, group=group)
            rec(0, rank + 1, everything, "reduce", flat.numel(), t0, rec.now())
        elif rank < 2 * r:
            _exchange(None, None, buf, rank - 1, tag=0, group=group)
            _reduce_into(flat, buf, op)
        step = 1
    v = new[rank]
    levels = p.bit_length() - 1
    if v is not None:
        mask = p // 2
        while mask:  # recursive halving: swap halves with the partner `mask` away, keep one, reduce it
            lo = v & ~(2 * mask - 1)
            mid, hi = lo + mask, lo + 2 * mask
            (klo, khi), (slo, shi) = ((mid, hi), (lo, mid)) if v & mask else ((lo, mid), (mid, hi))
            keep, send = span(klo, khi), span(slo, shi)
            incoming = buf[: keep.numel()]
            t0 = rec.now()
            _exchange(send, old[v ^ mask], incoming, old[v ^ mask], tag=step, group=group)
            rec(step, old[v ^ mask], tuple(range(slo, shi)), "reduce", send.numel(), t0, rec.now())
            _reduce_into(keep, incoming, op)
            step += 1
            mask //= 2
        mask = 1
        while mask < p:  # recursive doubling: swap what each has, the owned range doubles
            lo = v & ~(mask - 1)
            plo = (v ^ mask) & ~(mask - 1)
            t0 = rec.now()
            _exchange(span(lo, lo + mask), old[v ^ mask], span(plo, plo + mask), old[v ^ mask], tag=step,
                      group=group)
            rec(step, old[v ^ mask], tuple(range(lo, lo + mask)), "copy", span(lo, lo + mask).numel(), t0,
                rec.now())
            step += 1
            mask *= 2
    else:
        step += 2 * levels
    if r:  # unfold: odd ranks hand the result back to their even partner
        if rank < 2 * r and rank % 2 == 1:
            t0 = rec.now()
            _exchange(flat, rank - 1, None, None, tag=step, group=group)
            rec(step, rank - 1, everything, "copy", flat.numel(), t0, rec.now())
        elif rank < 2 * r:
            _exchange(None, None, flat, rank + 1, tag=step, group=group)


_IMPLS = {"naive": _naive, "tree": _tree, "ring": _ring, "halving_doubling": _halving_doubling,
          "ring_unchunked": _ring_unchunked}


def all_reduce(tensor, op="sum", algorithm: str = "ring", log: list | None = None, check: bool = True,
               segments: int = 1, group=None):
    """All-reduce ``tensor`` in place across ``group`` (None: the default process group) with ``algorithm``
    (see :data:`ALGORITHMS`), using only point-to-point messages. Returns ``tensor``.

    ``op``: ``"sum"``, ``"max"`` or ``"avg"`` (integer averages round toward zero).
    ``log``: a list to which this rank appends one dict per message it sends; ``src`` and ``dst`` are ranks
    within ``group`` (``dist.get_global_rank(group, r)`` translates them).
    ``check``: first verify (one tiny all-gather) that every rank passed the same shape and dtype.
    ``segments``: ring only; > 1 sends each chunk in that many pieces, pipelined (:func:`_ring_pipelined`).
    ``group``: a process group this rank belongs to (``dist.new_group``, ``mesh["tp"].get_group()``).
    """
    _check_algorithm(algorithm)
    validate_int("segments", segments, minimum=1, hint="the pieces per ring chunk")
    if segments > 1 and algorithm != "ring":
        raise ValueError(f"segments={segments} applies to algorithm='ring' only; leave it at 1 for {algorithm!r}")
    op = _op_name(op)
    n, rank = _prepare(tensor, log, check, group, "all_reduce")
    rec = _Recorder(log, rank, tensor.element_size(), tensor.device)
    if n > 1 and segments > 1:
        _ring_pipelined(tensor.view(-1), op, n, rank, rec, segments, group=group)
    elif n > 1:
        _IMPLS[algorithm](tensor.view(-1), op, n, rank, rec, group=group)
    if op == "avg":
        _finish_avg(tensor, n)
    return tensor


def reduce_scatter(tensor, op="sum", log: list | None = None, check: bool = True, group=None):
    """Ring reduce-scatter: return this rank's piece ``torch.tensor_split(flat, n)[rank]`` of the
    elementwise reduction of every rank's ``tensor`` (which is left unchanged). n-1 steps, each rank
    sends (n-1)/n of the tensor. ``n`` and ``rank`` are the size of ``group`` and the position in it
    (None: the default group); ``log`` as in :func:`all_reduce`, with group ranks."""
    op = _op_name(op)
    n, rank = _prepare(tensor, log, check, group, "reduce_scatter")
    work = tensor.reshape(-1).clone()
    chunks = [work[a:b] for a, b in chunk_bounds(work.numel(), n)]
    if n > 1:
        rec = _Recorder(log, rank, tensor.element_size(), tensor.device)
        _ring_reduce_scatter(chunks, op, n, rank, rec, own=0, group=group)
    mine = chunks[rank]
    if op == "avg":
        _finish_avg(mine, n)
    return mine


def all_gather(tensor, log: list | None = None, check: bool = True, group=None) -> list:
    """Ring all-gather: return ``[group rank 0's tensor, group rank 1's tensor, ...]`` on every rank of
    ``group`` (None: the default group), like ``dist.all_gather``. n-1 steps; each rank sends (n-1) tensors'
    worth, i.e. (n-1)/n of the output. ``log`` as in :func:`all_reduce`, with group ranks."""
    import torch

    n, rank = _prepare(tensor, log, check, group, "all_gather")
    out = torch.empty((n,) + tuple(tensor.shape), dtype=tensor.dtype, device=tensor.device)
    out[rank].copy_(tensor)
    if n > 1:
        rec = _Recorder(log, rank, tensor.element_size(), tensor.device)
        _ring_all_gather(list(out.view(n, tensor.numel())), n, rank, rec, own=0, group=group)
    return list(out.unbind(0))
