"""All-reduce built from point-to-point messages: naive, binomial tree, ring, recursive halving-doubling.

Every algorithm here is written with ``dist.send``/``dist.recv`` (or ``isend``/``irecv``) only, and is
checked against ``dist.all_reduce`` / ``dist.reduce_scatter`` / ``dist.all_gather`` by the tests.

Two halves, kept apart so the first is testable without processes:

* **Schedules** (pure): :func:`schedule` lists, for an algorithm and a world size, every message as
  ``Message(step, src, dst, chunks, op)``. :func:`simulate` replays a schedule on "contribution
  counters" and proves that every rank ends with every rank's data exactly once. The ring on 4 ranks
  (the tensor is cut into 4 chunks; each rank sends one chunk to its right neighbour per step)::

      step:     0      1      2   |   3      4      5        (reduce-scatter | all-gather)
      rank 0:  c0->1  c3->1  c2->1 |  c1->1  c0->1  c3->1
      rank 1:  c1->2  c0->2  c3->2 |  c2->2  c1->2  c0->2
      ...      2(n-1) steps, each moving S/n bytes per rank: 2(n-1)/n * S per rank in all.

* **Execution** (on ranks): :func:`all_reduce` (``algorithm=`` one of :data:`ALGORITHMS`),
  :func:`reduce_scatter` and :func:`all_gather`. Pass ``log=[]`` and each rank appends one dict per
  message it *sends* (step, src, dst, chunks, op, bytes, start, end); the tests check that the
  messages really sent equal the pure schedule.

Lab functions for :func:`labkit.launch` (``ctx`` first: :func:`demo_collectives`, :func:`equivalence_cases`,
:func:`record_messages`, :func:`traced_all_reduce`), the exercise checks and :func:`tour` live in
:mod:`labkit.collectives_lab` and are re-exported here. Measuring and the cost model live in
:mod:`labkit.collectives_bench`; plots and the animation in :mod:`labkit.collectives_plots`.
"""
from __future__ import annotations

import time
import zlib
from collections import Counter
from dataclasses import dataclass

ALGORITHMS = ("naive", "tree", "ring", "halving_doubling", "ring_unchunked")
"""All-reduce algorithms: reduce to rank 0 then broadcast; binomial tree reduce then broadcast;
ring reduce-scatter then all-gather (chunked); recursive halving (reduce-scatter) then doubling
(all-gather), Rabenseifner's algorithm; and the whole tensor passed around the ring (unchunked)."""
SCHEDULES = ALGORITHMS + ("reduce_scatter", "all_gather")
OPS = ("sum", "max", "avg")


# --------------------------------------------------------------------------------------- pure logic
def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` cutting ``numel`` elements into ``parts`` pieces like ``torch.tensor_split``
    (the first ``numel % parts`` pieces are one element longer; pieces may be empty)."""
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an integer >= 0, got {numel!r}")
    if not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be an integer >= 1, got {parts!r}")
    q, r = divmod(numel, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append((start, end))
        start = end
    return out


def _check_algorithm(algorithm: str, allowed=ALGORITHMS) -> str:
    if algorithm not in allowed:
        raise ValueError(f"unknown algorithm {algorithm!r}; pass one of {', '.join(map(repr, allowed))}")
    return algorithm


def _check_world_size(world_size) -> int:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    return world_size


@dataclass(frozen=True)
class Message:
    """One point-to-point message: at ``step``, ``src`` sends chunks ``chunks`` to ``dst``, which either
    reduces them into its copy (``op="reduce"``) or overwrites its copy (``op="copy"``).
    ``data_from`` is set when the payload is another rank's *original* data being forwarded (the
    unchunked ring), rather than the sender's current partial result."""

    step: int
    src: int
    dst: int
    chunks: tuple
    op: str
    data_from: int | None = None


@dataclass
class Schedule:
    algorithm: str
    world_size: int
    n_chunks: int
    messages: list

    @property
    def steps(self) -> int:
        return 1 + max((m.step for m in self.messages), default=-1)

    def at(self, step: int) -> list:
        return [m for m in self.messages if m.step == step]

    def bytes_per_rank(self, nbytes: float) -> list[float]:
        """Bytes each rank sends for a tensor of ``nbytes`` bytes (chunks taken as equal)."""
        out = [0.0] * self.world_size
        for m in self.messages:
            out[m.src] += nbytes * len(m.chunks) / self.n_chunks
        return out


def _hd_layout(n: int):
    """Recursive halving-doubling on a non-power of two: the first ``2r`` ranks pair up, evens fold
    into odds, leaving ``p = 2**floor(log2 n)`` active ranks. Returns (p, r, old->new, new->old)."""
    p = 1 << (n.bit_length() - 1)
    r = n - p
    new = {}
    for i in range(n):
        if i < 2 * r:
            new[i] = i // 2 if i % 2 else None
        else:
            new[i] = i - r
    old = {v: k for k, v in new.items() if v is not None}
    return p, r, new, old


def schedule(algorithm: str, world_size: int) -> Schedule:
    """Every message ``algorithm`` sends on ``world_size`` ranks, step by step (no processes needed)."""
    _check_algorithm(algorithm, SCHEDULES)
    n = _check_world_size(world_size)
    msgs: list[Message] = []
    if algorithm == "naive":
        for k in range(1, n):
            msgs.append(Message(k - 1, k, 0, (0,), "reduce"))
        for k in range(1, n):
            msgs.append(Message(n - 2 + k, 0, k, (0,), "copy"))
        return Schedule(algorithm, n, 1, msgs)
    if algorithm == "tree":
        levels = (n - 1).bit_length()  # ceil(log2 n)
        for k in range(levels):
            d = 1 << k
            msgs += [Message(k, r, r - d, (0,), "reduce") for r in range(n) if r % (2 * d) == d]
        for j in range(levels):
            d = 1 << (levels - 1 - j)
            msgs += [Message(levels + j, r, r + d, (0,), "copy") for r in range(n) if r % (2 * d) == 0 and r + d < n]
        return Schedule(algorithm, n, 1, msgs)
    if algorithm == "ring_unchunked":
        for s in range(n - 1):
            msgs += [Message(s, r, (r + 1) % n, (0,), "reduce", data_from=(r - s) % n) for r in range(n)]
        return Schedule(algorithm, n, 1, msgs)
    if algorithm in ("ring", "reduce_scatter", "all_gather"):
        own = {"ring": 1, "reduce_scatter": 0, "all_gather": 0}[algorithm]  # chunk a rank ends up owning: r + own
        step = 0
        if algorithm in ("ring", "reduce_scatter"):
            for s in range(n - 1):
                msgs += [Message(step, r, (r + 1) % n, ((r + own - 1 - s) % n,), "reduce") for r in range(n)]
                step += 1
        if algorithm in ("ring", "all_gather"):
            for s in range(n - 1):
                msgs += [Message(step, r, (r + 1) % n, ((r + own - s) % n,), "copy") for r in range(n)]
                step += 1
        return Schedule(algorithm, n, n, msgs)
    # halving_doubling
    p, r, new, old = _hd_layout(n)
    everything = tuple(range(p))
    step = 0
    if r:
        msgs += [Message(0, i, i + 1, everything, "reduce") for i in range(0, 2 * r, 2)]
        step = 1
    mask = p // 2
    while mask:  # reduce-scatter by recursive halving: keep one half, send the other
        for v in range(p):
            lo, hi = v & ~(2 * mask - 1), (v & ~(2 * mask - 1)) + 2 * mask  # my range before this step
            mid = (lo + hi) // 2
            send = range(lo, mid) if v & mask else range(mid, hi)
            msgs.append(Message(step, old[v], old[v ^ mask], tuple(send), "reduce"))
        step += 1
        mask //= 2
    mask = 1
    while mask < p:  # all-gather by recursive doubling: send what I have, the range doubles
        for v in range(p):
            lo = v & ~(mask - 1)
            msgs.append(Message(step, old[v], old[v ^ mask], tuple(range(lo, lo + mask)), "copy"))
        step += 1
        mask *= 2
    if r:
        msgs += [Message(step, i + 1, i, everything, "copy") for i in range(0, 2 * r, 2)]
    return Schedule(algorithm, n, p, msgs)


def simulate(sched: Schedule) -> list:
    """Replay ``sched`` on contribution counters: ``states[t][rank][chunk]`` is a ``Counter`` of whose
    data (rank -> times) that chunk holds on that rank *before* step ``t`` (``states[-1]``: at the end).
    A correct all-reduce ends with every counter equal to ``{0: 1, 1: 1, ..., n-1: 1}``."""
    n, c = sched.world_size, sched.n_chunks
    if sched.algorithm == "all_gather":  # rank r starts with only its own block
        state = [[Counter({r: 1}) if k == r else Counter() for k in range(c)] for r in range(n)]
    else:
        state = [[Counter({r: 1}) for _ in range(c)] for r in range(n)]
    states = [[[Counter(x) for x in row] for row in state]]
    for t in range(sched.steps):
        before = states[-1]
        after = [[Counter(x) for x in row] for row in before]
        for m in sched.at(t):
            for k in m.chunks:
                payload = Counter({m.data_from: 1}) if m.data_from is not None else before[m.src][k]
                if m.op == "reduce":
                    after[m.dst][k] = after[m.dst][k] + payload
                else:
                    after[m.dst][k] = Counter(payload)
        states.append(after)
    return states


def final_owners(sched: Schedule) -> dict:
    """For each rank, the chunks that hold every rank's data exactly once at the end."""
    full = Counter(range(sched.world_size))
    end = simulate(sched)[-1]
    return {r: [k for k in range(sched.n_chunks) if end[r][k] == full] for r in range(sched.world_size)}


# --------------------------------------------------------------------------------------- validation
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


def _check_same_everywhere(tensor, what: str = "tensor") -> None:
    """One tiny all-gather of (dtype, shape) so that ranks passing different tensors get a clear error
    on every rank instead of a hang or garbage."""
    import torch
    import torch.distributed as dist

    code = zlib.crc32(str(tensor.dtype).encode())  # the same number for the same dtype on every rank
    if tensor.dim() > 14:
        raise ValueError(f"{what} has {tensor.dim()} dimensions; flatten it to at most 14 first")
    desc = torch.zeros(16, dtype=torch.int64)
    desc[0], desc[1] = code, tensor.dim()
    desc[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    everyone = [torch.empty_like(desc) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, desc)
    if any(not torch.equal(d[2:], everyone[0][2:]) or d[1] != everyone[0][1] for d in everyone):
        shapes = {r: tuple(d[2:2 + int(d[1])].tolist()) for r, d in enumerate(everyone)}
        raise ValueError(f"{what} shapes differ across ranks: {shapes}; every rank must pass a tensor of the same shape")
    if len({int(d[0]) for d in everyone}) > 1:
        raise ValueError(f"{what} dtypes differ across ranks (this rank has {tensor.dtype}); every rank must pass the "
                         f"same dtype")


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


def _check_log(log) -> None:
    if log is not None and not isinstance(log, list):
        raise TypeError(f"log must be a list (pass log=[] to record messages) or None, got {type(log).__name__}")


class _Recorder:
    """Appends one dict per message this rank sends to ``log`` (when a list is given)."""

    def __init__(self, log, rank: int, itemsize: int):
        _check_log(log)
        self.log, self.rank, self.itemsize = log, rank, itemsize

    def __call__(self, step, dst, chunks, op, numel, start, end, data_from=None):
        if self.log is not None and dst is not None:
            self.log.append({"step": step, "src": self.rank, "dst": dst, "chunks": tuple(chunks), "op": op,
                             "bytes": numel * self.itemsize, "start": start, "end": end, "data_from": data_from})


def _exchange(send_buf, dst, recv_buf, src, tag: int, pending_sends: list | None = None) -> None:
    """Send and receive at the same time (isend + irecv, then wait both): a ring step cannot deadlock.
    With ``pending_sends``, only the receive is waited for and the send request is appended there, to be
    waited for later (the caller promises not to write into ``send_buf`` before then)."""
    import torch.distributed as dist

    rq = dist.irecv(recv_buf, src, tag=tag) if recv_buf is not None else None
    sq = dist.isend(send_buf, dst, tag=tag) if send_buf is not None else None
    if rq is not None:
        rq.wait()
    if sq is not None:
        if pending_sends is None:
            sq.wait()
        else:
            pending_sends.append(sq)


# --------------------------------------------------------------------------------------- algorithms
def _naive(flat, op, n, rank, rec):
    import torch
    import torch.distributed as dist

    if rank == 0:  # reduce: rank 0 receives every other rank's tensor in turn
        buf = torch.empty_like(flat)
        for k in range(1, n):
            dist.recv(buf, k, tag=k - 1)
            _reduce_into(flat, buf, op)
        for k in range(1, n):  # broadcast: rank 0 sends the result to every other rank in turn
            t0 = time.perf_counter()
            dist.send(flat, k, tag=n - 2 + k)
            rec(n - 2 + k, k, (0,), "copy", flat.numel(), t0, time.perf_counter())
    else:
        t0 = time.perf_counter()
        dist.send(flat, 0, tag=rank - 1)
        rec(rank - 1, 0, (0,), "reduce", flat.numel(), t0, time.perf_counter())
        dist.recv(flat, 0, tag=n - 2 + rank)


def _tree(flat, op, n, rank, rec):
    import torch
    import torch.distributed as dist

    levels = (n - 1).bit_length()
    buf = torch.empty_like(flat)
    for k in range(levels):  # reduce up a binomial tree: round k pairs ranks 2^k apart
        d = 1 << k
        if rank % (2 * d) == d:
            t0 = time.perf_counter()
            dist.send(flat, rank - d, tag=k)
            rec(k, rank - d, (0,), "reduce", flat.numel(), t0, time.perf_counter())
        elif rank % (2 * d) == 0 and rank + d < n:
            dist.recv(buf, rank + d, tag=k)
            _reduce_into(flat, buf, op)
    for j in range(levels):  # broadcast down the same tree
        d = 1 << (levels - 1 - j)
        if rank % (2 * d) == 0 and rank + d < n:
            t0 = time.perf_counter()
            dist.send(flat, rank + d, tag=levels + j)
            rec(levels + j, rank + d, (0,), "copy", flat.numel(), t0, time.perf_counter())
        elif rank % (2 * d) == d:
            dist.recv(flat, rank - d, tag=levels + j)


def _ring_reduce_scatter(chunks, op, n, rank, rec, own, step0=0):
    """n-1 steps; at step s send chunk (rank+own-1-s) right, receive chunk (rank+own-2-s) from the left and
    reduce it in. Afterwards chunk (rank+own) % n holds every rank's contribution."""
    import torch

    right, left = (rank + 1) % n, (rank - 1) % n
    buf = torch.empty(max(c.numel() for c in chunks), dtype=chunks[0].dtype, device=chunks[0].device)
    sends: list = []  # a chunk sent at step s is not written again in this phase: wait for the sends at the end
    for s in range(n - 1):
        i_send, i_recv = (rank + own - 1 - s) % n, (rank + own - 2 - s) % n
        incoming = buf[: chunks[i_recv].numel()]
        t0 = time.perf_counter()
        _exchange(chunks[i_send], right, incoming, left, tag=step0 + s, pending_sends=sends)
        rec(step0 + s, right, (i_send,), "reduce", chunks[i_send].numel(), t0, time.perf_counter())
        _reduce_into(chunks[i_recv], incoming, op)
    for q in sends:
        q.wait()


def _ring_all_gather(chunks, n, rank, rec, own, step0=0):
    """n-1 steps; rank starts owning chunk (rank+own) % n; at step s it forwards chunk (rank+own-s) and
    receives chunk (rank+own-1-s) straight into place."""
    right, left = (rank + 1) % n, (rank - 1) % n
    sends: list = []  # the chunk sent at step s arrived at step s-1 and is not overwritten again
    for s in range(n - 1):
        i_send, i_recv = (rank + own - s) % n, (rank + own - 1 - s) % n
        t0 = time.perf_counter()
        _exchange(chunks[i_send], right, chunks[i_recv], left, tag=step0 + s, pending_sends=sends)
        rec(step0 + s, right, (i_send,), "copy", chunks[i_send].numel(), t0, time.perf_counter())
    for q in sends:
        q.wait()


def _ring(flat, op, n, rank, rec):
    chunks = [flat[a:b] for a, b in chunk_bounds(flat.numel(), n)]
    _ring_reduce_scatter(chunks, op, n, rank, rec, own=1, step0=0)
    _ring_all_gather(chunks, n, rank, rec, own=1, step0=n - 1)


def _ring_pipelined(flat, op, n, rank, rec, segments: int):
    """The ring's messages, but each chunk travels as ``segments`` pieces and every piece is passed on as
    soon as it has been added in: sending, receiving and adding overlap instead of taking turns (gloo's
    own ring works this way). The log still has one entry per chunk and step, as in :func:`schedule`."""
    import torch
    import torch.distributed as dist

    right, left = (rank + 1) % n, (rank - 1) % n
    chunks = [flat[a:b] for a, b in chunk_bounds(flat.numel(), n)]
    pieces = [chunk_bounds(c.numel(), segments) for c in chunks]
    steps = 2 * (n - 1)
    width = max(c.numel() for c in chunks)
    bufs = [flat.new_empty(width), flat.new_empty(width)]  # two steps in flight: alternate scratch buffers

    def chunk_in(t):  # the chunk received at step t; it is the one sent at step t+1
        return (rank - 1 - t) % n if t < n - 1 else (rank - (t - (n - 1))) % n

    def post_recvs(t):
        c = chunk_in(t)
        into = bufs[t % 2] if t < n - 1 else chunks[c]  # all-gather steps receive straight into place
        return [dist.irecv(into[a:b], left, tag=t * segments + k) for k, (a, b) in enumerate(pieces[c])]

    c = rank % n
    started = [time.perf_counter()] * steps
    recvs = post_recvs(0)
    sends = [dist.isend(chunks[c][a:b], right, tag=k) for k, (a, b) in enumerate(pieces[c])]
    for t in range(steps):
        nxt = post_recvs(t + 1) if t + 1 < steps else None
        c = chunk_in(t)
        if t + 1 < steps:
            started[t + 1] = time.perf_counter()
        for k, (a, b) in enumerate(pieces[c]):
            recvs[k].wait()
            if t < n - 1:
                _reduce_into(chunks[c][a:b], bufs[t % 2][a:b], op)
            if t + 1 < steps:  # forward this piece at once
                sends.append(dist.isend(chunks[c][a:b], right, tag=(t + 1) * segments + k))
        sent = (rank - t) % n if t < n - 1 else (rank + 1 - (t - (n - 1))) % n
        rec(t, right, (sent,), "reduce" if t < n - 1 else "copy", chunks[sent].numel(), started[t], time.perf_counter())
        recvs = nxt
    for q in sends:
        q.wait()


def _ring_unchunked(flat, op, n, rank, rec):
    """Pass whole tensors around the ring: each rank forwards what it received last step, n-1 times.
    Correct, but every rank sends (n-1)*S bytes instead of the chunked ring's 2(n-1)/n*S."""
    import torch

    right, left = (rank + 1) % n, (rank - 1) % n
    outgoing, incoming = flat.clone(), torch.empty_like(flat)
    for s in range(n - 1):
        t0 = time.perf_counter()
        _exchange(outgoing, right, incoming, left, tag=s)
        rec(s, right, (0,), "reduce", flat.numel(), t0, time.perf_counter(), data_from=(rank - s) % n)
        _reduce_into(flat, incoming, op)
        outgoing, incoming = incoming, outgoing


def _halving_doubling(flat, op, n, rank, rec):
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
            t0 = time.perf_counter()
            _exchange(flat, rank + 1, None, None, tag=0)
            rec(0, rank + 1, everything, "reduce", flat.numel(), t0, time.perf_counter())
        elif rank < 2 * r:
            _exchange(None, None, buf, rank - 1, tag=0)
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
            t0 = time.perf_counter()
            _exchange(send, old[v ^ mask], incoming, old[v ^ mask], tag=step)
            rec(step, old[v ^ mask], tuple(range(slo, shi)), "reduce", send.numel(), t0, time.perf_counter())
            _reduce_into(keep, incoming, op)
            step += 1
            mask //= 2
        mask = 1
        while mask < p:  # recursive doubling: swap what each has, the owned range doubles
            lo = v & ~(mask - 1)
            plo = (v ^ mask) & ~(mask - 1)
            t0 = time.perf_counter()
            _exchange(span(lo, lo + mask), old[v ^ mask], span(plo, plo + mask), old[v ^ mask], tag=step)
            rec(step, old[v ^ mask], tuple(range(lo, lo + mask)), "copy", span(lo, lo + mask).numel(), t0,
                time.perf_counter())
            step += 1
            mask *= 2
    else:
        step += 2 * levels
    if r:  # unfold: odd ranks hand the result back to their even partner
        if rank < 2 * r and rank % 2 == 1:
            t0 = time.perf_counter()
            _exchange(flat, rank - 1, None, None, tag=step)
            rec(step, rank - 1, everything, "copy", flat.numel(), t0, time.perf_counter())
        elif rank < 2 * r:
            _exchange(None, None, flat, rank + 1, tag=step)


_IMPLS = {"naive": _naive, "tree": _tree, "ring": _ring, "halving_doubling": _halving_doubling,
          "ring_unchunked": _ring_unchunked}


def all_reduce(tensor, op="sum", algorithm: str = "ring", log: list | None = None, check: bool = True,
               segments: int = 1):
    """All-reduce ``tensor`` in place across the default process group with ``algorithm`` (see
    :data:`ALGORITHMS`), using only point-to-point messages. Returns ``tensor``.

    ``op``: ``"sum"``, ``"max"`` or ``"avg"`` (integer averages round toward zero).
    ``log``: a list to which this rank appends one dict per message it sends.
    ``check``: first verify (one tiny all-gather) that every rank passed the same shape and dtype.
    ``segments``: ring only; > 1 sends each chunk in that many pieces, pipelined (:func:`_ring_pipelined`).
    """
    import torch.distributed as dist

    _check_algorithm(algorithm)
    if not isinstance(segments, int) or isinstance(segments, bool) or segments < 1:
        raise ValueError(f"segments must be an integer >= 1 (pieces per ring chunk), got {segments!r}")
    if segments > 1 and algorithm != "ring":
        raise ValueError(f"segments={segments} applies to algorithm='ring' only; leave it at 1 for {algorithm!r}")
    op = _op_name(op)
    _check_tensor(tensor)
    _check_log(log)
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; run this inside labkit.launch(fn, world_size=...)")
    n, rank = dist.get_world_size(), dist.get_rank()
    if check and n > 1:
        _check_same_everywhere(tensor)
    rec = _Recorder(log, rank, tensor.element_size())
    if n > 1 and segments > 1:
        _ring_pipelined(tensor.view(-1), op, n, rank, rec, segments)
    elif n > 1:
        _IMPLS[algorithm](tensor.view(-1), op, n, rank, rec)
    if op == "avg":
        _finish_avg(tensor, n)
    return tensor


def reduce_scatter(tensor, op="sum", log: list | None = None, check: bool = True):
    """Ring reduce-scatter: return this rank's piece ``torch.tensor_split(flat, world_size)[rank]`` of the
    elementwise reduction of every rank's ``tensor`` (which is left unchanged). n-1 steps, each rank
    sends (n-1)/n of the tensor."""
    import torch.distributed as dist

    op = _op_name(op)
    _check_tensor(tensor)
    _check_log(log)
    n, rank = dist.get_world_size(), dist.get_rank()
    if check and n > 1:
        _check_same_everywhere(tensor)
    work = tensor.reshape(-1).clone()
    chunks = [work[a:b] for a, b in chunk_bounds(work.numel(), n)]
    if n > 1:
        _ring_reduce_scatter(chunks, op, n, rank, _Recorder(log, rank, tensor.element_size()), own=0)
    mine = chunks[rank]
    if op == "avg":
        _finish_avg(mine, n)
    return mine


def all_gather(tensor, log: list | None = None, check: bool = True) -> list:
    """Ring all-gather: return ``[rank 0's tensor, rank 1's tensor, ...]`` on every rank (like
    ``dist.all_gather``). n-1 steps; each rank sends (n-1) tensors' worth, i.e. (n-1)/n of the output."""
    import torch
    import torch.distributed as dist

    _check_tensor(tensor)
    _check_log(log)
    n, rank = dist.get_world_size(), dist.get_rank()
    if check and n > 1:
        _check_same_everywhere(tensor)
    out = torch.empty((n,) + tuple(tensor.shape), dtype=tensor.dtype, device=tensor.device)
    out[rank].copy_(tensor)
    if n > 1:
        _ring_all_gather(list(out.view(n, tensor.numel())), n, rank, _Recorder(log, rank, tensor.element_size()), own=0)
    return list(out.unbind(0))


# --------------------------------------------------------------------------------------- message logs
def merge_logs(per_rank_logs) -> list[dict]:
    """Flatten the per-rank logs returned by :func:`record_messages` through ``launch``, sorted by step."""
    return sorted((m for log in per_rank_logs for m in log), key=lambda m: (m["step"], m["src"]))


def log_matches_schedule(per_rank_logs, algorithm: str, world_size: int) -> bool:
    """True when the messages really sent are exactly those of the pure :func:`schedule`."""
    sent = sorted((m["step"], m["src"], m["dst"], tuple(m["chunks"]), m["op"], m["data_from"])
                  for m in merge_logs(per_rank_logs))
    want = sorted((m.step, m.src, m.dst, m.chunks, m.op, m.data_from) for m in schedule(algorithm, world_size).messages)
    return sent == want


def schedule_from_logs(per_rank_logs, algorithm: str, world_size: int) -> Schedule:
    """A :class:`Schedule` built from the messages the ranks really sent (for :func:`simulate` and the
    animation in :mod:`labkit.collectives_plots`)."""
    msgs = [Message(m["step"], m["src"], m["dst"], tuple(m["chunks"]), m["op"], m["data_from"])
            for m in merge_logs(per_rank_logs)]
    return Schedule(algorithm, world_size, schedule(algorithm, world_size).n_chunks, msgs)


# The lab functions (run on ranks), the exercise checks and the tour live in labkit.collectives_lab, which
# imports this module; they are re-exported lazily so ``from labkit import collectives as C; C.tour()`` works.
_LAB = ("COLLECTIVES", "check_bytes_per_rank", "check_ring_all_reduce", "demo_collectives", "equivalence_cases",
        "record_messages", "tour", "traced_all_reduce")


def __getattr__(name):
    if name in _LAB:
        from . import collectives_lab

        return getattr(collectives_lab, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
