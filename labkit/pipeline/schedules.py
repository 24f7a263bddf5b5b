"""Pipeline schedules as pure functions: which forward and backward each stage runs, in order.

A formula module: it writes the papers' symbols (docs/glossary.md). ``p`` is ``n_stages``, the number of
stages (one rank each); ``m`` is ``n_micro``, the number of micro-batches; ``v`` is ``chunks``, the virtual
stages (model chunks) one rank holds in the interleaved schedule. ``stage`` is a stage's index (0 .. p-1) and
``micro`` a micro-batch's (0 .. m-1).

A schedule for ``p`` stages (ranks) and ``m`` micro-batches is a list with one entry per rank; each
entry is that rank's ordered list of :class:`Action` ``(kind, micro, chunk)``: ``kind`` is ``"F"``
(forward) or ``"B"`` (backward), or in a zero-bubble schedule ``"B"`` (the input gradient only) and ``"W"``
(the weight gradient, run later), ``micro`` the micro-batch, ``chunk`` the model chunk held by that
rank (always 0 except in the interleaved schedule, where rank ``r`` holds the virtual stages
``r, r + p, r + 2p, ...``). Sends and receives are implied: the forward of micro-batch ``i`` on
virtual stage ``s`` needs the forward of ``i`` on ``s - 1``; the backward of ``i`` on ``s`` needs the
backward of ``i`` on ``s + 1`` and its own forward; the ``W`` of ``i`` on ``s`` needs only its own ``B`` of ``i``.

The module is long because every schedule lives here beside the simulator and the formulas the tests hold them to.
ZB-V (:func:`zb_v`) places its two chunks per rank in a V rather than a loop: a :class:`Schedule` says which.

Nothing here starts a process: :func:`simulate` plays a schedule with given forward and backward
times and returns its timeline, so schedules are tested (and bubbles predicted) without ranks.
:mod:`labkit.pipeline` runs the same action lists on real ranks.

Time flows to the right; ``F3`` is the forward of micro-batch 3, ``B3`` its backward (p=4, m=8,
backward as long as forward, one column per unit of time)::

    GPipe  rank 0  F0 F1 F2 F3 F4 F5 F6 F7 .. .. .. .. .. .. B7 B6 B5 B4 B3 B2 B1 B0
           rank 3  .. .. .. F0 F1 F2 F3 F4 F5 F6 F7 B7 B6 B5 B4 B3 B2 B1 B0 .. .. ..

    1F1B   rank 0  F0 F1 F2 F3 .. .. .. B0 F4 B1 F5 B2 F6 B3 F7 B4 .. B5 .. B6 .. B7
           rank 3  .. .. .. F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 .. .. ..

Both take ``2(m + p - 1)`` columns; 1F1B's rank 0 holds at most ``p`` unfinished micro-batches
where GPipe's holds ``m`` (Huang et al. 2019; Narayanan et al. 2021).

Zero bubble (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", arXiv 2401.10241): a backward is two
computations, B (the input's gradient, which the previous stage waits for) and W (the weights' gradient,
which nobody waits for). ZB-H1 runs B as soon as it can and slots the W's into what were 1F1B's idle
columns; stage ``s`` delays its W's by ``s`` micro-batches, so every rank holds at most ``p`` micro-batches,
1F1B's peak. Below F, B and W each take one column (1F1B's backward is B and W in one piece, two columns;
p=4, m=8)::

    1F1B   rank 0  F0 F1 F2 F3 .. .. .. .. .. .. B0 B0 F4 B1 B1 F5 B2 B2 F6 B3 B3 F7 B4 B4 .. B5 B5 .. B6 B6 .. B7 B7
           rank 3  .. .. .. F0 B0 B0 F1 B1 B1 F2 B2 B2 F3 B3 B3 F4 B4 B4 F5 B5 B5 F6 B6 B6 F7 B7 B7 .. .. .. .. .. ..

    ZB-H1  rank 0  F0 F1 F2 F3 .. .. .. B0 W0 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 B5 W5 B6 W6 B7 W7
           rank 3  .. .. .. F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 F6 B6 W3 F7 B7 W4 W5 W6 W7

1F1B takes 33 columns, ZB-H1 27: 1F1B idles ``(p-1)(F+B+W)`` per rank, ZB-H1 ``(p-1)(F+B-W)``, a third
of it when F = B = W (the paper's section 3.1; :func:`zb_h1_bubble`, which :func:`simulate` confirms for
``m >= p`` and ``W <= F, B``).
"""
from __future__ import annotations

from typing import NamedTuple

from .._validate import validate_int

SCHEDULES = ("naive", "gpipe", "1f1b", "interleaved", "zb-h1", "zb-v")
KINDS = ("F", "B", "W")  # forward; backward (the input gradient only where the schedule has W); weight gradient
PLACEMENTS = ("loop", "v")  # where a rank's chunks sit: r, r + p, r + 2p, ... ("loop") or r and 2p - 1 - r ("v")


class Action(NamedTuple):
    kind: str  # "F", "B" or "W"
    micro: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.micro}" + (f".{self.chunk}" if self.chunk else "")


class Schedule(list):
    """A schedule (one action list per rank) that says where its chunks sit: ``placement`` "loop" (rank ``r`` holds
    virtual stages ``r, r + p, r + 2p, ...``: every schedule but ZB-V) or "v" (rank ``r`` holds stages ``r`` and
    ``2p - 1 - r``: the model goes down the ranks and back up, so the last rank runs stages ``p - 1`` and ``p``
    one after the other). A plain list of action lists is a "loop" schedule."""

    def __init__(self, ranks=(), placement: str = "loop"):
        super().__init__(ranks)
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement = placement


def placement_of(schedule) -> str:
    """``"loop"`` or ``"v"``: where the schedule's chunks sit (:class:`Schedule`)."""
    return getattr(schedule, "placement", "loop")


def stage_of(rank: int, chunk: int, p: int, placement: str = "loop") -> int:
    """The virtual stage that chunk ``chunk`` of rank ``rank`` runs, of ``p`` ranks."""
    if placement == "v":
        return rank if chunk == 0 else 2 * p - 1 - rank
    return chunk * p + rank


def rank_of_stage(stage: int, p: int, placement: str = "loop") -> int:
    """The rank that holds virtual stage ``stage``: the inverse of :func:`stage_of`."""
    if placement == "v":
        return stage if stage < p else 2 * p - 1 - stage
    return stage % p


def _check_pm(p, m, name_p="n_stages"):
    for name, v in ((name_p, p), ("n_micro", m)):
        validate_int(name, v, minimum=1)


def naive(p: int, m: int = 1) -> list[list[Action]]:
    """No pipelining: each micro-batch goes forward through every stage and back before the next starts.

    With ``m = 1`` this is plain model parallelism (the whole batch at once). Every rank's list is
    ``F0 B0 F1 B1 ...``; the dependencies serialise it across ranks, so only one rank works at a time.
    """
    _check_pm(p, m)
    return [[a for i in range(m) for a in (Action("F", i), Action("B", i))] for _ in range(p)]


def gpipe(p: int, m: int) -> list[list[Action]]:
    """GPipe: every rank runs all ``m`` forwards, then all backwards (last micro-batch first)."""
    _check_pm(p, m)
    return [[Action("F", i) for i in range(m)] + [Action("B", i) for i in reversed(range(m))] for _ in range(p)]


def one_f_one_b_stage(stage: int, p: int, m: int) -> list[Action]:
    """The 1F1B order of one rank: warm-up forwards, then alternate one forward and one backward, then cool-down.

    Rank ``s`` first runs ``min(p - s - 1, m)`` forwards (the later stages need them to start),
    then pairs ``F(w + k), B(k)``, then the remaining backwards.
    """
    _check_pm(p, m)
    validate_int("stage", stage, minimum=0, maximum=p - 1, hint=f"p={p} stages")
    warm = min(p - stage - 1, m)
    out = [Action("F", i) for i in range(warm)]
    for k in range(m - warm):
        out += [Action("F", warm + k), Action("B", k)]
    out += [Action("B", i) for i in range(m - warm, m)]
    return out


def one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """1F1B (PipeDream-flush): same bubble as GPipe, at most ``p`` micro-batches in flight per rank."""
    _check_pm(p, m)
    return [one_f_one_b_stage(s, p, m) for s in range(p)]


def interleaved(p: int, m: int, v: int = 2) -> list[list[Action]]:
    """Interleaved 1F1B (Narayanan et al. 2021): rank ``r`` holds ``v`` chunks (virtual stages r, r+p, ...).

    Micro-batches go through the chunks in groups of ``p``; the bubble shrinks to about
    ``(p - 1) / (v m)`` of the ideal time at the price of ``v`` times more messages. Needs ``m % p == 0``.
    """
    _check_pm(p, m)
    validate_int("chunks v", v, minimum=1)
    if m % p:
        raise ValueError(f"the interleaved schedule needs n_micro to be a multiple of n_stages ({p}); "
                         f"got n_micro={m}: pass n_micro={p * max(1, round(m / p))} or use schedule='1f1b'")
    total = m * v

    def fwd(k):  # k-th forward on a rank -> (micro, chunk)
        return Action("F", (k // (p * v)) * p + k % p, (k // p) % v)

    def bwd(k):
        return Action("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)

    out = []
    for r in range(p):
        warm = min(total, (p - r - 1) * 2 + (v - 1) * p)
        acts = [fwd(k) for k in range(warm)]
        for k in range(total - warm):
            acts += [fwd(warm + k), bwd(k)]
        acts += [bwd(k) for k in range(total - warm, total)]
        out.append(acts)
    return out


def zb_h1_stage(stage: int, p: int, m: int) -> list[Action]:
    """The ZB-H1 order of one rank: 1F1B with each backward split into B (input gradient) and a later W.

    Rank ``s`` runs 1F1B's ``min(p - s - 1, m)`` warm-up forwards, then ``F, B`` pairs, each followed by the W
    of the oldest micro-batch once ``s`` W's are pending (the ``s``-th later stage may hold ``s`` more micro-batches
    than 1F1B gives it, up to 1F1B's peak ``p``), then the remaining W's (Qi et al. 2023, section 3.1).
    """
    _check_pm(p, m)
    validate_int("stage", stage, minimum=0, maximum=p - 1, hint=f"p={p} stages")
    warm = min(p - stage - 1, m)
    out = [Action("F", i) for i in range(warm)]
    n_f, n_w = warm, 0
    for k in range(m):
        if n_f < m:
            out.append(Action("F", n_f))
            n_f += 1
        out.append(Action("B", k))
        if k + 1 - n_w > stage:  # more than `stage` W's pending: run the oldest
            out.append(Action("W", n_w))
            n_w += 1
    return out + [Action("W", i) for i in range(n_w, m)]


def zb_h1(p: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2023): 1F1B's memory (at most ``p`` micro-batches per rank), a third of its bubble when
    F, B and W take equal times."""
    _check_pm(p, m)
    return [zb_h1_stage(s, p, m) for s in range(p)]


def zb_v(p: int, m: int) -> Schedule:
    """ZB-V (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"; the zero-bubble paper's V schedule):
    each rank holds two chunks in a V (stages ``r`` and ``2p - 1 - r``), every backward split in B and W, and at most
    ``2p`` chunk micro-batches held per rank: 1F1B's activation memory, the chunks being half a stage.

    Built greedily, not copied from the paper's figure: the schedule is played with F, B and W each one unit long,
    and whenever a rank is free it runs, in this order of preference, a ready B (the earliest micro-batch; the
    second chunk's first, as it is further down the V), a ready F if it holds fewer than ``2p`` micro-batches (the
    second chunk's first, to finish micro-batches), or the oldest pending W. The order each rank ran is the
    schedule; its dependencies hold in any timing, so it never deadlocks on real ranks either.
    """
    _check_pm(p, m)
    S, limit = 2 * p, 2 * p
    done: dict[tuple, int] = {}          # (kind, micro, stage) -> end time, in units
    next_f = [[0, 0] for _ in range(p)]  # per rank and chunk: the next micro-batch to forward
    ready_b: list[set] = [set() for _ in range(p)]
    pending_w: list[list] = [[] for _ in range(p)]
    held, free_at = [0] * p, [0] * p
    out: list[list[Action]] = [[] for _ in range(p)]
    total, t = 3 * m * 2 * p, 0
    while sum(len(a) for a in out) < total:
        for r in range(p):
            if free_at[r] > t:
                continue
            pick = None
            bs = [(mi, c) for mi, c in ready_b[r]
                  if (stage_of(r, c, p, "v") == S - 1 or done.get(("B", mi, stage_of(r, c, p, "v") + 1), t + 1) <= t)]
            if bs:
                mi, c = min(bs, key=lambda x: (x[0], -x[1]))
                ready_b[r].discard((mi, c))
                pick = Action("B", mi, c)
            elif held[r] < limit:
                for c in (1, 0):
                    mi = next_f[r][c]
                    s = stage_of(r, c, p, "v")
                    if mi < m and (s == 0 or done.get(("F", mi, s - 1), t + 1) <= t):
                        pick = Action("F", mi, c)
                        next_f[r][c] += 1
                        held[r] += 1
                        break
            if pick is None and pending_w[r]:
                pick = pending_w[r].pop(0)
                held[r] -= 1
            if pick is None:
                continue
            out[r].append(pick)
            done[(pick.kind, pick.micro, stage_of(r, pick.chunk, p, "v"))] = t + 1
            free_at[r] = t + 1
            if pick.kind == "F":
                ready_b[r].add((pick.micro, pick.chunk))
            elif pick.kind == "B":
                pending_w[r].append(Action("W", pick.micro, pick.chunk))
        t += 1
    return Schedule(out, placement="v")


def make_schedule(name: str, p: int, m: int, v: int = 2) -> list[list[Action]]:
    """The schedule called ``name`` (one of :data:`SCHEDULES`) for ``p`` ranks and ``m`` micro-batches."""
    if not isinstance(name, str) or name.lower() not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    name = name.lower()
    if name == "naive":
        return naive(p, m)
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "zb-h1":
        return zb_h1(p, m)
    if name == "zb-v":
        return zb_v(p, m)
    return interleaved(p, m, v)


def n_chunks(schedule: list[list[Action]]) -> int:
    return 1 + max((a.chunk for acts in schedule for a in acts), default=0)


def splits_backward(schedule: list[list[Action]]) -> bool:
    """Whether the schedule runs W actions (its B is then the input gradient alone)."""
    return any(a.kind == "W" for acts in schedule for a in acts)


def validate(schedule: list[list[Action]], m: int) -> None:
    """Raise ValueError unless every rank runs each (micro, chunk) forward once, then its backward once (and, in a
    schedule with W actions, after its backward its W once)."""
    v = n_chunks(schedule)
    split = splits_backward(schedule)
    kinds = KINDS if split else ("F", "B")
    for r, acts in enumerate(schedule):
        seen = set()
        for a in acts:
            if a.kind not in KINDS:
                raise ValueError(f"rank {r}: action kind must be 'F', 'B' or 'W', got {a.kind!r}")
            if not (0 <= a.micro < m and 0 <= a.chunk < v):
                raise ValueError(f"rank {r}: {a} is out of range for m={m} micro-batches and {v} chunk(s)")
            if a in seen:
                raise ValueError(f"rank {r}: {a} appears twice")
            if a.kind == "B" and Action("F", a.micro, a.chunk) not in seen:
                raise ValueError(f"rank {r}: backward {a} comes before its forward")
            if a.kind == "W" and Action("B", a.micro, a.chunk) not in seen:
                raise ValueError(f"rank {r}: weight gradient {a} comes before its backward (input gradient)")
            seen.add(a)
        if len(seen) != len(kinds) * m * v:
            what = "a forward, a backward and a weight gradient" if split else "a forward and a backward"
            raise ValueError(f"rank {r} runs {len(seen)} actions; expected {len(kinds) * m * v} ({what} "
                             f"for each of {m} micro-batches and {v} chunk(s))")


def _per_stage(x, S: int, name: str) -> list[float]:
    out = [float(x)] * S if not isinstance(x, (list, tuple)) else [float(t) for t in x]
    if len(out) != S:
        raise ValueError(f"{name} needs one time per virtual stage ({S}), got {len(out)}")
    return out


def simulate(schedule: list[list[Action]], forward: float | list = 1.0, backward: float | list = 2.0,
             comm: float = 0.0, weight: float | list | None = None) -> dict:
    """Play a schedule: each rank runs its actions in order, each waits for the ones it depends on.

    ``forward``/``backward`` are the time of one micro-batch on a virtual stage (a number, or one per
    virtual stage); ``backward`` is the whole backward. In a schedule with W actions (:func:`zb_h1`) ``weight`` of
    it is the W (default: half), and B takes ``backward - weight``; other schedules ignore ``weight``. ``comm`` is
    the delay of a message between stages. Returns ``{"events": [...], "makespan": t, "bubble": fraction idle,
    "peak_in_flight": [per rank]}``; raises ValueError if the schedule deadlocks (some rank waits for an action
    that can never run).
    """
    p = len(schedule)
    if p < 1:
        raise ValueError("schedule has no ranks")
    v = n_chunks(schedule)
    m = max(a.micro for acts in schedule for a in acts) + 1
    validate(schedule, m)
    S = p * v
    place = placement_of(schedule)
    fw, bw = _per_stage(forward, S, "forward"), _per_stage(backward, S, "backward")
    wt = [b / 2 for b in bw] if weight is None else _per_stage(weight, S, "weight")
    split = splits_backward(schedule)
    if split and not all(0 <= w <= b for w, b in zip(wt, bw)):
        raise ValueError(f"weight is the weight-gradient part of the backward: pass 0 <= weight <= backward, "
                         f"got weight={weight!r}, backward={backward!r}")
    dur = {"F": fw, "B": [b - w for b, w in zip(bw, wt)] if split else bw, "W": wt}
    names = {"F": "forward", "B": "backward", "W": "weight"}
    done: dict[tuple, float] = {}  # (kind, micro, virtual stage) -> end time
    pos, clock = [0] * p, [0.0] * p
    events = []
    progressed = True
    while progressed:
        progressed = False
        for r in range(p):
            while pos[r] < len(schedule[r]):
                a = schedule[r][pos[r]]
                s = stage_of(r, a.chunk, p, place)
                if a.kind == "F":
                    deps = [("F", a.micro, s - 1)] if s > 0 else []
                elif a.kind == "B":
                    deps = [("F", a.micro, s)] + ([("B", a.micro, s + 1)] if s < S - 1 else [])
                else:
                    deps = [("B", a.micro, s)]
                if any(d not in done for d in deps):
                    break
                # a message crosses ranks only between stages on two ranks (ZB-V's stages p-1 and p share one)
                ready = max([clock[r]] + [done[d] + (comm if rank_of_stage(d[2], p, place) != r else 0.0)
                                          for d in deps])
                end = ready + dur[a.kind][s]
                events.append({"lane": r, "kind": names[a.kind], "start": ready, "end": end, "label": str(a),
                               "micro": a.micro, "chunk": a.chunk})
                done[(a.kind, a.micro, s)] = clock[r] = end
                pos[r] += 1
                progressed = True
    if any(pos[r] < len(schedule[r]) for r in range(p)):
        stuck = {r: str(schedule[r][pos[r]]) for r in range(p) if pos[r] < len(schedule[r])}
        raise ValueError(f"schedule deadlocks: ranks wait forever at {stuck}")
    makespan = max(clock)
    busy = sum(e["end"] - e["start"] for e in events)
    return {"events": events, "makespan": makespan, "bubble": 1 - busy / (p * makespan) if makespan else 0.0,
            "peak_in_flight": peak_in_flight(schedule)}


def peak_in_flight(schedule: list[list[Action]]) -> list[int]:
    """Per rank, the most micro-batches (x chunks) whose forward ran and whose backward has not: held activations.

    In a schedule with W actions a micro-batch is held until its W (the weight gradient needs the stage's input and
    its output's gradient)."""
    last = "W" if splits_backward(schedule) else "B"
    out = []
    for acts in schedule:
        live = peak = 0
        for a in acts:
            live += 1 if a.kind == "F" else -1 if a.kind == last else 0
            peak = max(peak, live)
        out.append(peak)
    return out


def bubble_fraction(p: int, m: int, v: int = 1) -> float:
    """Theory: the idle fraction of a pipelined step, (p-1)/(v m + p-1) (equal stages, free messages)."""
    _check_pm(p, m)
    return (p - 1) / (v * m + p - 1)


def zb_h1_bubble(p: int, m: int, forward: float = 1.0, backward: float = 2.0, weight: float | None = None,
                 strict: bool = True) -> float:
    """Theory: ZB-H1's idle fraction, (p-1)(F+B-W) / (m(F+B+W) + (p-1)(F+B-W)) (equal stages, free messages).

    ``backward`` is the whole backward and ``weight`` its W part (default half), so B = backward - weight: the
    arguments of :func:`simulate`. Each rank idles (p-1)(F+B-W) where 1F1B's idles (p-1)(F+B+W) (Qi et al. 2023,
    section 3.1). It holds, as :func:`simulate` confirms, for ``m >= p`` and W no longer than F or B; outside them it
    raises, unless ``strict=False`` (the expression as written, for a table of measured times a little off them).
    """
    _check_pm(p, m)
    w = backward / 2 if weight is None else float(weight)
    b = backward - w
    if strict and not (0 <= w <= min(forward, b)):
        raise ValueError(f"the ZB-H1 formula needs 0 <= W <= F and W <= B (B = backward - weight); got F={forward}, "
                         f"B={b}, W={w}: use simulate(zb_h1(p, m), ...) instead")
    if strict and m < p:
        raise ValueError(f"the ZB-H1 formula needs n_micro >= n_stages (every stage reaches its steady phase); got "
                         f"n_micro={m}, n_stages={p}: use simulate(zb_h1(p, m), ...) instead")
    idle = (p - 1) * (forward + b - w)
    return idle / (m * (forward + b + w) + idle)


def ideal_speedup(p: int, m: int, v: int = 1) -> float:
    """Theory: time of the naive schedule over the pipelined one, p m / (m + (p-1)/v)."""
    _check_pm(p, m)
    return p * m / (m + (p - 1) / v)


def format_schedule(schedule: list[list[Action]], forward: float = 1.0, backward: float = 1.0,
                    weight: float | None = None) -> str:
    """A text table like the one in this module's docstring (one column per time unit of the simulation)."""
    sim = simulate(schedule, forward, backward, weight=weight)
    unit = min(e["end"] - e["start"] for e in sim["events"] if e["end"] > e["start"])
    cols = int(round(sim["makespan"] / unit))
    rows = []
    for r in range(len(schedule)):
        cells = [".."] * cols
        for e in sim["events"]:
            if e["lane"] == r:
                for c in range(int(round(e["start"] / unit)), int(round(e["end"] / unit))):
                    cells[c] = e["label"].ljust(2)
        rows.append(f"rank {r}  " + " ".join(cells))
    return "\n".join(rows)
