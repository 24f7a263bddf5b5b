"""Pictures for Lab 01: collectives rank by rank, message schedules (static and animated), bandwidth curves.

Every function takes an optional matplotlib ``ax`` (or ``fig``) and returns what it drew on.
A schedule can be the pure :func:`labkit.collectives.schedule` or one rebuilt from the messages the
ranks really sent (:func:`labkit.collectives.schedule_from_logs`).
"""
from __future__ import annotations

import math
from collections import Counter

from ..viz import axes
from .schedules import Schedule, simulate_messages

RANK_COLOURS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d",
                "#bab0ac", "#eeca3b"]


def _colour(rank: int) -> str:
    return RANK_COLOURS[rank % len(RANK_COLOURS)]


# one colour per algorithm in every chart of the lab, whatever order the rows come in (issue 31: ring and tree
# swapped colours between panels); the library is black, as a reference line
ALGORITHM_COLOURS = {"naive": "#9d755d", "tree": "#4c78a8", "ring": "#e45756", "halving_doubling": "#54a24b",
                     "ring_unchunked": "#f58518", "ring_pipelined": "#b279a2", "p2p": "#72b7b2",
                     "reduce_scatter": "#eeca3b", "all_gather": "#ff9da6", "library": "#000000"}


def algorithm_colour(name: str) -> str:
    """The colour ``name`` has in every chart of lab 01 (an unknown name gets a grey, not an error)."""
    return ALGORITHM_COLOURS.get(name, "#7f7f7f")


def size_axis(ax, lo: float, hi: float, every: int = 2, axis: str = "x") -> None:
    """A log-2 bytes axis from ``lo`` to ``hi`` labelled ``64 B``, ``1 KiB``, ... at every ``every``-th power of
    two, and no minor labels: the labels stay short and apart on a narrow panel."""
    if not 0 < lo <= hi:
        raise ValueError(f"size_axis needs 0 < lo <= hi, got lo={lo!r}, hi={hi!r}")
    k_lo, k_hi = math.ceil(math.log2(lo)), math.floor(math.log2(hi))
    ticks = [2.0 ** k for k in range(k_lo, k_hi + 1) if (k - k_lo) % every == 0]
    units = (("GiB", 30), ("MiB", 20), ("KiB", 10), ("B", 0))
    labels = []
    for t in ticks:
        k = int(round(math.log2(t)))
        unit, shift = next((u, sh) for u, sh in units if k >= sh)
        labels.append(f"{2 ** (k - shift)} {unit}")
    if axis == "x":
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, labels)
        ax.xaxis.set_minor_locator(_null_locator())
    else:
        ax.set_yscale("log", base=2)
        ax.set_yticks(ticks, labels)
        ax.yaxis.set_minor_locator(_null_locator())


def plain_log_y(ax) -> None:
    """A log y axis labelled with plain numbers (``2``, ``10``, ``40``) at its major ticks only: the minor
    ``3×10^1``-style labels matplotlib adds on a short decade crowd into each other."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _null_locator():
    from matplotlib.ticker import NullLocator

    return NullLocator()


def plot_collective(results, name: str, axes=None):
    """Before/after panels of one collective from :func:`labkit.collectives.demo_collectives` results
    (one dict per rank). Each cell is coloured by the rank its value came from (rank r starts with
    values 10r+1, 10r+2, ...); reduced results are dark grey (``dist.reduce`` leaves the other ranks'
    buffers as scratch: light grey)."""
    import matplotlib.pyplot as plt

    if name not in results[0]:
        raise ValueError(f"no collective {name!r} in these results; pass one of {list(results[0])}")
    n = len(results)
    width = max(max(len(r[name]["before"]), len(r[name]["after"])) for r in results)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(2 + 0.9 * width * 2, 0.6 + 0.5 * n))
    origin = {v: r for r, res in enumerate(results) for v in res[name]["before"]}  # value -> rank it started on
    reduced = name in ("reduce", "all_reduce", "reduce_scatter")
    for ax, when in zip(axes, ("before", "after")):
        for rank, res in enumerate(results):
            for j, v in enumerate(res[name][when]):
                if when == "after" and reduced:
                    colour = "#555555" if (name != "reduce" or rank == 0) else "#bbbbbb"
                else:
                    colour = _colour(origin[v]) if v in origin else "#999999"
                ax.add_patch(plt.Rectangle((j, rank), 0.95, 0.9, color=colour, alpha=0.85))
                ax.text(j + 0.47, rank + 0.45, str(v), ha="center", va="center", fontsize=8, color="white")
        ax.set_xlim(0, width)
        ax.set_ylim(n, 0)
        ax.set_yticks([i + 0.45 for i in range(n)])
        ax.set_yticklabels([f"rank {i}" for i in range(n)])
        ax.set_xticks([])
        ax.set_title(f"{name}: {when}")
        for s in ax.spines.values():
            s.set_visible(False)
    return axes


def _positions(n: int):
    return [(math.cos(math.pi / 2 - 2 * math.pi * r / n), math.sin(math.pi / 2 - 2 * math.pi * r / n))
            for r in range(n)]


def draw_step(sched: Schedule, step: int, ax=None):
    """Ranks on a circle and an arrow for every message of ``step``, labelled with its chunks
    (green: the receiver adds it in; blue: the receiver overwrites its copy)."""
    import matplotlib.pyplot as plt

    ax = axes(ax, (4, 4))
    n = sched.world_size
    pos = _positions(n)
    ax.clear()
    for r, (x, y) in enumerate(pos):
        ax.add_patch(plt.Circle((x, y), 0.16, color=_colour(r), zorder=3))
        ax.text(x, y, str(r), ha="center", va="center", color="white", fontsize=11, zorder=4, weight="bold")
    msgs = sched.at(step)
    for m in msgs:
        (x0, y0), (x1, y1) = pos[m.src], pos[m.dst]
        dx, dy = x1 - x0, y1 - y0
        d = math.hypot(dx, dy) or 1.0
        ox, oy = -dy / d * 0.06, dx / d * 0.06  # shift sideways so a<->b exchanges show two arrows
        sx, sy, ex, ey = (x0 + dx / d * 0.18 + ox, y0 + dy / d * 0.18 + oy,
                          x1 - dx / d * 0.18 + ox, y1 - dy / d * 0.18 + oy)
        colour = "#54a24b" if m.op == "reduce" else "#4c78a8"
        ax.annotate("", xy=(ex, ey), xytext=(sx, sy), arrowprops=dict(arrowstyle="->", color=colour, lw=1.8))
        label = _chunk_label(m.chunks, sched.n_chunks) if m.data_from is None else f"data of {m.data_from}"
        ax.text((sx + ex) / 2 + ox * 2, (sy + ey) / 2 + oy * 2, label, fontsize=7, ha="center", va="center",
                color=colour)
    phase = {"reduce": "reduce", "copy": "copy"}.get(msgs[0].op, "") if msgs else "idle"
    ax.set_title(f"{sched.algorithm}, {n} ranks: step {step + 1}/{sched.steps} ({phase})", fontsize=9)
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax


def _chunk_label(chunks, n_chunks) -> str:
    if n_chunks == 1 or len(chunks) == n_chunks:
        return "all"
    if len(chunks) == 1:
        return f"c{chunks[0]}"
    return f"c{chunks[0]}-{chunks[-1]}"


def plot_chunk_state(sched: Schedule, step: int, ax=None, states=None):
    """A rank x chunk grid *before* ``step`` (``step = sched.steps``: at the end): each cell shows how many
    ranks' data it holds; dark means complete (all n, each once)."""
    import numpy as np

    ax = axes(ax, (4, 3))
    ax.clear()
    states = states if states is not None else simulate_messages(sched)
    st = states[step]
    n, c = sched.world_size, sched.n_chunks
    full = Counter(range(n))
    grid = np.array([[sum(st[r][k].values()) for k in range(c)] for r in range(n)], dtype=float)
    ax.imshow(grid, cmap="Greens", vmin=0, vmax=max(n, 1), aspect="auto")
    for r in range(n):
        for k in range(c):
            txt = f"{int(grid[r, k])}/{n}" + (" !" if st[r][k] != full and grid[r, k] >= n else "")
            ax.text(k, r, txt, ha="center", va="center", fontsize=8, color="white" if grid[r, k] > n / 2 else "black")
    ax.set_xticks(range(c))
    ax.set_xticklabels([f"c{k}" for k in range(c)] if c > 1 else ["whole tensor"])
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"rank {r}" for r in range(n)])
    when = "at the end" if step >= sched.steps else f"before step {step + 1}"
    ax.set_title(f"contributions per chunk, {when}", fontsize=9)
    return ax


def animate(sched: Schedule, interval: int = 900):
    """A matplotlib animation of the schedule: messages (left) and what each chunk holds (right), one
    frame per step plus the final state. Show it with ``HTML(anim.to_jshtml())``."""
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    states = simulate_messages(sched)

    def frame(t):
        if t < sched.steps:
            draw_step(sched, t, a1)
        else:
            a1.clear()
            a1.axis("off")
            a1.set_title(f"{sched.algorithm}: done after {sched.steps} steps", fontsize=9)
        plot_chunk_state(sched, t, a2, states)
        return []

    anim = FuncAnimation(fig, frame, frames=sched.steps + 1, interval=interval, blit=False)
    plt.close(fig)
    return anim


def plot_steps(sched: Schedule, max_steps: int = 8, fig=None):
    """Small multiples: one circle per step (a static stand-in for :func:`animate`, e.g. for slides)."""
    import matplotlib.pyplot as plt

    k = min(sched.steps, max_steps)
    if fig is None:
        fig = plt.figure(figsize=(2.3 * max(k, 1), 2.5))
    axes = fig.subplots(1, max(k, 1), squeeze=False)[0]
    for t, ax in enumerate(axes):
        if t < k:
            draw_step(sched, t, ax)
            ax.set_title(f"step {t + 1}", fontsize=9)
        else:
            ax.axis("off")
    return fig


def message_events(merged_log) -> list[dict]:
    """Turn a merged message log (with times) into :func:`labkit.viz.gantt` events, one lane per sender."""
    return [{"lane": m["src"], "kind": "send", "start": m["start"], "end": m["end"],
             "label": f"{_chunk_label(m['chunks'], 10 ** 9) if len(m['chunks']) == 1 else 'all'}->{m['dst']}"}
            for m in merged_log]


def plot_busbw(rows, ax=None, title: str | None = None):
    """busbw (GB/s) against message size, one line per algorithm, from timing rows."""
    from .cost import bandwidths

    ax = axes(ax, (6, 3.5))
    by = {}
    for r in rows:
        bw = bandwidths(r["bytes"], r["seconds"], r["collective"], r["world_size"])["busbw"] / 1e9
        by.setdefault(r["algorithm"], []).append((r["bytes"], bw))
    for name, pts in by.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if name != "library" else "--", label=name, ms=4,
                color=algorithm_colour(name))
    sizes = [r["bytes"] for r in rows]
    size_axis(ax, min(sizes), max(sizes), every=max(1, round(math.log2(max(sizes) / min(sizes)) / 5)))
    ax.set_xlabel("message size")
    ax.set_ylabel("busbw (GB/s)")
    ax.legend(fontsize=8)
    ax.set_title(title or "bus bandwidth (nccl-tests definition), measured")
    return ax


def plot_predicted_vs_measured(rows, alpha: float, beta: float, ax=None, title: str | None = None):
    """Measured times (markers) beside the alpha-beta model's prediction (lines), per algorithm."""
    from .cost import cost_terms, predict_time

    ax = axes(ax, (6, 3.5))
    by = {}
    for r in rows:
        by.setdefault(r["algorithm"], []).append(r)
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["bytes"])
        colour = algorithm_colour(name)
        ax.plot([r["bytes"] for r in rs], [r["seconds"] * 1e3 for r in rs], "o", color=colour, label=f"{name} measured")
        try:
            cost_terms(name, 1, rs[0]["world_size"])
        except ValueError:
            continue
        xs = [rs[0]["bytes"] * (rs[-1]["bytes"] / rs[0]["bytes"]) ** (j / 40) for j in range(41)]
        ax.plot(xs, [predict_time(name, x, rs[0]["world_size"], alpha, beta) * 1e3 for x in xs], "-", color=colour,
                alpha=0.7, label=f"{name} model")
    sizes = [r["bytes"] for r in rows]
    size_axis(ax, min(sizes), max(sizes), every=max(1, round(math.log2(max(sizes) / min(sizes)) / 5)))
    plain_log_y(ax)
    ax.set_xlabel("message size")
    ax.set_ylabel("time (ms)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or f"alpha-beta model (alpha={alpha * 1e6:.0f} us, "
                 f"1/beta={1 / beta / 1e9 if beta else 0:.2f} GB/s)"
                 " vs measured", fontsize=9)
    return ax
