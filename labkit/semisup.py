"""The evaluation protocol shared by the semi-supervised labs (06 k-means, 07 pseudo-labels).

Every accuracy figure in those labs is made the same way, so that tables can be compared:

1. scikit-learn's digits, pixel values / 16;
2. a stratified 50/50 train/test split by ``seed``;
3. ``k_per_class`` labels per class drawn from the train half by the same ``seed``; the rest of the
   train half is unlabelled (``-1``, scikit-learn's convention);
4. accuracy on the test half; mean ± standard deviation over seeds (10 by default);
5. nothing tuned on the test half: hyper-parameters are fixed in advance (the baselines below say
   which), or tuned on the labelled points only.

A *method* is any ``fit_predict(X_train, y_semi, X_test) -> y_pred``. :func:`evaluate` runs each
method on the same splits and returns one row per (method, K)::

    rows = evaluate({"label spreading": label_spreading(), "mine": my_method}, ks=(5,), seeds=range(3))
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from ._validate import validate_int

__all__ = ["Split", "split", "evaluate", "supervised_only", "label_spreading", "self_training",
           "logistic_regression", "one_blas_thread", "SEEDS"]

SEEDS = tuple(range(10))

Method = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Split:
    """One seed's split: ``y_semi`` is ``y_train`` with the unlabelled points set to ``-1``."""
    X_train: np.ndarray
    y_semi: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    seed: int
    k_per_class: int

    @property
    def labelled(self) -> np.ndarray:
        return np.flatnonzero(self.y_semi >= 0)


def one_blas_thread():
    """Limit NumPy's and scikit-learn's BLAS (OpenBLAS) to one thread in this process, until the returned
    limiter's ``restore_original_limits()`` is called (or use it as a context manager).

    The matrices of these labs are small (64 pixels, 25 components), so a second BLAS thread buys nothing; on a
    loaded machine it costs a great deal, because OpenBLAS threads wait for each other by spinning. Measured
    here (2 cores, one busy process beside the kernel): lab 07 run top to bottom took 118-195 s with the
    default two BLAS threads and 21 s with one (22 s unloaded). Lab 07's first cell calls this.
    """
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    return threadpool_limits(1, user_api="blas")


def split(k_per_class: int, seed: int = 0, dataset: tuple[np.ndarray, np.ndarray] | None = None) -> Split:
    """The protocol's split for one seed (digits by default; ``dataset=(X, y)`` for another set)."""
    from sklearn.model_selection import train_test_split

    from .data import load_digits, semi_supervised_targets

    k = validate_int("k_per_class", k_per_class, minimum=1)
    seed = validate_int("seed", seed, minimum=0)
    X, y = load_digits() if dataset is None else dataset
    X = np.asarray(X)
    y = np.asarray(y)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.5, random_state=seed, stratify=y)
    y_semi = semi_supervised_targets(y[tr], k, seed)  # says clearly when K exceeds a class's size
    return Split(X[tr], y_semi, y[tr], X[te], y[te], seed, k)


def evaluate(methods: Mapping[str, Method], ks: Iterable[int] = (5,), seeds: Iterable[int] = SEEDS,
             dataset: tuple[np.ndarray, np.ndarray] | None = None, progress: bool = False,
             threads: int | None = 1) -> list[dict]:
    """Run every method on the same splits; one row per (method, K): mean, sd, per-seed accuracies, seconds.

    A method that raises is recorded with its error (``"error"`` key) instead of stopping the table.
    ``threads``: BLAS/OpenMP and torch threads while the methods run (restored after; ``None`` leaves them). One
    thread gives the same accuracies and, on a loaded 2-core machine, measured faster: 8.4-9.2 s against 13.2-13.5 s
    for notebook 07's table of 9 methods x 3 K x 3 seeds beside one busy process (2026-12-02).
    """
    if threads is None:
        return _evaluate(methods, ks, seeds, dataset, progress)
    import torch
    from threadpoolctl import threadpool_limits

    threads = validate_int("threads", threads, minimum=1, hint="or None to leave the thread counts as they are")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            return _evaluate(methods, ks, seeds, dataset, progress)
    finally:
        torch.set_num_threads(before)


def _evaluate(methods, ks, seeds, dataset, progress) -> list[dict]:
    from .viz import progress as _progress

    if not methods:
        raise ValueError("methods is empty: pass a dict {name: fit_predict(X_train, y_semi, X_test)}")
    ks, seeds = [validate_int("k", k, minimum=1) for k in ks], [validate_int("seed", s, minimum=0) for s in seeds]
    if not ks or not seeds:
        raise ValueError(f"need at least one K and one seed, got ks={ks}, seeds={seeds}")
    acc = {(m, k): [] for m in methods for k in ks}
    secs = {(m, k): 0.0 for m in methods for k in ks}
    errors: dict[tuple[str, int], str] = {}
    jobs = [(k, s) for k in ks for s in seeds]
    for k, s in (_progress(jobs, desc="ssl protocol") if progress else jobs):
        sp = split(k, s, dataset)
        for name, fit_predict in methods.items():
            if (name, k) in errors:
                continue
            t0 = time.perf_counter()
            try:
                pred = np.asarray(fit_predict(sp.X_train, sp.y_semi.copy(), sp.X_test))
            except Exception as e:  # keep the table; say what failed
                errors[(name, k)] = f"{type(e).__name__}: {e}"
                continue
            secs[(name, k)] += time.perf_counter() - t0
            if pred.shape != sp.y_test.shape:
                errors[(name, k)] = f"returned shape {pred.shape}, expected {sp.y_test.shape}"
                continue
            acc[(name, k)].append(float((pred == sp.y_test).mean()))
    rows = []
    for name in methods:
        for k in ks:
            a = np.array(acc[(name, k)])
            row = {"method": name, "K": k, "mean": float(a.mean()) if a.size else float("nan"),
                   "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0, "seeds": len(a),
                   "seconds": secs[(name, k)], "accuracies": a.tolist()}
            if (name, k) in errors:
                row["error"] = errors[(name, k)]
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- baselines
def logistic_regression():
    """The course's fixed supervised model: multinomial logistic regression, C=1 (fixed in advance)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=2000)


def supervised_only(make_model: Callable[[], object] = logistic_regression) -> Method:
    """Train ``make_model()`` on the labelled points only (the baseline every method must beat)."""
    def fit_predict(X_train, y_semi, X_test):
        lab = y_semi >= 0
        return make_model().fit(X_train[lab], y_semi[lab]).predict(X_test)
    return fit_predict


def label_spreading(gamma: float = 10.0, alpha: float = 0.2) -> Method:
    """scikit-learn's ``LabelSpreading`` with an RBF kernel; ``gamma``/``alpha`` fixed in advance."""
    def fit_predict(X_train, y_semi, X_test):
        from sklearn.semi_supervised import LabelSpreading

        return LabelSpreading(kernel="rbf", gamma=gamma, alpha=alpha, max_iter=100).fit(X_train, y_semi).predict(X_test)
    return fit_predict


def self_training(make_model: Callable[[], object] = logistic_regression, threshold: float = 0.9) -> Method:
    """scikit-learn's ``SelfTrainingClassifier`` around ``make_model()`` (threshold fixed in advance)."""
    def fit_predict(X_train, y_semi, X_test):
        from sklearn.semi_supervised import SelfTrainingClassifier

        try:  # scikit-learn >= 1.6 calls the base model `estimator`
            clf = SelfTrainingClassifier(estimator=make_model(), threshold=threshold)
        except TypeError:
            clf = SelfTrainingClassifier(make_model(), threshold=threshold)
        return clf.fit(X_train, y_semi).predict(X_test)
    return fit_predict
