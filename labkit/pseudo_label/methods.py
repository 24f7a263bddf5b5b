"""The lab's methods as ``fit_predict(X_train, y_semi, X_test)`` functions for :func:`labkit.semisup.evaluate`.

Every hyper-parameter here is fixed in advance (chosen on development splits, seeds 100-104, never on the
reported seeds 0-9) or fitted on labelled points only (the temperature, by cross-fitting): see the
benchmark's notes.
"""
from __future__ import annotations

import numpy as np

from .confidence import cross_fitted_temperature
from .generative import GaussianEM
from .self_training import SelfTraining

__all__ = ["GENERATIVE", "generative", "generative_supervised", "generative_self_training",
           "generative_plus_spreading", "calibrated_model", "SHIFTS", "shift_images", "with_shifted_labels", "shifted",
           "METHODS", "make_methods", "local_protocol"]

# fixed in advance: full covariances, 25 PCA dimensions, a prior worth 3 points (development seeds 100-104). They
# are GaussianEM's defaults, read from there so that the two cannot drift apart: GaussianEM() is this model.
GENERATIVE = {k: GaussianEM().get_params()[k] for k in ("n_components", "covariance_type", "shrinkage")}


def _make(**overrides):
    return GaussianEM(**{**GENERATIVE, **overrides})


def generative(lam: float = 1.0, **overrides):
    """Semi-supervised EM (labelled + unlabelled, weight ``lam`` on the unlabelled points)."""
    def fit_predict(X_train, y_semi, X_test):
        return _make(lam=lam, **overrides).fit(X_train, y_semi).predict(X_test)
    return fit_predict


def generative_supervised(**overrides):
    """The same model fitted on the labelled points only (EM's own supervised-only baseline)."""
    return generative(lam=0.0, **overrides)


def calibrated_model(X_train, y_semi, lam: float = 1.0, seed: int = 0, **overrides) -> GaussianEM:
    """EM fit with its temperature cross-fitted on the labelled points (T = 1 when K = 1)."""
    T = cross_fitted_temperature(lambda: _make(lam=lam, **overrides), X_train, y_semi, seed=seed)
    return _make(lam=lam, temperature=1.0 if T is None else T, **overrides).fit(X_train, y_semi)


def generative_self_training(threshold: float = 0.95, **overrides):
    """Self-training around the generative model fitted on labelled points, with a calibrated temperature."""
    def fit_predict(X_train, y_semi, X_test):
        # the base model sees the labelled (then pseudo-labelled) points only: at most that many PCA dimensions
        kw = {"n_components": min(GENERATIVE["n_components"], int((y_semi >= 0).sum())), **overrides}
        T = cross_fitted_temperature(lambda: _make(lam=0.0, **kw), X_train, y_semi)
        base = _make(lam=0.0, temperature=1.0 if T is None else T, **kw)
        return SelfTraining(base, threshold=threshold).fit(X_train, y_semi).predict(X_test)
    return fit_predict


def generative_plus_spreading(gamma: float = 10.0, alpha: float = 0.2, **overrides):
    """EM's posterior averaged with LabelSpreading's (the two make different mistakes)."""
    def fit_predict(X_train, y_semi, X_test):
        from sklearn.semi_supervised import LabelSpreading

        em = _make(**overrides).fit(X_train, y_semi)
        ls = LabelSpreading(kernel="rbf", gamma=gamma, alpha=alpha, max_iter=100).fit(X_train, y_semi)
        p_ls = np.nan_to_num(ls.predict_proba(X_test), nan=1.0 / len(ls.classes_))
        return em.classes_[(em.predict_proba(X_test) + p_ls).argmax(axis=1)]
    return fit_predict



# ----------------------------------------------------------------------------- shifted copies of the labels
SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # one pixel right, left, down, up


def shift_images(X, dy: int, dx: int) -> np.ndarray:
    """Rows of ``X`` as square images (8x8 digits, 28x28 MNIST) moved by (dy, dx) pixels, zero-filled."""
    X = np.asarray(X)
    side = int(round(np.sqrt(X.shape[1])))
    if side * side != X.shape[1]:
        raise ValueError(f"rows of X must be square images, got {X.shape[1]} features")
    img = X.reshape(len(X), side, side)
    out = np.zeros_like(img)
    src_y, dst_y = slice(max(-dy, 0), side - max(dy, 0)), slice(max(dy, 0), side - max(-dy, 0))
    src_x, dst_x = slice(max(-dx, 0), side - max(dx, 0)), slice(max(dx, 0), side - max(-dx, 0))
    out[:, dst_y, dst_x] = img[:, src_y, src_x]
    return out.reshape(len(X), -1)


def with_shifted_labels(X, y_semi, shifts=SHIFTS):
    """Append, for every labelled point, copies moved by one pixel (same label): prior knowledge that a digit
    stays the same digit when moved a little (Simard et al.'s "virtual examples"; the same invariance the
    weak augmentation of FixMatch uses). The unlabelled points are not copied."""
    lab = np.flatnonzero(np.asarray(y_semi) >= 0)
    Xs, ys = [np.asarray(X)], [np.asarray(y_semi)]
    for dy, dx in shifts:
        Xs.append(shift_images(np.asarray(X)[lab], dy, dx))
        ys.append(np.asarray(y_semi)[lab])
    return np.concatenate(Xs), np.concatenate(ys)


def shifted(method):
    """Wrap a ``fit_predict`` so that it is trained with :func:`with_shifted_labels`."""
    def fit_predict(X_train, y_semi, X_test):
        Xa, ya = with_shifted_labels(X_train, y_semi)
        return method(Xa, ya, X_test)
    return fit_predict


# ----------------------------------------------------------------------------- the table's methods, by name
def _ls():
    from .. import semisup
    return semisup.label_spreading()


def _sk_st():
    from .. import semisup
    return semisup.self_training()


def _lr():
    from .. import semisup
    return semisup.supervised_only()


# name -> factory of a fit_predict; names are what ranks receive (picklable), the factories live here
METHODS = {
    "logistic regression, labelled only": _lr,
    "LabelSpreading (sklearn)": _ls,
    "SelfTrainingClassifier (sklearn, LR)": _sk_st,
    "generative, labelled only": generative_supervised,
    "generative EM": generative,
    "generative self-training (calibrated)": generative_self_training,
    "generative EM + LabelSpreading": generative_plus_spreading,
    "LabelSpreading, shifted labels": lambda: shifted(_ls()),
    "generative, labelled only, shifted labels": lambda: shifted(generative_supervised()),
    "generative EM, shifted labels": lambda: shifted(generative()),
}


def make_methods(names=None) -> dict:
    names = list(METHODS) if names is None else list(names)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return {n: METHODS[n]() for n in names}


def local_protocol(methods: list[str] | None = None, ks=(5,), seeds=(0, 1), dataset=None) -> list[dict]:
    from .. import semisup

    return semisup.evaluate(make_methods(methods), ks=ks, seeds=seeds, dataset=dataset)
