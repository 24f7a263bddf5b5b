"""All-reduce as a pure schedule: which rank sends which chunk to whom at each step (no processes).

:func:`schedule` lists, for an algorithm and a world size, every message as
``Message(step, src, dst, chunks, op)``. :func:`simulate_messages` replays a schedule on "contribution
counters" and proves that every rank ends with every rank's data exactly once. The ring on 4 ranks
(the tensor is cut into 4 chunks; each rank sends one chunk to its right neighbour per step)::

    step:     0      1      2   |   3      4      5        (reduce-scatter | all-gather)
    rank 0:  c0->1  c3->1  c2->1 |  c1->1  c0->1  c3->1
    rank 1:  c1->2  c0->2  c3->2 |  c2->2  c1->2  c0->2
    ...      2(n-1) steps, each moving S/n bytes per rank: 2(n-1)/n * S per rank in all.

The message logs the executing algorithms write (``log=[]`` in :mod:`.algorithms`) are compared with
these schedules by :func:`log_matches_schedule`: the messages really sent equal the pure schedule.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .._compat import moved_names, warn_renamed
from .._validate import validate_choice, validate_int

ALGORITHMS = ("naive", "tree", "ring", "halving_doubling", "ring_unchunked")
"""All-reduce algorithms: reduce to rank 0 then broadcast; binomial tree reduce then broadcast;
ring reduce-scatter then all-gather (chunked); recursive halving (reduce-scatter) then doubling
(all-gather), Rabenseifner's algorithm; and the whole tensor passed around the ring (unchunked)."""
SCHEDULE_NAMES = ALGORITHMS + ("reduce_scatter", "all_gather")  # every name schedule() takes: the all-reduce
# algorithms and the ring reduce-scatter and all-gather (pipeline.SCHEDULES are pipeline schedules: another idea)
OPS = ("sum", "max", "avg")


# --------------------------------------------------------------------------------------- pure logic
def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` cutting ``numel`` elements into ``parts`` pieces like ``torch.tensor_split``
    (the first ``numel % parts`` pieces are one element longer; pieces may be empty)."""
    numel = validate_int("numel", numel, minimum=0)
    parts = validate_int("parts", parts, minimum=1)
    q, r = divmod(numel, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append((start, end))
        start = end
    return out


def _check_algorithm(algorithm: str, allowed=ALGORITHMS) -> str:
    return validate_choice("algorithm", algorithm, allowed)


def _check_world_size(world_size) -> int:
    return validate_int("world_size", world_size, minimum=1)


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

    def bytes_each_rank(self, nbytes: float) -> list[float]:
        """Bytes each rank sends for a tensor of ``nbytes`` bytes (chunks taken as equal), in rank order."""
        out = [0.0] * self.world_size
        for m in self.messages:
            out[m.src] += nbytes * len(m.chunks) / self.n_chunks
        return out

    def bytes_per_rank(self, nbytes: float) -> list[float]:
        """Deprecated: the old name of :meth:`bytes_each_rank`."""
        warn_renamed("Schedule.bytes_per_rank", "Schedule.bytes_each_rank")
        return self.bytes_each_rank(nbytes)


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
    _check_algorithm(algorithm, SCHEDULE_NAMES)
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


def simulate_messages(sched: Schedule) -> list:
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
    end = simulate_messages(sched)[-1]
    return {r: [k for k in range(sched.n_chunks) if end[r][k] == full] for r in range(sched.world_size)}


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
    """A :class:`Schedule` built from the messages the ranks really sent (for :func:`simulate_messages` and the
    animation in :mod:`labkit.collectives.plots`)."""
    msgs = [Message(m["step"], m["src"], m["dst"], tuple(m["chunks"]), m["op"], m["data_from"])
            for m in merge_logs(per_rank_logs)]
    return Schedule(algorithm, world_size, schedule(algorithm, world_size).n_chunks, msgs)


def ring_traffic_problems(log, rank: int, world_size: int, numel: int, itemsize: int) -> list[str]:
    """What one rank's message log shows that a ring all-reduce of ``numel`` elements would not do: messages
    to anyone but the right neighbour (or receives from anyone but the left one), a message bigger than one
    chunk, or a total outside 2(n-1) chunks (chunks of ``torch.tensor_split``, so up to one element of rounding
    each). ``log`` entries are dicts with ``src``, ``dst``, ``bytes`` and optionally ``kind`` (``"send"``, the
    default, or ``"recv"``): the logs of :mod:`.algorithms` (sends) and of :func:`.validation.watch_p2p` (both).
    An empty list means the traffic is a ring's."""
    n = _check_world_size(world_size)
    if n == 1:
        return []
    right, left = (rank + 1) % n, (rank - 1) % n
    sends = [m for m in log if m.get("kind", "send") == "send"]
    recvs = [m for m in log if m.get("kind") == "recv"]
    out = []
    to = Counter(m["dst"] for m in sends if m["dst"] != right)
    if to:
        out.append(f"rank {rank} sent {sum(to.values())} message(s) to rank(s) {sorted(to, key=str)}; in a ring each "
                   f"rank sends only to its right neighbour, (rank + 1) % n = {right}")
    frm = Counter(m["src"] for m in recvs if m["src"] != left)
    if frm:
        who = ["any rank (src=None)" if s is None else s for s in frm]
        out.append(f"rank {rank} received {sum(frm.values())} message(s) from {who}; in a ring each rank receives "
                   f"only from its left neighbour, (rank - 1) % n = {left}")
    chunk_lo, chunk_hi = numel // n * itemsize, -(-numel // n) * itemsize
    biggest = max((m["bytes"] for m in sends), default=0)
    if biggest > chunk_hi:
        out.append(f"rank {rank} sent a message of {biggest} bytes, more than one chunk ({numel} elements cut into "
                   f"{n} chunks: at most {chunk_hi} bytes each); a ring sends one chunk per step")
    total, S = sum(m["bytes"] for m in sends), numel * itemsize
    if total > 2 * (n - 1) * chunk_hi:
        whole = " (that is (n-1)·S: the whole tensor passed around the ring)" if total == (n - 1) * S else ""
        out.append(f"rank {rank} sent {total} bytes in all{whole}, more than the {2 * (n - 1)} chunks of a ring "
                   f"all-reduce (at most {2 * (n - 1) * chunk_hi} bytes)")
    elif total < 2 * (n - 1) * chunk_lo:
        out.append(f"rank {rank} sent {total} bytes in all, fewer than the {2 * (n - 1)} chunks of a ring all-reduce "
                   f"(at least {2 * (n - 1) * chunk_lo} bytes): is the reduce-scatter or the all-gather phase missing?")
    return out


# The lab functions (run on ranks), the exercise checks and the tour live in labkit.collectives.lab.

__getattr__ = moved_names(__name__, {"SCHEDULES": "labkit.collectives.schedules:SCHEDULE_NAMES",
                                     "simulate": "labkit.collectives.schedules:simulate_messages"})
