"""Confidence of a pseudo-label: the article's D as posterior odds, calibration, temperature scaling.

The source article scores a pseudo-label by D = P(Y = y_hat | X) / P(Y != y_hat | X). With p = P(Y = y_hat | X),
P(Y != y_hat | X) = 1 - p, so D = p / (1 - p): the **posterior odds**. The map p -> p / (1 - p) is increasing, so

    D >= t   <=>   p >= t / (1 + t)          (t = 1 is p >= 0.5; t = 9 is p >= 0.9; t = 99 is p >= 0.99)

and thresholding D is thresholding the posterior: nothing new. What matters is whether p means what it says.
A model is *calibrated* when, among points given confidence p, a share p is right. The reliability diagram
bins the confidences and plots the accuracy per bin against the mean confidence per bin; the expected
calibration error is ECE = sum_b (n_b / n) |acc_b - conf_b| (Guo et al. 2017). Temperature scaling divides the
logits by one number T > 0 fitted by minimising the negative log-likelihood on held-out labelled points (T > 1
softens an over-confident model); it never changes the argmax, so accuracy stays the same.
"""
from __future__ import annotations

import numpy as np

from .._validate import ArgumentError, validate_int, validate_number

__all__ = ["posterior_odds", "odds_to_posterior_threshold", "posterior_to_odds_threshold", "softmax",
           "reliability_diagram", "expected_calibration_error", "fit_temperature", "validate_threshold",
           "cross_fitted_temperature", "class_logits"]


def validate_threshold(threshold, name: str = "threshold") -> float:
    """A posterior threshold must lie in (0, 1]."""
    return validate_number(name, threshold, minimum=0, maximum=1, open_low=True,
                        hint="a posterior probability in (0, 1]; for an odds threshold t on D use t / (1 + t)")


def posterior_odds(proba) -> np.ndarray:
    """The article's D = P(y_hat | x) / P(not y_hat | x) per row of ``proba`` (inf where p = 1)."""
    p = np.asarray(proba, dtype=float).max(axis=1)
    with np.errstate(divide="ignore"):
        return p / (1.0 - p)


def odds_to_posterior_threshold(t) -> float:
    """A threshold t > 0 on D is the threshold t / (1 + t) on the posterior."""
    t = validate_number("t", t, minimum=0, open_low=True, hint="an odds threshold D >= t with t > 0")
    return t / (1.0 + t)


def posterior_to_odds_threshold(p) -> float:
    """The inverse map: a posterior threshold p in (0, 1) is the odds threshold p / (1 - p)."""
    p = validate_number("p", p, minimum=0, maximum=1, open_low=True, open_high=True)
    return p / (1.0 - p)


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    T = validate_number("temperature", temperature, minimum=0, open_low=True)
    a = np.asarray(logits, dtype=float) / T
    a = a - a.max(axis=1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=1, keepdims=True)


def _conf_correct(proba, y_true, classes=None):
    proba = np.asarray(proba, dtype=float)
    y_true = np.asarray(y_true)
    if proba.ndim != 2 or len(proba) != len(y_true):
        raise ArgumentError(f"proba must be (n, n_classes) with n = len(y_true) = {len(y_true)}, got {proba.shape}")
    classes = np.arange(proba.shape[1]) if classes is None else np.asarray(classes)
    return proba.max(axis=1), classes[proba.argmax(axis=1)] == y_true


def reliability_diagram(proba, y_true, n_bins: int = 10, classes=None) -> dict:
    """Per equal-width confidence bin: count, mean confidence, accuracy (nan for empty bins)."""
    n_bins = validate_int("n_bins", n_bins, minimum=1)
    conf, correct = _conf_correct(proba, y_true, classes)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
        acc = np.bincount(which, weights=correct.astype(float), minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": acc,
            "ece": expected_calibration_error(proba, y_true, n_bins, classes)}


def expected_calibration_error(proba, y_true, n_bins: int = 10, classes=None) -> float:
    """ECE = sum over bins of (share of points) * |accuracy - mean confidence| (equal-width bins)."""
    n_bins = validate_int("n_bins", n_bins, minimum=1)
    conf, correct = _conf_correct(proba, y_true, classes)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def fit_temperature(logits, y, classes=None, bounds=(1e-2, 1e4)) -> float:
    """The T > 0 minimising the mean negative log-likelihood of softmax(logits / T) on (held-out) labels ``y``.

    One-dimensional, so a bounded scalar search on log T is exact enough (scipy's ``minimize_scalar``).
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=float)
    y = np.asarray(y)
    if logits.ndim != 2 or len(logits) != len(y) or len(y) == 0:
        raise ArgumentError(f"logits must be (n, n_classes) with n = len(y) = {len(y)} > 0, got {logits.shape}")
    classes = np.arange(logits.shape[1]) if classes is None else np.asarray(classes)
    idx = np.searchsorted(classes, y)
    if np.any(idx >= len(classes)) or np.any(classes[np.minimum(idx, len(classes) - 1)] != y):
        raise ArgumentError("y holds a label that is not among the model's classes; pass held-out labelled points")

    def nll(log_t):
        a = logits / np.exp(log_t)
        a = a - a.max(axis=1, keepdims=True)
        return float(-(a[np.arange(len(y)), idx] - np.log(np.exp(a).sum(axis=1))).mean())

    res = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))


def class_logits(model, X) -> np.ndarray:
    """(n, n_classes) logits of a fitted classifier: ``predict_joint_log_proba`` where it has one (labkit's
    GaussianEM, scikit-learn's naive Bayes), else ``decision_function`` (a two-class one's (n,) log-odds become the
    two columns ``[0, odds]``, which a softmax reads the same)."""
    if hasattr(model, "predict_joint_log_proba"):
        return np.asarray(model.predict_joint_log_proba(X))
    d = np.asarray(model.decision_function(X))
    return np.stack([np.zeros_like(d), d], axis=1) if d.ndim == 1 else d


def cross_fitted_temperature(make_model, X, y_semi, seed: int = 0, repeats: int = 1) -> float | None:
    """Temperature fitted on labelled points the model did not see: two stratified folds of the labelled
    points; each fold is hidden (set to -1, so it is still used as unlabelled data), the model is fitted on the
    rest and scores the hidden fold; T is fitted on all the held-out scores (of ``repeats`` random fold splits,
    pooled: more repeats, a steadier T). Only labels are used, never a test set. ``make_model()`` must give
    logits (:func:`class_logits`: ``predict_joint_log_proba`` or ``decision_function``). Returns None with fewer
    than 2 labels in some class (nothing can be held out)."""
    y_semi = np.asarray(y_semi)
    lab = np.flatnonzero(y_semi >= 0)
    classes, counts = np.unique(y_semi[lab], return_counts=True)
    if counts.min() < 2:
        return None
    repeats = validate_int("repeats", repeats, minimum=1)
    rng = np.random.default_rng(seed)
    logits, ys = [], []
    for _, f in [(r, f) for r in range(repeats) for f in (0, 1)]:
        if f == 0:
            fold = np.empty(len(lab), dtype=int)
            for c in classes:
                where = np.flatnonzero(y_semi[lab] == c)
                fold[rng.permutation(where)] = np.arange(len(where)) % 2
        held = lab[fold == f]
        y2 = y_semi.copy()
        y2[held] = -1
        model = make_model().fit(X, y2)
        logits.append(class_logits(model, X[held]))
        ys.append(y_semi[held])
    return fit_temperature(np.concatenate(logits), np.concatenate(ys), classes=classes)
