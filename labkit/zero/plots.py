"""Lab 10's figures: what every rank holds under each ZeRO stage, the bytes on each rank beside the paper's formulas,
the optimiser state on each rank of labkit's even shards beside torch's greedy partition, and one ZeRO-3 step's
all-gathers against its compute (prefetch).

Each function takes plain numbers (what :func:`labkit.memory_model.zero_bytes_each_rank` and the lab's rank
functions return), an optional matplotlib ``ax``, and returns the ``ax``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from .._compat import moved_names, renamed_kwargs
from .._validate import validate_int
from ..viz import axes

ROWS = (("weights", "#4c78a8"), ("grads", "#f58518"), ("optimizer", "#b279a2"))
#: What a method keeps besides the model states (lab 02's flat DDP buckets, gradients still in flight): drawn on
#: top of the three rows when a measurement has it, so a bar is the whole of what a rank holds.
BUFFERS = ("buffers", "#9d9d9d")
#: How each kind is named on a figure (the keys stay the names the measurements use).
LABELS = {"weights": "weights", "grads": "gradients", "optimizer": "optimiser state",
          "buffers": "buffers (flat buckets, ...)"}
STAGE_SHARDS = {0: set(), 1: {"optimizer"}, 2: {"optimizer", "grads"}, 3: {"optimizer", "grads", "weights"}}


@renamed_kwargs(world="world_size")
def holdings(stage: int, world_size: int = 4, ax=None, title: str | None = None):
    """A grid: one column per rank, one row per kind of model state; a full cell where the rank keeps all of it, a
    1/N slice (at the rank's own position) where the stage shards it."""
    stage = validate_int("stage", stage, minimum=0, maximum=3, hint="ZeRO stages are 0 (plain data parallel) to 3")
    world_size = validate_int("world_size", world_size, minimum=1, maximum=16, hint="draw at most 16 ranks")
    ax = axes(ax, (1.2 + 1.0 * world_size, 2.2))
    for row, (kind, colour) in enumerate(ROWS):
        y = len(ROWS) - 1 - row
        for r in range(world_size):
            ax.add_patch(_rect(r, y, 0.9, colour, alpha=0.12))  # the whole, faint
            if kind in STAGE_SHARDS[stage]:
                ax.add_patch(_rect(r + r / world_size * 0.9, y, 0.9 / world_size, colour))
            else:
                ax.add_patch(_rect(r, y, 0.9, colour))
        ax.text(-0.1, y + 0.4, LABELS[kind], ha="right", va="center", fontsize=8)
    ax.set_xlim(-1.1, world_size)
    ax.set_ylim(-0.1, len(ROWS))
    ax.set_xticks([r + 0.45 for r in range(world_size)], [f"rank {r}" for r in range(world_size)], fontsize=8)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    names = {0: "plain data parallel (DDP)", 1: "ZeRO-1: optimiser state sharded",
             2: "ZeRO-2: + gradients sharded", 3: "ZeRO-3: + weights sharded"}
    ax.set_title(title or names[stage], fontsize=9)
    return ax


def _rect(x, y, w, colour, alpha=1.0):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, 0.8, color=colour, alpha=alpha, lw=0)


def bytes_each_rank(measured: Mapping[str, Mapping[str, float]], predicted: Mapping[str, float] | None = None,
                    ax=None, unit: float = 1e3, unit_name: str = "kB", title: str | None = None,
                    totals: bool = True):
    """Stacked bars of each method's bytes on one rank (``{method: {"weights", "grads", "optimizer"}}``, and
    ``"buffers"`` where a method keeps any), with the formula's total per method as a marker (``predicted``:
    ``{method: bytes}``). With ``totals``, each bar's height (the sum of its parts) is written above it, so the
    figure and a table of the same parts read the same number. Returns the ``ax``; ``ax.bar_totals`` holds those
    heights, in ``unit``s, by method."""
    if not measured:
        raise ValueError("bytes_each_rank() got no methods: run the lab's measurement first")
    ax = axes(ax, (1.5 + 1.1 * len(measured), 3.2))
    kinds = ROWS + ((BUFFERS,) if any(parts.get(BUFFERS[0]) for parts in measured.values()) else ())
    ax.bar_totals = {}
    for i, (method, parts) in enumerate(measured.items()):
        bottom = 0.0
        for kind, colour in kinds:
            v = float(parts.get(kind, 0.0)) / unit
            ax.bar(i, v, bottom=bottom, color=colour, edgecolor="white", label=LABELS[kind] if i == 0 else None)
            bottom += v
        ax.bar_totals[method] = bottom
        if totals:
            ax.annotate(f"{bottom:.3g}", (i, bottom), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8)
    if predicted:
        xs = [i for i, m in enumerate(measured) if m in predicted]
        ax.scatter(xs, [predicted[m] / unit for m in measured if m in predicted], marker="_", s=600, color="k",
                   zorder=3, label="formula (ZeRO paper)")
    ax.set_xticks(range(len(measured)), list(measured), fontsize=8)
    ax.set_ylabel(f"bytes on one rank ({unit_name})")
    ax.set_ylim(0, max(max(ax.bar_totals.values()), *(v / unit for v in (predicted or {}).values())) * 1.25)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or "what one rank holds: measured (bars) and the formula", fontsize=9)
    return ax


def state_each_rank(per_method: Mapping[str, Sequence[int]], ax=None, title: str | None = None):
    """Grouped bars: optimiser-state values on each rank, one group per method (even shards against greedy ones)."""
    if not per_method:
        raise ValueError("state_each_rank() got no methods")
    ax = axes(ax, (6, 2.8))
    world_size = max(len(v) for v in per_method.values())
    width = 0.8 / len(per_method)
    for k, (method, values) in enumerate(per_method.items()):
        xs = [r + (k - (len(per_method) - 1) / 2) * width for r in range(len(values))]
        ax.bar(xs, values, width, label=method)
    ax.set_xticks(range(world_size), [f"rank {r}" for r in range(world_size)])
    ax.set_ylabel("optimiser-state values")
    ax.legend(fontsize=7)
    ax.set_title(title or "optimiser state per rank", fontsize=9)
    return ax


def gather_timeline(timeline: Sequence[Mapping], ax=None, title: str | None = None, unit: float = 1e3):
    """One ZeRO-3 step from :attr:`Zero3.timeline <labkit.zero.Zero3.timeline>` (times from the step's start, as
    :func:`labkit.zero.overlap.overlap_rank` returns them): a row of the forward's unit computes, and a row of
    all-gathers, each bar from issued to ready, its exposed part (the step waiting for it) in red. Returns the
    ``ax``; ``ax.exposed`` and ``ax.in_flight`` are the two sums, in ``unit``s (ms by default)."""
    ax = axes(ax, (9, 1.8))
    gathers = [e for e in timeline if e["kind"] == "gather"]
    computes = [e for e in timeline if e["kind"] == "compute" and "end" in e]
    if not gathers:
        raise ValueError("gather_timeline() got no gathers: pass Zero3(..., record=True).timeline after a step")
    colours = {"forward": "#4c78a8", "backward": "#f58518"}
    for e in gathers:
        ax.broken_barh([(e["issued"] * unit, (e["ready"] - e["issued"]) * unit)], (0.1, 0.8),
                       color=colours.get(e["phase"], "#9d9d9d"), alpha=0.55)
        ax.broken_barh([(e["waited"] * unit, (e["ready"] - e["waited"]) * unit)], (0.1, 0.8), color="#e45756")
    for e in computes:
        ax.broken_barh([(e["start"] * unit, (e["end"] - e["start"]) * unit)], (1.1, 0.8), color="#54a24b")
    ax.exposed = sum(e["ready"] - e["waited"] for e in gathers) * unit
    ax.in_flight = sum(e["ready"] - e["issued"] for e in gathers) * unit
    ax.set_yticks([0.5, 1.5], ["all-gathers", "forward compute"], fontsize=8)
    ax.set_xlabel("ms from the step's start" if unit == 1e3 else "time")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colours["forward"], alpha=0.55, label="forward gather in flight"),
                       Patch(color=colours["backward"], alpha=0.55, label="backward gather in flight"),
                       Patch(color="#e45756", label="step waits for it"),
                       Patch(color="#54a24b", label="unit computes")], fontsize=7, ncol=4, loc="upper right")
    ax.set_ylim(0, 2.6)
    ax.set_title(title or f"one ZeRO-3 step: {ax.exposed:.1f} of {ax.in_flight:.1f} ms of all-gathers exposed",
                 fontsize=9)
    return ax


# old names (issue 30): a per-rank quantity is *_each_rank
__getattr__ = moved_names(__name__, {"bytes_per_rank": "labkit.zero.plots:bytes_each_rank",
                                     "state_per_rank": "labkit.zero.plots:state_each_rank"})
