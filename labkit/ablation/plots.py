"""Lab 08's figures: the paired differences to the baseline with their intervals, and learning curves over seeds.

Every function takes an optional matplotlib ``ax`` and returns it.
"""
from __future__ import annotations

import math

import numpy as np

from ..viz import axes

__all__ = ["VERDICT_COLOURS", "curves", "differences", "interval_colour", "verdict_colour"]

_ABOVE, _BELOW, _NOISE, _UNTESTED = "#3a8f5c", "#c84b3c", "#9a9a9a", "#d9d9d9"
# one colour per verdict, the same in every figure of the lab; the table's verdict column names them
VERDICT_COLOURS = {"helps": _ABOVE, "hurts": _BELOW, "no evidence": _NOISE, "too few seeds": _UNTESTED,
                   "zero variance": _UNTESTED}
_LEGEND = {"helps": "helps (Holm-adjusted p < 0.05)", "hurts": "hurts (Holm-adjusted p < 0.05)",
           "no evidence": "no evidence after Holm's adjustment", "too few seeds": "too few seeds: no test",
           "zero variance": "zero variance: no test"}


def interval_colour(row: dict) -> str:
    """Green if the (unadjusted) interval lies above 0, red if below, grey if it holds 0 or there is none.

    For a single comparison only: a report's rows are coloured by their verdict (:func:`verdict_colour`), which
    accounts for the number of comparisons."""
    lo, hi = row.get("lo", math.nan), row.get("hi", math.nan)
    if lo > 0:  # comparisons with nan are False: no interval reads as noise
        return _ABOVE
    if hi < 0:
        return _BELOW
    return _NOISE


def verdict_colour(row: dict) -> str:
    """The colour of a report row's ``verdict`` (the table's column, from the Holm-adjusted p-value):
    :data:`VERDICT_COLOURS`. A row without a verdict falls back to :func:`interval_colour`."""
    v = row.get("verdict")
    if v is None:
        return interval_colour(row)
    if v not in VERDICT_COLOURS:
        raise ValueError(f"row {row.get('label')!r} has verdict {v!r}; expected one of {sorted(VERDICT_COLOURS)}")
    return VERDICT_COLOURS[v]


def differences(rows, ax=None, title=None, confidence=None):
    """One horizontal bar per row: ``row["diff"]`` (variant - baseline) with an error bar from ``row["lo"]`` to
    ``row["hi"]`` (the unadjusted interval), labelled ``row["label"]``, first row on top; a line at 0.

    Colours: a report's rows carry a ``verdict`` (from the Holm-adjusted p-value), and each bar takes its
    verdict's colour (:data:`VERDICT_COLOURS`), the same verdict the table prints, with a legend. Rows without a
    verdict are coloured by their own interval (green above 0, red below, grey across). A row without an interval
    (too few seeds, zero variance) gets no error bar. Where a row has ``wins`` and ``n``, "won w/n" is written
    beside it (", no interval" added where there is none). Rows without a ``diff`` (the baseline's) are left out,
    so a report's rows can be passed as they are.
    """
    rows = [r for r in rows if "diff" in r]
    ax = axes(ax, (6.5, 0.45 * len(rows) + 1.4))
    y = np.arange(len(rows))
    diff = np.array([float(r["diff"]) for r in rows])
    lo = np.array([float(r.get("lo", math.nan)) for r in rows])
    hi = np.array([float(r.get("hi", math.nan)) for r in rows])
    has = np.isfinite(lo) & np.isfinite(hi)
    by_verdict = all("verdict" in r for r in rows)
    colours = [verdict_colour(r) if by_verdict else interval_colour(r) for r in rows]
    ax.barh(y, diff, color=colours, height=0.6, edgecolor="#555555", linewidth=0.5)
    if has.any():
        xerr = np.vstack([diff[has] - lo[has], hi[has] - diff[has]])
        ax.errorbar(diff[has], y[has], xerr=np.clip(xerr, 0, None), fmt="none", ecolor="k", capsize=3, lw=1)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(y, [str(r.get("label", i)) for i, r in enumerate(rows)])
    ax.invert_yaxis()
    for i, r in enumerate(rows):
        if "wins" in r and "n" in r:
            right = hi[i] if has[i] else diff[i]
            text = f"won {r['wins']}/{r['n']}" + ("" if has[i] else ", no interval")
            ax.annotate(text, (max(right, diff[i], 0.0), y[i]), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7)
    conf = confidence or next((r["confidence"] for r in rows if "confidence" in r), None)  # a Report's .confidence
    ax.set_xlabel("difference to the baseline" + (f" (whiskers: {conf:.0%} interval over seeds, unadjusted)"
                                                  if conf else " (whiskers: interval over seeds, unadjusted)"))
    ax.set_title(title or "paired differences to the baseline")
    ax.grid(axis="x", alpha=0.3)
    if by_verdict and rows:
        from matplotlib.patches import Patch

        seen = list(dict.fromkeys(r["verdict"] for r in rows))
        order = [v for v in _LEGEND if v in seen]
        ax.legend(handles=[Patch(facecolor=VERDICT_COLOURS[v], edgecolor="#555555", label=_LEGEND[v])
                           for v in order], title="colour: the table's verdict", fontsize=7, title_fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside the axes: never over a bar
    return ax


def _mean_band(seed_curves, metric):
    """Steps (the union over seeds) and the mean, min and max of ``metric`` over the seeds that have each step."""
    steps = sorted({p["step"] for c in seed_curves for p in c if metric in p})
    index = {s: i for i, s in enumerate(steps)}
    table = np.full((len(seed_curves), len(steps)), np.nan)
    for k, c in enumerate(seed_curves):
        for p in c:
            if metric in p and p[metric] is not None:
                table[k, index[p["step"]]] = float(p[metric])
    seen = np.isfinite(table).any(axis=0)
    steps, table = np.asarray(steps, dtype=float)[seen], table[:, seen]
    return steps, np.nanmean(table, axis=0), np.nanmin(table, axis=0), np.nanmax(table, axis=0)


def curves(curves_by_label: dict, ax=None, metric: str = "test_accuracy", title=None):
    """Learning curves: for each label, the mean of ``metric`` over its seeds against ``step`` (one line) and a
    shaded band from the seeds' minimum to their maximum. ``curves_by_label[label]`` is a list of seeds, each a
    list of dicts with ``step`` and ``metric``; seeds may log different steps (each step averages the seeds
    that logged it). A label with no point is skipped.
    """
    ax = axes(ax, (6.5, 3.6))
    drawn = 0
    for i, (label, seed_curves) in enumerate(curves_by_label.items()):
        steps, mean, low, high = _mean_band(list(seed_curves), metric)
        if steps.size == 0:
            continue
        colour = f"C{i % 10}"
        ax.plot(steps, mean, color=colour, label=f"{label} ({len(seed_curves)} seeds)")
        ax.fill_between(steps, low, high, color=colour, alpha=0.2, lw=0)
        drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title or f"{metric.replace('_', ' ')}: mean over seeds, band = min to max")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    return ax
