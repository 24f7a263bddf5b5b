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
"""
from __future__ import annotations

import numpy as np

from .._validate import ArgumentError, validate_choice, validate_finite, validate_int, validate_number

__all__ = ["GaussianEM", "validate_semi_supervised", "log_joint", "e_step", "COVARIANCE_TYPES"]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")



def validate_semi_supervised(X, y=None, *, name_X: str = "X", name_y: str = "y"):
    """Validate ``X`` (n, d) finite floats and ``y`` (n,) integers >= -1 (``-1`` = unlabelled); return arrays."""
    X = np.asarray(X, dtype=float) if not hasattr(X, "detach") else X.detach().cpu().numpy().astype(float)
    if X.ndim != 2:
        raise ArgumentError(f"{name_X} must be a 2-D array (n_samples, n_features), got shape {X.shape}; "
                            f"reshape images with X.reshape(len(X), -1)")
    if len(X) == 0:
        raise ArgumentError(f"{name_X} is empty: pass at least one sample")
    validate_finite(name_X, X)
    if y is None:
        return X
    y_arr = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y)
    if y_arr.ndim != 1:
        raise ArgumentError(f"{name_y} must be 1-D (one label per sample), got shape {y_arr.shape}")
    if len(y_arr) != len(X):
        raise ArgumentError(f"{name_X} and {name_y} have different lengths ({len(X)} and {len(y_arr)}): "
                            f"pass one label (or -1) per row of {name_X}")
    if y_arr.dtype.kind == "f":
        if not np.all(np.isfinite(y_arr)) or np.any(y_arr != np.round(y_arr)):
            bad = y_arr[~(np.isfinite(y_arr) & (y_arr == np.round(np.nan_to_num(y_arr))))][:3]
            raise ArgumentError(f"{name_y} must hold integer class labels or -1 for unlabelled, got "
                                f"non-integer values such as {bad.tolist()}")
        y_arr = y_arr.astype(np.int64)
    elif y_arr.dtype.kind not in "iub":
        raise ArgumentError(f"{name_y} must hold integer class labels or -1 for unlabelled, got dtype "
                            f"{y_arr.dtype} (e.g. {y_arr[:3].tolist()}); encode string classes with "
                            f"sklearn.preprocessing.LabelEncoder first")
    y_arr = y_arr.astype(np.int64)
    if np.any(y_arr < -1):
        raise ArgumentError(f"{name_y} must hold labels >= 0, or -1 for unlabelled, got "
                            f"{sorted(set(y_arr[y_arr < -1].tolist()))[:3]}")
    if not np.any(y_arr >= 0):
        raise ArgumentError(f"{name_y} has no labelled point (all -1): label at least one point per class")
    return X, y_arr


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


class GaussianEM:
    """Gaussian class-conditional classifier in a PCA space, fitted by (semi-supervised) EM.

    Parameters (scikit-learn style; ``fit(X, y)`` with ``y == -1`` for unlabelled points returns ``self``):

    n_components: PCA dimensions (``None``: no PCA). The PCA is fitted on every point passed to ``fit``.
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

    Attributes after ``fit``: ``classes_``, ``pca_mean_``, ``pca_components_``, ``means_``, ``covariances_``,
    ``priors_``, ``component_class_``, ``log_likelihood_``
    (J/n after the supervised start and after every EM iteration),
    ``n_iter_``, ``converged_``, ``transduction_`` (argmax label of every training point; labelled keep theirs).
    """

    def __init__(self, n_components: int | None = 30, covariance_type: str = "tied", shrinkage: float = 1.0,
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

    # scikit-learn's clone() and get_params() need these two
    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in ("n_components", "covariance_type", "shrinkage", "lam",
                                              "max_iter", "tol", "temperature", "components_per_class")}

    def set_params(self, **params) -> "GaussianEM":
        for k, v in params.items():
            if k not in self.get_params():
                raise ArgumentError(f"unknown parameter {k!r}; GaussianEM takes {sorted(self.get_params())}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        return "GaussianEM(" + ", ".join(f"{k}={v!r}" for k, v in self.get_params().items()) + ")"

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
                      hint="use at most min(n_samples, n_features), or None for no PCA")
        if self.covariance_type == "full" and self.shrinkage == 0:
            raise ArgumentError("shrinkage must be > 0 with covariance_type='full' (a class with fewer labelled "
                                "points than dimensions has a singular covariance), got 0")

    def _project(self, X):
        if self.pca_components_ is None:
            return X - self.pca_mean_
        return (X - self.pca_mean_) @ self.pca_components_.T

    def fit(self, X, y) -> "GaussianEM":
        X, y = validate_semi_supervised(X, y)
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
        self.classes_ = np.unique(y[y >= 0])
        C = len(self.classes_)
        comp = np.repeat(np.arange(C), M)  # component -> class index
        self.component_class_ = self.classes_[comp]
        lab = y >= 0
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
            raise RuntimeError("this GaussianEM is not fitted yet: call fit(X, y) first")

    def _component_log_joint(self, Z) -> np.ndarray:
        return log_joint(Z, self.means_, self.covariances_, self.priors_, self.covariance_type)

    def _class_log_joint(self, lj) -> np.ndarray:
        """log P(z, y = c): the log-sum-exp of the class's components (the component itself when M = 1)."""
        M = len(self.means_) // len(self.classes_)
        if M == 1:
            return lj
        return np.stack([_logsumexp(lj[:, c * M:(c + 1) * M]) for c in range(len(self.classes_))], axis=1)

    def decision_function(self, X) -> np.ndarray:
        """log P(x, y = c) per class in the PCA space: the 'logits' that temperature scaling divides."""
        self._check_fitted()
        X = validate_semi_supervised(X)
        if X.shape[1] != len(self.pca_mean_):
            raise ArgumentError(f"X has {X.shape[1]} features, the model was fitted on {len(self.pca_mean_)}")
        return self._class_log_joint(self._component_log_joint(self._project(X)))

    def predict_proba(self, X) -> np.ndarray:
        a = self.decision_function(X) / float(self.temperature)
        a -= a.max(axis=1, keepdims=True)
        p = np.exp(a)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        self._check_fitted()
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    def score(self, X, y) -> float:
        return float((self.predict(X) == np.asarray(y)).mean())

