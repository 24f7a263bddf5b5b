"""K-means in PyTorch: chunked assignment, greedy k-means++, Lloyd iterations, a scikit-learn estimator.

Lloyd's algorithm (k-means) alternates two steps until the centres stop moving:

1. **assign** every point to its nearest centre, ``argmin_j ||x - c_j||^2``, computed in chunks of rows
   as ``||x||^2 - 2 x.C^T + ||C||^2`` so that the n x k distance matrix never has to exist at once;
2. **update** every centre to the mean of its points: per-cluster sums and counts, then sums / counts.

That is all of it: every point belongs to exactly one cluster (no "probability of joining a
cluster"), the number of clusters k is fixed (no merging of clusters), and each step can only lower
the inertia ``sum_i ||x_i - c_{label_i}||^2``, so it converges, to a local minimum that depends on the
initialisation (hence ``n_init`` restarts, keeping the lowest inertia).

Conventions copied from scikit-learn's ``KMeans`` so that the two can be compared run for run:

* ``tol`` is relative: iterations stop when the squared centre shift summed over clusters is at most
  ``tol * mean(var(X, axis=0))`` (:func:`tolerance`); labels that stop changing give shift 0, so
  they stop it too; ``n_iter_`` counts Lloyd iterations and the final labels always match the final
  centres (one more assignment when the loop ended without converging exactly);
* the data are centred (the mean subtracted) before computing distances, for accuracy in float32;
* greedy k-means++ (:func:`kmeans_plusplus`): the first centre uniformly at random, then each next
  centre the best of ``2 + int(ln k)`` candidates drawn with probability proportional to D(x)^2,
  with the same numpy random stream as scikit-learn (same ``random_state`` -> same centres in
  float64);
* **empty clusters**: a cluster that receives no point is moved to the point farthest from its
  own centre (largest ``||x - c_{label}||^2``, ties to the lower index); the next-farthest point
  serves the next empty cluster. That point is taken out of its old cluster's sum. scikit-learn does
  the same (it does not order ties); ``n_relocated_`` counts relocations.

The loop itself (:func:`labkit.kmeans.loop.lloyd`) talks to the other ranks only through a ``comm`` object, so the
distributed version (:mod:`labkit.kmeans.distributed`) runs this same code with an all-reduce of the
k x (d + 1) sums and counts.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin

from .._sklearn import NotFitted as _NotFitted
from .._sklearn import validate_data
from .._validate import ArgumentError, validate_choice, validate_int, validate_number
from .distributed import kmeans_parallel
from .loop import (  # noqa: F401
    CHUNK_ELEMENTS,
    CHUNK_ROWS,
    LloydResult,
    LocalComm,
    _guard,
    assign,
    cluster_sums,
    default_chunk_size,
    forbid,
    lloyd,
)
from .seeding import as_tensor, kmeans_plusplus, resolve_device, resolve_dtype, tolerance  # noqa: F401

__all__ = ["KMeans", "EXPECTED_FAILED_CHECKS", "forbid", "assign", "kmeans_plusplus", "tolerance", "lloyd",
           "LloydResult", "LocalComm", "as_tensor", "resolve_device", "default_chunk_size"]


# checks of scikit-learn 1.9's check_estimator that this KMeans fails on purpose, each with the reason
EXPECTED_FAILED_CHECKS = {
    "check_sample_weight_equivalence_on_dense_data":
        "k-means++ draws its seeds from the data with a random stream, and a point repeated twice is two draws "
        "where a point of weight 2 is one: the fits agree in distribution, not run for run (scikit-learn's own "
        "KMeans fails this check for the same reason)",
    "check_sample_weight_equivalence_on_sparse_data":
        "the same as on dense data: sparse input is made dense, then fitted the same way",
}


class KMeans(ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin, BaseEstimator):
    """K-means in PyTorch (CPU or GPU, float32 or float64), a scikit-learn estimator.

    It works in ``sklearn.base.clone``, ``Pipeline``, ``GridSearchCV`` and ``cross_val_score`` and passes
    ``sklearn.utils.estimator_checks.check_estimator`` except the checks listed in
    :data:`EXPECTED_FAILED_CHECKS` (the ones scikit-learn's own ``KMeans`` fails too).

    Parameters: ``n_clusters``; ``init`` = ``"k-means++"`` (greedy, as scikit-learn), ``"random"``
    (k distinct points), ``"k-means||"`` or an array (k, d); ``n_init`` restarts (the lowest inertia is kept;
    with an array init only one run is made); ``max_iter``; ``tol`` (relative, as scikit-learn);
    ``random_state``; ``dtype`` (of the computation and of ``transform``'s output); ``device``; ``chunk_size``
    (rows per assignment chunk). ``__init__`` stores them as given; ``fit`` checks them.

    ``X`` may be a numpy array, a list, a pandas frame, a torch tensor (kept on its device) or a scipy sparse
    matrix (made dense: k-means here is dense arithmetic).

    Attributes after ``fit``: ``cluster_centers_`` (k, d), ``labels_`` (n,), ``inertia_``,
    ``n_iter_``, ``inertia_history_`` (inertia at each assignment of the kept run),
    ``n_relocated_`` (empty clusters relocated), ``iter_seconds_``, ``n_features_in_``. Arrays are numpy.
    """

    def __init__(self, n_clusters: int = 8, *, init="k-means++", n_init: int = 1, max_iter: int = 300,
                 tol: float = 1e-4, random_state=None, dtype="float32", device="cpu", chunk_size: int | None = None):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.dtype = dtype
        self.device = device
        self.chunk_size = chunk_size

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # accepted, made dense
        try:  # transform's output has the dtype of the computation, whatever the input's
            name = str(resolve_dtype(self.dtype)).replace("torch.", "")
        except (ValueError, TypeError):
            name = None
        tags.transformer_tags.preserves_dtype = [name] if name in ("float32", "float64") else []
        return tags

    def _validated(self, X, reset: bool):
        """``X`` checked the way scikit-learn does (features counted and named, sparse made dense); a torch
        tensor stays a tensor, on its device."""
        if isinstance(X, torch.Tensor):
            if X.ndim == 2:
                if reset:
                    self.n_features_in_ = X.shape[1]
                    if hasattr(self, "feature_names_in_"):
                        del self.feature_names_in_
                elif X.shape[1] != self.n_features_in_:
                    raise ArgumentError(f"X has {X.shape[1]} features, but KMeans is expecting "
                                        f"{self.n_features_in_} features as input (as in fit)")
            return X
        if sp.issparse(X):
            X = X.toarray()
        ndim = X.ndim if hasattr(X, "ndim") else np.asarray(X).ndim
        if ndim != 2:
            raise ArgumentError(f"X must be a 2-D array (n_samples, n_features), got {ndim} dimension(s); "
                                "Reshape your data: a single sample with x.reshape(1, -1)")
        X = validate_data(self, X, reset=reset, dtype="numeric", ensure_all_finite=False)
        return np.require(X, requirements="W")  # torch warns on read-only arrays

    def _check_params(self, n: int):
        validate_int("n_clusters", self.n_clusters, minimum=1, maximum=n,
                     hint=f"k-means needs 1 <= n_clusters <= n_samples (here n_samples={n})")
        validate_int("n_init", self.n_init, minimum=1)
        validate_int("max_iter", self.max_iter, minimum=1)
        validate_number("tol", self.tol, minimum=0)
        if self.chunk_size is not None:
            validate_int("chunk_size", self.chunk_size, minimum=1)
        if isinstance(self.init, str):
            validate_choice("init", self.init, ("k-means++", "random", "k-means||"),
                         hint="or pass an array of shape (n_clusters, n_features)")

    def _initial(self, Xc, mean, rs, dtype, dev, w=None):
        k = self.n_clusters
        if not isinstance(self.init, str):
            C = as_tensor(self.init, "init", dtype, dev)
            if tuple(C.shape) != (k, Xc.shape[1]):
                raise ArgumentError(f"init must have shape (n_clusters, n_features) = {(k, Xc.shape[1])}, "
                                    f"got {tuple(C.shape)}")
            return C - mean
        if self.init == "random":
            return Xc[torch.as_tensor(rs.permutation(Xc.shape[0])[:k], device=dev)].clone()
        if self.init == "k-means||":
            return kmeans_parallel(Xc, k, random_state=int(rs.randint(2**31 - 1)), chunk_size=self.chunk_size,
                                   distributed=False)
        return kmeans_plusplus(Xc, k, rs, sample_weight=w, chunk_size=self.chunk_size)[0]

    def fit(self, X, y=None, sample_weight=None):
        """Cluster ``X`` (n, d); ``y`` is ignored (scikit-learn's convention). Returns ``self``."""
        dtype, dev = resolve_dtype(self.dtype), resolve_device(self.device)
        X = as_tensor(self._validated(X, reset=True), "X", dtype, dev)
        n = X.shape[0]
        self._check_params(n)
        w = None
        if sample_weight is not None:
            w = torch.as_tensor(np.asarray(sample_weight, dtype=np.float64), dtype=dtype, device=dev)
            if w.ndim != 1 or w.numel() != n or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ArgumentError(f"sample_weight must be {n} finite non-negative numbers (one per row of X), "
                                    f"got shape {tuple(w.shape)}")
            if not bool((w > 0).any()):
                raise ArgumentError("sample_weight is zero for every point: give at least one point a positive weight")
        rs = self.random_state if isinstance(self.random_state, np.random.RandomState) \
            else np.random.RandomState(self.random_state)
        mean = X.mean(0)
        Xc = X - mean
        x_sq = (Xc * Xc).sum(1)
        tol_abs = float(x_sq.sum(dtype=torch.float64)) / Xc.numel() * self.tol  # = tol * mean(var(X, axis=0))
        runs = 1 if not isinstance(self.init, str) else self.n_init
        best = None
        for _ in range(runs):
            res = lloyd(Xc, self._initial(Xc, mean, rs, dtype, dev, w), self.max_iter, tol_abs, self.chunk_size, w,
                        x_sq=x_sq)
            if best is None or res.inertia < best.inertia:
                best = res
        self.cluster_centers_ = (best.centers + mean).cpu().numpy()
        self.labels_ = best.labels.cpu().numpy()
        self.inertia_, self.n_iter_ = best.inertia, best.n_iter
        self.inertia_history_, self.n_relocated_, self.iter_seconds_ = (best.inertia_history, best.n_relocated,
                                                                        best.iter_seconds)
        self._n_features_out = self.cluster_centers_.shape[0]
        return self

    def _fitted(self, X):
        if not hasattr(self, "cluster_centers_"):
            raise _NotFitted("this KMeans is not fitted yet: call fit(X) before predict, transform or score")
        dtype, dev = resolve_dtype(self.dtype), resolve_device(self.device)
        X = as_tensor(self._validated(X, reset=False), "X", dtype, dev)
        return X, torch.as_tensor(self.cluster_centers_, dtype=dtype, device=dev)

    def predict(self, X) -> np.ndarray:
        """The nearest fitted centre of every row of ``X``."""
        _guard("assign", "the assignment step")
        X, C = self._fitted(X)
        m = X.mean(0)
        return assign(X - m, C - m, self.chunk_size)[0].cpu().numpy()

    def fit_predict(self, X, y=None, sample_weight=None) -> np.ndarray:
        return self.fit(X, sample_weight=sample_weight).labels_

    def transform(self, X) -> np.ndarray:
        """Euclidean distances (not squared) from every row of ``X`` to every centre: (n, k)."""
        _guard("assign", "the assignment step")
        X, C = self._fitted(X)
        return torch.cdist(X, C).cpu().numpy()

    def fit_transform(self, X, y=None, sample_weight=None) -> np.ndarray:
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def score(self, X, y=None, sample_weight=None) -> float:
        """Minus the (weighted) inertia of ``X`` against the fitted centres (scikit-learn's sign: higher is
        better); ``y`` is ignored."""
        X, C = self._fitted(X)
        lab = assign(X, C, self.chunk_size)[0]
        d2 = ((X - C[lab]) ** 2).sum(1)
        if sample_weight is not None:
            w = torch.as_tensor(np.asarray(sample_weight, dtype=np.float64), dtype=X.dtype, device=X.device)
            if w.shape != d2.shape:
                raise ArgumentError(f"sample_weight must hold one weight per row of X ({len(d2)}), "
                                    f"got shape {tuple(w.shape)}")
            d2 = d2 * w
        return -float(d2.sum())
