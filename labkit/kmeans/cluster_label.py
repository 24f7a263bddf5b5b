"""Cluster-then-label: cluster everything, give each cluster the majority label of its labelled points.

1. k-means on all training points (labelled and unlabelled), with **more clusters than classes**
   (a class such as a handwritten digit is rarely one round blob; several small clusters per class
   follow its shape better);
2. each cluster takes the most frequent label among the labelled points that fell into it (ties to
   the smaller label); a cluster **with no labelled point gets no label**: by default its points stay
   unlabelled (``-1``) and are left out of training (``unlabelled_clusters="drop"``), or they take
   the label of the nearest labelled cluster's centre (``"nearest"``);
3. every point of a labelled cluster gets that label (a *pseudo-label*); the given labels are kept
   for the labelled points themselves; a classifier is trained on labelled + pseudo-labelled points.

The result says how many points received a pseudo-label and, when the true labels are passed for
instrumentation (never for training), how many of those were right.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validate import ArgumentError, validate_choice, validate_finite, validate_int

__all__ = ["ClusterLabelResult", "label_clusters", "cluster_then_label", "cluster_then_label_method",
           "validate_targets", "accuracy_methods", "accuracy_rows"]


def validate_targets(X, y_semi) -> tuple[np.ndarray, np.ndarray]:
    """``X`` 2-D finite and ``y_semi`` integers >= -1 of the same length (``-1`` = unlabelled)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ArgumentError(f"X must be a 2-D array (n_samples, n_features), got shape {X.shape}")
    validate_finite("X", X)
    y = np.asarray(y_semi)
    if y.ndim != 1:
        raise ArgumentError(f"y must be a 1-D array of labels, got shape {y.shape}")
    if len(y) != len(X):
        raise ArgumentError(f"X and y must have the same length, got {len(X)} and {len(y)}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ArgumentError("y must hold integer class labels or -1 for unlabelled, got non-integer values; "
                                "encode classes as 0..C-1")
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iu":
        raise ArgumentError(f"y must hold integer class labels or -1 for unlabelled, got dtype {y.dtype}")
    if (y < -1).any():
        raise ArgumentError(f"y must hold labels >= 0 or -1 for unlabelled, got {int(y.min())}")
    if not (y >= 0).any():
        raise ArgumentError("y has no labelled point (all -1): cluster-then-label needs at least one label")
    return X, y.astype(np.int64)


def label_clusters(cluster_ids, y_semi, n_clusters: int) -> np.ndarray:
    """Majority label of the labelled points in each cluster; ``-1`` for a cluster with none."""
    cluster_ids, y = np.asarray(cluster_ids), np.asarray(y_semi)
    out = np.full(n_clusters, -1, dtype=np.int64)
    lab = y >= 0
    n_classes = int(y[lab].max()) + 1 if lab.any() else 0
    votes = np.zeros((n_clusters, max(1, n_classes)), dtype=np.int64)
    np.add.at(votes, (cluster_ids[lab], y[lab]), 1)
    has = votes.sum(1) > 0
    out[has] = votes[has].argmax(1)  # argmax: ties to the smaller label
    return out


@dataclass
class ClusterLabelResult:
    y_pseudo: np.ndarray          # given labels kept, pseudo-labels added, -1 where none
    clusters: np.ndarray          # cluster of every point
    cluster_label: np.ndarray     # label of every cluster (-1: no labelled point in it)
    centers: np.ndarray
    n_given: int                  # labelled points given
    n_pseudo: int                 # unlabelled points that received a pseudo-label
    n_left: int                   # unlabelled points that received none
    n_clusters_unlabelled: int    # clusters with no labelled point
    n_correct: int | None = None  # pseudo-labels that were right (only when y_true is passed)

    @property
    def pseudo_accuracy(self) -> float | None:
        return None if self.n_correct is None or not self.n_pseudo else self.n_correct / self.n_pseudo

    def as_dict(self) -> dict:
        return {"given": self.n_given, "pseudo-labelled": self.n_pseudo, "left unlabelled": self.n_left,
                "clusters without a label": self.n_clusters_unlabelled, "pseudo-labels right": self.n_correct,
                "pseudo-label accuracy": self.pseudo_accuracy}


def cluster_then_label(X, y_semi, n_clusters: int, *, random_state=0, n_init: int = 3, y_true=None,
                       unlabelled_clusters: str = "drop", dtype="float64", device="cpu") -> ClusterLabelResult:
    """Pseudo-labels from k-means clusters (see the module docstring); ``y_true`` only instruments."""
    from .estimator import KMeans

    X, y = validate_targets(X, y_semi)
    k = validate_int("n_clusters", n_clusters, minimum=1, maximum=len(X),
                  hint=f"use more clusters than classes but at most n_samples ({len(X)})")
    validate_choice("unlabelled_clusters", unlabelled_clusters, ("drop", "nearest"))
    km = KMeans(k, n_init=n_init, random_state=random_state, dtype=dtype, device=device).fit(X)
    cl = label_clusters(km.labels_, y, k)
    if unlabelled_clusters == "nearest" and (cl < 0).any():
        has = np.flatnonzero(cl >= 0)
        for c in np.flatnonzero(cl < 0):
            cl[c] = cl[has[np.argmin(((km.cluster_centers_[has] - km.cluster_centers_[c]) ** 2).sum(1))]]
    y_pseudo = np.where(y >= 0, y, cl[km.labels_])
    unl = y < 0
    got = unl & (y_pseudo >= 0)
    n_correct = None
    if y_true is not None:
        y_true = np.asarray(y_true)
        if len(y_true) != len(y):
            raise ArgumentError(f"y_true must have the same length as y ({len(y)}), got {len(y_true)}")
        n_correct = int((y_pseudo[got] == y_true[got]).sum())
    return ClusterLabelResult(y_pseudo, km.labels_, cl, km.cluster_centers_, int((~unl).sum()), int(got.sum()),
                              int((unl & (y_pseudo < 0)).sum()), int((cl < 0).sum()), n_correct)


def cluster_then_label_method(n_clusters: int = 30, make_model=None, *, random_state=0, n_init: int = 3,
                              unlabelled_clusters: str = "drop"):
    """A ``fit_predict(X_train, y_semi, X_test)`` for :func:`labkit.semisup.evaluate`.

    Fixed in advance (not tuned on the test half): ``n_clusters=30`` (three per digit class),
    ``n_init=3``, ``random_state=0``, the course's logistic regression as the classifier. The
    method's ``.last`` holds the last :class:`ClusterLabelResult`.
    """
    from ..semisup import logistic_regression

    make_model = make_model or logistic_regression

    def fit_predict(X_train, y_semi, X_test):
        r = cluster_then_label(X_train, y_semi, n_clusters, random_state=random_state, n_init=n_init,
                               unlabelled_clusters=unlabelled_clusters)
        fit_predict.last = r
        keep = r.y_pseudo >= 0
        return make_model().fit(X_train[keep], r.y_pseudo[keep]).predict(X_test)

    fit_predict.last = None
    return fit_predict


def accuracy_methods() -> dict:
    """The methods of lab 06's accuracy table, all fixed in advance (see :mod:`labkit.semisup`)."""
    from .. import semisup

    return {"supervised only": semisup.supervised_only(), "label spreading": semisup.label_spreading(),
            "self-training": semisup.self_training(), "cluster-then-label (k=30)": cluster_then_label_method()}


def accuracy_rows(ks=(1, 3, 5, 10), seeds=range(10), progress: bool = False) -> list[dict]:
    """Test accuracy by the protocol (mean ± sd over ``seeds``) for :func:`accuracy_methods`."""
    from ..semisup import evaluate

    return evaluate(accuracy_methods(), ks=ks, seeds=seeds, progress=progress)
