"""Lab 09's figures: speed-ups against the fp32 run, memory per GPU as stacked bars against a memory line, the
checkpointing trade-off, throughput against batch size, and the input pipeline's timeline.

Every function takes what the experiments (:class:`labkit.hardware.Result` rows) and the calculator return, an
optional matplotlib ``ax``, and returns the ``ax``.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..viz import axes, gantt

COMPONENT_COLOURS = {
    "params": "#4c78a8", "grads": "#f58518", "optimizer": "#b279a2", "intermediates": "#e45756",
    "activations": "#54a24b", "other": "#bab0ac",
}
# what the legend calls each component (the keys stay as the code spells them)
COMPONENT_NAMES = {"params": "weights", "grads": "gradients", "optimizer": "optimiser state",
                   "intermediates": "optimiser temporaries", "activations": "activations", "other": "other"}
GB = 1e9
_FASTER, _SLOWER = "#54a24b", "#e45756"


def speedups(ratios: Mapping[str, float], ax=None, title: str | None = None,
             published: Mapping[str, float] | None = None):
    """Horizontal bars of speed-ups (baseline time / variant time), a line at 1 (no change).

    ``published`` adds a hollow marker per label (a cited figure, e.g. NVIDIA's AMP speed-up)."""
    if not ratios:
        raise ValueError("speedups() got no ratios: run an experiment first")
    labels = list(ratios)
    ax = axes(ax, figsize=(6, 0.6 + 0.4 * len(labels)))
    vals = [ratios[k] for k in labels]
    colours = [_FASTER if v >= 1 else _SLOWER for v in vals]
    ax.barh(range(len(labels)), vals, color=colours)
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=t) for c, t in ((_FASTER, "faster than the baseline"),
                                                    (_SLOWER, "slower than the baseline")) if c in colours]
    for i, v in enumerate(vals):
        ax.annotate(f"{v:.2f}x", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    if published:
        pts = [(i, published[k]) for i, k in enumerate(labels) if k in published]
        if pts:
            handles.append(ax.scatter([p for _, p in pts], [i for i, _ in pts], marker="D", facecolors="none",
                                      edgecolors="k", label="published (GPU)", zorder=3))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over, a bar
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the baseline (>1: faster)")
    ax.set_xlim(0, max(max(vals), *(published or {}).values(), 1.0) * 1.25)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def stack_total(parts: Mapping[str, float]) -> float:
    """The height of one stacked bar of :func:`memory_stack`, in bytes: the sum of its positive components (the
    number written on top of the bar; print this one beside the figure, not another)."""
    return sum(float(v) for v in parts.values() if float(v) > 0)


def memory_stack(bars: Mapping[str, Mapping[str, float]], limits: Mapping[str, float] | None = None, ax=None,
                 title: str | None = None, unit: float = GB, unit_name: str = "GB",
                 peaks: Mapping[str, float] | None = None):
    """Stacked bars of memory per GPU (``{bar label: {component: bytes}}``), with horizontal memory lines
    (``{"80 GB": 80e9}``). Components are drawn in :data:`COMPONENT_COLOURS`' order; unknown ones after. The number
    on top of each bar is its height, :func:`stack_total` (every component counted once, as if all were alive at
    once). ``peaks`` (``{bar label: bytes}``) marks each bar's peak, the most alive at one moment, which is lower
    when some components are freed before others are made: a black line across the bar, its value written under
    the bar's height ("peak ...")."""
    if not bars:
        raise ValueError("memory_stack() got no bars")
    unknown = sorted(set(peaks or {}) - set(bars))
    if unknown:
        raise ValueError(f"memory_stack() got peaks for {unknown}, which are not bars; bars are {list(bars)}")
    ax = axes(ax, figsize=(1.6 + 1.1 * len(bars), 3.4))
    order = list(COMPONENT_COLOURS) + sorted({c for b in bars.values() for c in b} - set(COMPONENT_COLOURS))
    seen = set()
    for i, parts in enumerate(bars.values()):
        bottom = 0.0
        for comp in order:
            v = float(parts.get(comp, 0.0)) / unit
            if v <= 0:
                continue
            ax.bar(i, v, bottom=bottom, color=COMPONENT_COLOURS.get(comp, "#888888"), edgecolor="white",
                   label=COMPONENT_NAMES.get(comp, comp) if comp not in seen else None)
            seen.add(comp)
            bottom += v
        name = list(bars)[i]
        peak = f"\npeak {float(peaks[name]) / unit:.3g}" if peaks and name in peaks else ""
        ax.annotate(f"{stack_total(parts) / unit:.3g}{peak}", (i, bottom), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
        if peak:
            ax.hlines(float(peaks[name]) / unit, i - 0.4, i + 0.4, color="k", lw=2,
                      label=None if "peak" in seen else "peak (alive at once)")
            seen.add("peak")
    top = max(stack_total(b) for b in bars.values()) / unit
    for name, value in (limits or {}).items():
        ax.axhline(value / unit, color="#c33", ls="--", lw=1)
        ax.annotate(name, (-0.45, value / unit), xytext=(0, 2), textcoords="offset points", color="#c33",
                    fontsize=8, ha="left", va="bottom",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
        top = max(top, value / unit)
    ax.set_xticks(range(len(bars)), list(bars), fontsize=8, rotation=15)
    ax.set_ylabel(f"memory per GPU ({unit_name})")
    ax.set_ylim(0, top * (1.3 if peaks else 1.15) or 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars: never over a label
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def checkpoint_tradeoff(rows: Sequence[Mapping], ax=None, layers: int | None = None, title: str | None = None):
    """Activation memory at the backward's peak against step time, one point per number of checkpointed segments
    (the rows of :func:`labkit.hardware.checkpointing`); the segment count nearest sqrt(layers) circled."""
    if not rows:
        raise ValueError("checkpoint_tradeoff() got no rows: run labkit.hardware.checkpointing() first")
    ax = axes(ax, (6, 3.2))
    xs = [r["median ms"] for r in rows]
    ys = [r["backward peak MB"] for r in rows]
    ax.plot(xs, ys, "o", color="#4c78a8")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(str(r["segments"] or "none"), (x, y), xytext=(4, 3), textcoords="offset points", fontsize=8)
    if layers:
        best = min(rows, key=lambda r: abs((r["segments"] or layers) - math.sqrt(layers)))
        ax.scatter([best["median ms"]], [best["backward peak MB"]], s=120, facecolors="none", edgecolors="#c33",
                   label=f"~sqrt({layers}) = {math.sqrt(layers):.1f} segments (Chen et al. 2016)")
        ax.legend(fontsize=7)
    ax.set_xlabel("training step (ms, median)")
    ax.set_ylabel("activations at the backward's peak (MB)")
    ax.set_title(title or "checkpointing: memory saved against time paid", fontsize=9)
    return ax


def batch_curve(rows: Sequence[Mapping], ax=None, title: str | None = None):
    """Images per second (left axis) and activation memory (right axis) against batch size (the rows of
    :func:`labkit.hardware.batch_sweep`)."""
    if not rows:
        raise ValueError("batch_curve() got no rows: run labkit.hardware.batch_sweep() first")
    ax = axes(ax, (6, 3.2))
    b = [r["batch"] for r in rows]
    ax.plot(b, [r["images/s"] for r in rows], "o-", color="#4c78a8", label="images/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images per second", color="#4c78a8")
    ax2 = ax.twinx()
    ax2.plot(b, [r["activation MB"] for r in rows], "s--", color="#54a24b", label="activations")
    ax2.set_ylabel("activations kept (MB)", color="#54a24b")
    ax.set_title(title or "throughput and memory against batch size", fontsize=9)
    return ax


def timeline_events(timeline: Sequence[Mapping]) -> list[dict]:
    """One input-pipeline run's per-batch timeline (``Result.extra["timelines"][variant]`` of
    :func:`labkit.hardware.input_pipeline`) as :func:`labkit.viz.gantt` events on three lanes: load (in whichever
    process made the batch), wait (the training loop blocked on the loader) and compute (copy + step)."""
    events = []
    for r in timeline:
        b = r["batch"]
        events.append({"lane": "load", "kind": "load", "start": r["load_start"], "end": r["load_end"], "label": b})
        if r["copy_start"] > r["wait_start"]:
            events.append({"lane": "wait", "kind": "wait", "start": r["wait_start"], "end": r["copy_start"]})
        events.append({"lane": "step", "kind": "compute", "start": r["copy_start"], "end": r["compute_end"],
                       "label": b})
    return events


def pipeline_timeline(timeline: Sequence[Mapping], ax=None, title: str | None = None):
    """The input pipeline's timeline: load, wait and step per batch (see :func:`timeline_events`)."""
    return gantt(timeline_events(timeline), ax=ax, origin=0.0, lane_name="",
                 title=title or "input pipeline: load, wait and step per batch")
