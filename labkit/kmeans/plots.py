"""Lab 06's figures: clusters and pseudo-labels in a 2-D projection, inertia per iteration, accuracy against K."""
from __future__ import annotations

import numpy as np


def project_2d(X) -> np.ndarray:
    """The first two principal components (a projection for looking, not for clustering)."""
    from sklearn.decomposition import PCA

    return PCA(2, random_state=0).fit_transform(np.asarray(X, dtype=np.float64))


def clusters_and_pseudo_labels(X, clusters, y_pseudo, y_semi=None, axes=None, title=""):
    """Two panels: points coloured by k-means cluster, and by pseudo-label (grey: no label)."""
    import matplotlib.pyplot as plt

    P = project_2d(X)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].scatter(P[:, 0], P[:, 1], c=clusters, cmap="tab20", s=6)
    axes[0].set_title(f"k-means clusters (k = {len(np.unique(clusters))}){title}")
    y_pseudo = np.asarray(y_pseudo)
    none = y_pseudo < 0
    axes[1].scatter(P[none, 0], P[none, 1], c="#cccccc", s=6, label="no label")
    sc = axes[1].scatter(P[~none, 0], P[~none, 1], c=y_pseudo[~none], cmap="tab10", s=6, vmin=0, vmax=9)
    if y_semi is not None:
        lab = np.asarray(y_semi) >= 0
        axes[1].scatter(P[lab, 0], P[lab, 1], facecolors="none", edgecolors="k", s=40, label="given labels")
    axes[1].set_title("pseudo-labels (majority label of each cluster)")
    axes[1].legend(loc="lower right", fontsize=8)
    plt.colorbar(sc, ax=axes[1], label="class")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    return axes


def inertia_curve(histories: dict, ax=None):
    """Inertia at each Lloyd iteration, one line per run (it never goes up)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 3.2))[1]
    for name, h in histories.items():
        ax.plot(range(1, len(h) + 1), h, marker=".", label=name)
    ax.set_xlabel("Lloyd iteration"), ax.set_ylabel("inertia (sum of squared distances)")
    ax.set_title("inertia per iteration")
    ax.legend(fontsize=8)
    return ax


def accuracy_vs_k(rows: list[dict], ax=None, title="digits, test accuracy (mean ± sd over seeds)"):
    """Rows from :func:`labkit.semisup.evaluate`: one line per method, error bars = sd over seeds."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6.5, 3.6))[1]
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["K"])
        ax.errorbar([r["K"] for r in rs], [r["mean"] for r in rs], yerr=[r["sd"] for r in rs], marker="o",
                    capsize=3, label=m)
    ax.set_xlabel("labels per class K"), ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


MOON_COLOURS = ("#3b4cc0", "#b40426")   # class 0 blue, class 1 red, in every panel


def moons_panels(X, y, pseudo: dict, axes=None, given=None):
    """Two moons coloured by each method's labels (one panel per method, one colour per class in every panel).

    ``given``: a boolean mask of the labelled points, ringed in black in every panel. A point labelled ``-1``
    (no label) is drawn grey. The first panel carries the legend.
    """
    import matplotlib.pyplot as plt

    X, y = np.asarray(X), np.asarray(y)
    if axes is None:
        _, axes = plt.subplots(1, len(pseudo), figsize=(4 * len(pseudo), 3.3))
    for i, (ax, (name, lab)) in enumerate(zip(np.atleast_1d(axes), pseudo.items())):
        lab = np.asarray(lab)
        acc = float((lab == y).mean())
        for v, colour in ((-1, "#cccccc"), *enumerate(MOON_COLOURS)):
            m = lab == v
            if m.any() or v >= 0:
                ax.scatter(X[m, 0], X[m, 1], color=colour, s=8, label="no label" if v < 0 else f"class {v}")
        if given is not None:
            g = np.asarray(given, dtype=bool)
            ax.scatter(X[g, 0], X[g, 1], facecolors="none", edgecolors="k", s=45, label="given labels")
        ax.set_title(f"{name}\n{acc:.0%} agree with the moons", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")
    return axes
