"""A Gaussian generative classifier P(x|y)P(y) in a PCA space, fitted by EM on labelled + unlabelled points.

The model (Nigam et al. 2000 did the same with naive Bayes on text; here the class conditionals are Gaussian)::

    z = PCA(x)                     fitted on every training point, labelled or not (no label is used)
    P(y = c) = pi_c                P(z | y = c) = N(z; mu_c, Sigma_c)
    P(y = c | z) = pi_c N(z; mu_c, Sigma_c) / sum_k pi_k N(z; mu_k, Sigma_k)

EM maximises the weighted, penalised log-likelihood

    J = sum_{labelled i} log pi_{y_i} N(z_i | y_i)  +  lam * sum_{unlabelled j} log sum_c pi_c N(z_j | c)
        + sum_c log prior(Sigma_c)

E-step: every unlabelled point gets responsibilities r_jc = P(y = c | z_j); labelled points keep their label
(r = one-hot). M-step: weighted counts, means and covariances, with weight 1 on labelled and ``lam`` on
unlabelled points. ``lam = 0`` is the supervised-only fit of the same model.

Covariance types (d = PCA dimensions, N_c = the class's weighted count, S_c its weighted scatter matrix):

============  ==================================================  ====================================
type          Sigma_c                                             parameters per class
============  ==================================================  ====================================
"full"        (S_c + tau s2 I) / (N_c + tau)                      d (d + 1) / 2
"tied"        (sum_c S_c + tau s2 I) / (N + tau), one for all     d (d + 1) / 2 in total
"diag"        diagonal of the "full" formula                      d
"spherical"   (trace S_c + tau s2 d) / (d (N_c + tau)) * I        1
============  ==================================================  ====================================

Shrinkage: ``tau = shrinkage`` is a pseudo-count of prior points with covariance ``s2 I`` (``s2`` = the mean
per-dimension variance of the data, fixed before EM starts). It is the maximum a posteriori estimate under an
inverse-Wishart prior, so EM on ``J`` (prior included) never decreases ``J``: ``log_likelihood_`` records
``J / n`` after every iteration and the tests check that it never goes down.

The module is long because the model, its EM and the label checks that make it a scikit-learn classifier with the
semi-supervised convention (``-1`` = unlabelled) are read together; :mod:`.self_training` reuses those checks.
"""
from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import column_or_1d

from .._sklearn import NotFitted as _NotFitted
from .._sklearn import validate_data
from .._validate import ArgumentError, validate_choice, validate_finite, validate_int, validate_number

__all__ = ["GaussianEM", "EXPECTED_FAILED_CHECKS", "validate_semi_supervised", "labelled_mask",
           "log_joint", "e_step", "COVARIANCE_TYPES"]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")



def _check_X(X, name_X: str = "X", estimator=None, reset: bool = True) -> np.ndarray:
    """``X`` as a finite float64 (n, d) array; with ``estimator``, its features counted and named the way
    scikit-learn does (``n_features_in_`` set when ``reset``, compared otherwise). Sparse input is made dense."""
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    if sp.issparse(X):
        X = X.toarray()
    ndim = X.ndim if hasattr(X, "ndim") else np.asarray(X).ndim
    if ndim != 2:
        raise ArgumentError(f"{name_X} must be a 2-D array (n_samples, n_features), got {ndim} dimension(s); "
                            f"Reshape your data: images with X.reshape(len(X), -1), one sample with x.reshape(1, -1)")
    if estimator is not None:
        X = validate_data(estimator, X, reset=reset, dtype=np.float64, ensure_all_finite=False,
                          ensure_min_samples=1)
    else:
        X = np.asarray(X, dtype=float)
        if len(X) == 0:
            raise ArgumentError(f"{name_X} is empty: pass at least one sample")
    validate_finite(name_X, X)
    return X


def _check_labels(y, n: int, name_y: str = "y", name_X: str = "X", class_names: bool = True) -> np.ndarray:
    """``y`` as a 1-D array of n labels: int64 (``-1`` = unlabelled) when the labels are integers (or floats with
    integer values), otherwise (only if ``class_names``) the class labels as given (strings, booleans), every
    point labelled."""
    if y is None:
        raise ArgumentError(f"{name_y} is None: this estimator requires y to be passed, but the target y is None; "
                            f"pass one class label per row of {name_X}, -1 for an unlabelled row")
    y_arr = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y)
    if y_arr.ndim == 2 and y_arr.shape[1] == 1:
        y_arr = column_or_1d(y_arr, warn=True)  # scikit-learn's DataConversionWarning, then accepted
    if y_arr.ndim != 1:
        raise ArgumentError(f"{name_y} must be 1-D (one label per sample), got shape {y_arr.shape}")
    if len(y_arr) != n:
        raise ArgumentError(f"{name_X} and {name_y} have different lengths ({n} and {len(y_arr)}): "
                            f"pass one label (or -1) per row of {name_X}")
    if y_arr.dtype == object:  # integers, numbers or class names stored as objects
        if all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in y_arr):
            y_arr = y_arr.astype(np.int64)
        elif all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in y_arr):
            y_arr = y_arr.astype(float)
        elif any(isinstance(v, numbers.Number) and v == -1 for v in y_arr):
            names = [v for v in y_arr if not isinstance(v, numbers.Number)][:3]
            raise ArgumentError(f"{name_y} mixes class names such as {names} with -1: -1 marks an unlabelled point "
                                f"only among integer labels; encode the classes as integers (sklearn.preprocessing."
                                f"LabelEncoder on the labelled points), then set the unlabelled ones to -1")
        elif any(isinstance(v, float) and not np.isfinite(v) for v in y_arr):
            raise ArgumentError(f"{name_y} holds NaN or infinite labels: pass integer class labels or -1 for "
                                f"unlabelled")
    if y_arr.dtype.kind == "f":
        whole = np.isfinite(y_arr) & (y_arr == np.round(np.nan_to_num(y_arr)))
        if not whole.all():
            bad = y_arr[~whole][:3]
            raise ArgumentError(f"{name_y} must hold integer class labels or -1 for unlabelled, got non-integer "
                                f"values such as {bad.tolist()} (Unknown label type: continuous); for regression "
                                f"targets use a regressor, otherwise pass whole numbers")
        y_arr = y_arr.astype(np.int64)
    elif y_arr.dtype.kind == "c":
        raise ArgumentError(f"{name_y} must hold integer class labels or -1 for unlabelled, got complex numbers "
                            f"(Unknown label type: complex)")
    if y_arr.dtype.kind not in "iu" and not class_names:
        raise ArgumentError(f"{name_y} must hold integer class labels or -1 for unlabelled, got dtype "
                            f"{y_arr.dtype} (e.g. {y_arr[:3].tolist()}); encode string classes with "
                            f"sklearn.preprocessing.LabelEncoder first")
    if y_arr.dtype.kind in "iu":
        y_arr = y_arr.astype(np.int64)
        if np.any(y_arr < -1):
            raise ArgumentError(f"{name_y} must hold labels >= 0, or -1 for unlabelled, got "
                                f"{sorted(set(y_arr[y_arr < -1].tolist()))[:3]}")
        if not np.any(y_arr >= 0):
            raise ArgumentError(f"{name_y} has no labelled point (all -1): label at least one point per class")
    return y_arr


def labelled_mask(y) -> np.ndarray:
    """Which entries of labels checked by :func:`validate_semi_supervised` are labelled (``-1`` only counts as
    unlabelled among integer labels; class names are all labelled)."""
    y = np.asarray(y)
    return y >= 0 if y.dtype.kind in "iu" else np.ones(len(y), dtype=bool)


def validate_semi_supervised(X, y=None, *, name_X: str = "X", name_y: str = "y", class_names: bool = False):
    """Validate ``X`` (n, d) finite floats and ``y`` (n,) labels; return ``X`` (float64) or ``(X, y)``.

    The semi-supervised convention of ``sklearn.semi_supervised``: ``y`` holds integers (or floats with integer
    values), ``-1`` marks an unlabelled point (other negative integers are refused as likely mistakes). With
    ``class_names=True`` (what the estimators pass) class names such as strings are accepted too, as
    scikit-learn's classifiers accept them, for a fully labelled fit; ``-1`` among names is refused, since it
    would be ambiguous. Labels that are neither (0.5, NaN) raise :class:`ArgumentError` naming ``y``."""
    X = _check_X(X, name_X)
    if y is None:
        return X
    return X, _check_labels(y, len(X), name_y, name_X, class_names=class_names)


def _logdet_and_maha(Z, mean, cov, kind):
    """log|Sigma| and the squared Mahalanobis distance of every row of Z (kind: how cov is stored)."""
    diff = Z - mean
    if kind == "full":
        L = np.linalg.cholesky(cov)
        sol = np.linalg.solve(L, diff.T)  # triangular, but plain solve keeps scipy out
        return 2.0 * np.log(np.diag(L)).sum(), (sol ** 2).sum(axis=0)
    if kind == "diag":
        return np.log(cov).sum(), (diff ** 2 / cov).sum(axis=1)
    # spherical: cov is one variance
    return Z.shape[1] * np.log(cov), (diff ** 2).sum(axis=1) / cov


def log_joint(Z, means, covariances, priors, covariance_type: str = "full") -> np.ndarray:
    """log pi_c + log N(z; mu_c, Sigma_c) for every row of ``Z`` and class c: an (n, C) array.

    ``covariances``: (C, d, d) for "full", (d, d) for "tied", (C, d) for "diag", (C,) for "spherical".
    """
    Z = np.asarray(Z, dtype=float)
    n, d = Z.shape
    out = np.empty((n, len(means)))
    for c in range(len(means)):
        kind = "full" if covariance_type in ("full", "tied") else covariance_type
        cov = covariances if covariance_type == "tied" else covariances[c]
        logdet, maha = _logdet_and_maha(Z, means[c], cov, kind)
        out[:, c] = np.log(priors[c]) - 0.5 * (d * np.log(2 * np.pi) + logdet + maha)
    return out


def _logsumexp(a, axis=1):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def e_step(Z, means, covariances, priors, covariance_type: str = "full") -> tuple[np.ndarray, np.ndarray]:
    """The E-step: responsibilities P(y = c | z) (n, C), rows summing to 1, and log p(z) per row.

    Computed in log space (log-sum-exp), so points far from every mean do not underflow to 0/0.
    """
    lj = log_joint(Z, means, covariances, priors, covariance_type)
    lse = _logsumexp(lj)
    return np.exp(lj - lse[:, None]), lse


# checks of scikit-learn 1.9's check_estimator that GaussianEM fails on purpose, each with the reason
EXPECTED_FAILED_CHECKS = {
    "check_non_transformer_estimators_n_iter":
        "n_iter_ counts EM iterations after the closed-form supervised start; with every point labelled (the "
        "check's data) there is nothing for EM to do and n_iter_ is 0 by design (scikit-learn's "
        "SelfTrainingClassifier fails this check too, for its own all-labelled case)",
    "check_classifiers_classes":
        "its last case names two classes -1 and 1, and -1 is the semi-supervised convention's 'unlabelled' "
        "(scikit-learn passes integer labels instead to its own semi-supervised estimators, by name, in this "
        "check); every other case of the check, string class names included, passes",
}


class GaussianEM(ClassifierMixin, BaseEstimator):
    """Gaussian class-conditional classifier in a PCA space, fitted by (semi-supervised) EM; a scikit-learn
    classifier (``clone``, ``Pipeline``, ``GridSearchCV``, ``cross_val_score``; ``check_estimator`` passes but for
    :data:`EXPECTED_FAILED_CHECKS`).

    ``fit(X, y)`` follows ``sklearn.semi_supervised``: with integer labels, ``y == -1`` marks an unlabelled point.
    Class names (strings) are accepted for a fully labelled fit, as any scikit-learn classifier accepts them; to
    mix them with unlabelled points, encode them as integers first (``-1`` among names is refused). ``score(X, y)``
    is the accuracy on every row of ``y``, as scikit-learn's ``SelfTrainingClassifier.score`` (its base
    estimator's accuracy): a ``-1`` in ``y`` counts as a miss, so score on the true labels of held-out points.

    The defaults are the lab's configuration (``labkit.pseudo_label.methods.GENERATIVE``: 25 PCA dimensions, full
    covariances, a prior worth 3 points), fixed on the development seeds.

    n_components: PCA dimensions (``None``: no PCA), at most min(n_samples, n_features). The PCA is fitted on every
        point passed to ``fit``.
    covariance_type: "full", "tied", "diag" or "spherical" (see the module docstring).
    shrinkage: pseudo-count tau of the prior covariance ``s2 I`` (>= 0; > 0 keeps "full" invertible).
    lam: weight of the unlabelled points in [0, 1]; 0 = supervised only (the same model, no unlabelled data).
    max_iter, tol: EM stops after ``max_iter`` iterations or when J/n improves by less than ``tol``.
    temperature: divides the log-joint before the softmax in ``predict_proba`` (1 = the model's own posterior;
        set it with ``labkit.pseudo_label.fit_temperature`` on held-out labelled points). EM itself ignores it.
    components_per_class: M Gaussians per class (Nigam et al. 2000, section 6: a class made of sub-styles);
        labelled points are shared among their own class's components only. ``means_`` etc. then hold C * M
        components, ``component_class_`` says which class each belongs to. With M > 1, ``lam = 0`` still
        iterates (EM on the labelled points alone).

    ``__init__`` stores the parameters as given; ``fit`` checks them.

    Attributes after ``fit``: ``classes_``, ``n_features_in_``, ``pca_mean_``, ``pca_components_``, ``means_``,
    ``covariances_``, ``priors_``, ``component_class_``, ``log_likelihood_``
    (J/n after the supervised start and after every EM iteration),
    ``n_iter_``, ``converged_``, ``transduction_`` (argmax label of every training point; labelled keep theirs).
    """

    def __init__(self, n_components: int | None = 25, covariance_type: str = "full", shrinkage: float = 3.0,
                 lam: float = 1.0, max_iter: int = 100, tol: float = 1e-6, temperature: float = 1.0,
                 components_per_class: int = 1):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.shrinkage = shrinkage
        self.lam = lam
        self.max_iter = max_iter
        self.tol = tol
        self.temperature = temperature
        self.components_per_class = components_per_class

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # accepted, made dense (the PCA and the Gaussians are dense)
        return tags

    # ------------------------------------------------------------------ fitting
    def _check_params(self, n, d):
        validate_choice("covariance_type", self.covariance_type, COVARIANCE_TYPES)
        validate_number("shrinkage", self.shrinkage, minimum=0)
        validate_number("lam", self.lam, minimum=0, maximum=1)
        validate_int("max_iter", self.max_iter, minimum=0)
        validate_number("tol", self.tol, minimum=0)
        validate_number("temperature", self.temperature, minimum=0, open_low=True)
        if self.n_components is not None:
            validate_int("n_components", self.n_components, minimum=1, maximum=min(n, d),
                         hint=f"use at most min(n_samples, n_features) (here n_samples={n}, n_features={d}), "
                              f"or None for no PCA")
        if self.covariance_type == "full" and self.shrinkage == 0:
            raise ArgumentError("shrinkage must be > 0 with covariance_type='full' (a class with fewer labelled "
                                "points than dimensions has a singular covariance), got 0")

    def _project(self, X):
        if self.pca_components_ is None:
            return X - self.pca_mean_
        return (X - self.pca_mean_) @ self.pca_components_.T

    def fit(self, X, y) -> "GaussianEM":
        X = _check_X(X, estimator=self, reset=True)
        y = _check_labels(y, len(X))
        n, d = X.shape
        self._check_params(n, d)
        M = validate_int("components_per_class", self.components_per_class, minimum=1)
        self.pca_mean_ = X.mean(axis=0)
        if self.n_components is None:
            self.pca_components_ = None
        else:  # PCA by SVD of the centred data: no label is used
            _, _, vt = np.linalg.svd(X - self.pca_mean_, full_matrices=False)
            self.pca_components_ = vt[: self.n_components]
        Z = self._project(X)
        lab = labelled_mask(y)
        self.classes_ = np.unique(y[lab])
        C = len(self.classes_)
        comp = np.repeat(np.arange(C), M)  # component -> class index
        self.component_class_ = self.classes_[comp]
        Y = np.zeros((n, C))
        Y[np.flatnonzero(lab), np.searchsorted(self.classes_, y[lab])] = 1.0
        allowed = np.ones((n, C * M), dtype=bool)  # a labelled point may only belong to its class's components
        allowed[lab] = Y[lab][:, comp] > 0
        self._s2 = float(Z.var(axis=0).mean()) or 1.0
        unl = ~lab
        w = np.where(lab, 1.0, float(self.lam))  # per-point weight in J
        self._m_step(Z, Y * w[:, None])  # iteration 0: the supervised-only fit, one Gaussian per class
        if M > 1:
            self._split(M)
        lj = self._component_log_joint(Z)
        self.log_likelihood_ = [self._objective(lj, allowed, lab, w) / n]
        self.converged_ = False
        self.n_iter_ = 0
        if (self.lam > 0 and unl.any()) or M > 1:
            for it in range(self.max_iter):
                # E-step (e_step()'s computation, reusing the log-joint the objective needed; labelled points
                # are restricted to their own class's components)
                la = np.where(allowed, lj, -np.inf)
                R = np.exp(la - _logsumexp(la)[:, None])
                self._m_step(Z, R * w[:, None])
                lj = self._component_log_joint(Z)
                self.log_likelihood_.append(self._objective(lj, allowed, lab, w) / n)
                self.n_iter_ = it + 1
                if self.log_likelihood_[-1] - self.log_likelihood_[-2] < self.tol:
                    self.converged_ = True
                    break
        else:
            self.converged_ = True
        self.transduction_ = self.classes_[self._class_log_joint(lj).argmax(axis=1)]
        self.transduction_[lab] = y[lab]
        return self

    def _split(self, M: int) -> None:
        """Start M components per class: the class's Gaussian copied M times, the means spread along the
        direction of largest variance (+- half a standard deviation for M = 2), the prior shared."""
        kind, C = self.covariance_type, len(self.means_)
        means = []
        for c in range(C):
            if kind in ("full", "tied"):
                vals, vecs = np.linalg.eigh(self.covariances_[c] if kind == "full" else self.covariances_)
                step = np.sqrt(vals[-1]) * vecs[:, -1]
            else:
                var = self.covariances_[c] if kind == "diag" else np.full(self.means_.shape[1], self.covariances_[c])
                step = np.zeros_like(var)
                step[int(np.argmax(var))] = np.sqrt(var.max())
            means += [self.means_[c] + (m - (M - 1) / 2) / max(M - 1, 1) * step for m in range(M)]
        self.means_ = np.stack(means)
        self.priors_ = np.repeat(self.priors_ / M, M)
        if kind != "tied":
            self.covariances_ = np.repeat(self.covariances_, M, axis=0)

    def _m_step(self, Z, W):
        """Weighted counts, means and (shrunk) covariances from per-point class weights W (n, C)."""
        n, d = Z.shape
        tau, s2 = float(self.shrinkage), self._s2
        Nc = np.maximum(W.sum(axis=0), 1e-12)  # a component with no weight keeps a finite mean
        self.priors_ = Nc / Nc.sum()
        self.means_ = (W.T @ Z) / Nc[:, None]
        kind = self.covariance_type
        if kind == "spherical":
            sq = np.stack([(W[:, c] * ((Z - self.means_[c]) ** 2).sum(axis=1)).sum() for c in range(len(Nc))])
            self.covariances_ = (sq + tau * s2 * d) / (d * (Nc + tau))
        elif kind == "diag":
            sq = np.stack([(W[:, c][:, None] * (Z - self.means_[c]) ** 2).sum(axis=0) for c in range(len(Nc))])
            self.covariances_ = (sq + tau * s2) / (Nc + tau)[:, None]
        else:
            scat = [((Z - self.means_[c]).T * W[:, c]) @ (Z - self.means_[c]) for c in range(len(Nc))]
            if kind == "full":
                self.covariances_ = np.stack([(S + tau * s2 * np.eye(d)) / (Nc[c] + tau) for c, S in enumerate(scat)])
            else:  # tied
                self.covariances_ = (sum(scat) + tau * s2 * np.eye(d)) / (Nc.sum() + tau)
        if kind in ("spherical", "diag") and tau == 0:  # no prior: keep variances away from 0
            self.covariances_ = np.maximum(self.covariances_, 1e-9 * s2)

    def _log_prior(self) -> float:
        """log of the inverse-Wishart-type penalty the M-step maximises (0 when shrinkage = 0)."""
        tau, s2, kind = float(self.shrinkage), self._s2, self.covariance_type
        if tau == 0:
            return 0.0
        d = self.means_.shape[1]
        if kind == "spherical":
            v = self.covariances_
            return float((-0.5 * tau * d * np.log(v) - 0.5 * tau * s2 * d / v).sum())
        if kind == "diag":
            v = self.covariances_
            return float((-0.5 * tau * np.log(v) - 0.5 * tau * s2 / v).sum())
        covs = self.covariances_[None] if kind == "tied" else self.covariances_
        total = 0.0
        for S in covs:
            _, logdet = np.linalg.slogdet(S)
            total += -0.5 * tau * logdet - 0.5 * tau * s2 * np.trace(np.linalg.inv(S))
        return float(total)

    def _objective(self, lj, allowed, lab, w) -> float:
        ll_lab = _logsumexp(np.where(allowed[lab], lj[lab], -np.inf)).sum() if lab.any() else 0.0
        ll_unl = (w[~lab] * _logsumexp(lj[~lab])).sum() if (~lab).any() else 0.0
        return float(ll_lab + ll_unl + self._log_prior())

    # ------------------------------------------------------------------ prediction
    def _check_fitted(self):
        if not hasattr(self, "means_"):
            raise _NotFitted("this GaussianEM is not fitted yet: call fit(X, y) first")

    def _component_log_joint(self, Z) -> np.ndarray:
        return log_joint(Z, self.means_, self.covariances_, self.priors_, self.covariance_type)

    def _class_log_joint(self, lj) -> np.ndarray:
        """log P(z, y = c): the log-sum-exp of the class's components (the component itself when M = 1)."""
        M = len(self.means_) // len(self.classes_)
        if M == 1:
            return lj
        return np.stack([_logsumexp(lj[:, c * M:(c + 1) * M]) for c in range(len(self.classes_))], axis=1)

    def predict_joint_log_proba(self, X) -> np.ndarray:
        """log P(x, y = c) per class in the PCA space, (n, n_classes): the 'logits' that temperature scaling
        divides (the name scikit-learn's naive Bayes classifiers give the same quantity)."""
        self._check_fitted()
        X = _check_X(X, estimator=self, reset=False)
        return self._class_log_joint(self._component_log_joint(self._project(X)))

    def decision_function(self, X) -> np.ndarray:
        """:meth:`predict_joint_log_proba`, shaped as scikit-learn's classifiers shape a decision function:
        (n, n_classes) with three classes or more; with two, (n,), the log-odds of ``classes_[1]``."""
        a = self.predict_joint_log_proba(X)
        return a[:, 1] - a[:, 0] if a.shape[1] == 2 else a

    def predict_proba(self, X) -> np.ndarray:
        a = self.predict_joint_log_proba(X) / float(self.temperature)
        a -= a.max(axis=1, keepdims=True)
        p = np.exp(a)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        best = self.predict_joint_log_proba(X).argmax(axis=1)
        return self.classes_[best]
