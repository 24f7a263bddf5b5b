"""Lab 07's figures: accuracy against K, confidence histograms, reliability diagrams, logs over iterations.

Every function takes an optional matplotlib ``ax`` and returns it.
"""
from __future__ import annotations

import numpy as np

from .._validate import ArgumentError
from ..viz import axes

__all__ = ["accuracy_vs_k", "confidence_histogram", "confidence_counts", "RIGHT_WRONG", "MODE_COLOURS", "reliability",
           "pseudo_label_log", "log_likelihood", "class_counts"]


def accuracy_vs_k(rows, ax=None, title="accuracy against labels per class K"):
    """Rows of :func:`labkit.semisup.evaluate`: one line per method, mean ± sd error bars."""
    ax = axes(ax, (6.5, 3.8))
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == m and "error" not in r), key=lambda r: r["K"])
        ax.errorbar([r["K"] for r in rs], [r["mean"] for r in rs], yerr=[r["sd"] for r in rs], marker="o",
                    capsize=3, label=m)
    ax.set_xlabel("labels per class K")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax


MODE_COLOURS = {"supervised": "C0", "pseudo_label": "C1", "fixmatch": "C2"}   # one colour per mode, every figure
RIGHT_WRONG = ("#4a8", "#d55")   # right predictions green, wrong red, in every panel


def confidence_counts(confidence, correct, bins: int = 10) -> dict:
    """Counts of right and wrong predictions per equal-width confidence bin on [0, 1] (the histogram's numbers)."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=bool)
    if confidence.shape != correct.shape:
        raise ArgumentError(f"confidence and correct must have the same shape, got {confidence.shape} and "
                         f"{correct.shape}: one flag per prediction")
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return {"edges": edges, "right": np.bincount(which[correct], minlength=bins),
            "wrong": np.bincount(which[~correct], minlength=bins)}


def confidence_histogram(confidence, correct, ax=None, threshold=None, bins=10, title="confidence"):
    """Right and wrong predictions per confidence bin, side by side on a linear axis, each bar's count written on
    it (a log axis or stacked bars would make a few wrong points look like most of a bar); a dashed line at the
    threshold."""
    ax = axes(ax, (5, 3.2))
    c = confidence_counts(confidence, correct, bins)
    edges = c["edges"]
    width = (edges[1] - edges[0]) * 0.42
    mids = (edges[:-1] + edges[1:]) / 2
    for off, key, colour in ((-width / 2, "right", RIGHT_WRONG[0]), (width / 2, "wrong", RIGHT_WRONG[1])):
        n = c[key]
        bars = ax.bar(mids + off, n, width=width, color=colour, label=f"{key} ({n.sum()})")
        ax.bar_label(bars, labels=[str(v) if v else "" for v in n], fontsize=6, padding=1)
    if threshold is not None:
        ax.axvline(threshold, ls="--", color="k", label=f"threshold {threshold:g}")
    ax.set_xlim(0, 1)
    ax.margins(y=0.12)
    ax.set_xlabel("P(y_hat | x)")
    ax.set_ylabel("points")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    return ax


def reliability(diagram: dict, ax=None, label="model", title="reliability diagram"):
    """Accuracy per confidence bin against the bin's mean confidence (the diagonal is perfect calibration)."""
    ax = axes(ax, (4, 4))
    ok = diagram["count"] > 0
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.plot(diagram["confidence"][ok], diagram["accuracy"][ok], marker="o", label=f"{label} (ECE {diagram['ece']:.3f})")
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def _smooth(v, w):
    v = np.asarray(v, dtype=float)
    if w <= 1 or len(v) < w:
        return v
    out = np.full(len(v), np.nan)
    for i in range(len(v)):
        seg = v[max(0, i - w + 1): i + 1]
        if np.isfinite(seg).any():
            out[i] = np.nanmean(seg)
    return out


def pseudo_label_log(runs, ax=None, window=10, title="online pseudo-labels per step"):
    """Mask rate (solid) and pseudo-label accuracy (dashed) per step for each :class:`CNNRun` (moving average)."""
    ax = axes(ax, (7, 3.5))
    for i, run in enumerate(runs):
        if not run.mask_rate:
            continue
        colour = MODE_COLOURS.get(run.mode, f"C{i + 3}")
        ax.plot(_smooth(run.mask_rate, window), color=colour, label=f"{run.mode}: mask rate")
        if run.pseudo_accuracy:
            ax.plot(_smooth(run.pseudo_accuracy, window), color=colour, ls="--", label=f"{run.mode}: pseudo-label acc.")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax


def log_likelihood(models: dict, ax=None, title="EM objective J / n per iteration"):
    ax = axes(ax, (5, 3.2))
    for name, m in models.items():
        ax.plot(m.log_likelihood_, marker=".", label=name)
    ax.set_xlabel("EM iteration (0 = supervised start)")
    ax.set_ylabel("J / n")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def class_counts(counts: dict, ax=None, title="pseudo-labels per class"):
    """Grouped bars: ``{name: per-class counts}``."""
    ax = axes(ax, (6.5, 3))
    names = list(counts)
    C = len(next(iter(counts.values())))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar(np.arange(C) + i * w, counts[n], width=w, label=n)
    ax.set_xticks(np.arange(C) + 0.4 - w / 2, [str(c) for c in range(C)])
    ax.set_xlabel("class")
    ax.set_ylabel("pseudo-labels")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax
