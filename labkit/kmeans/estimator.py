"""K-means in PyTorch: chunked assignment, greedy k-means++, Lloyd iterations, a scikit-learn-style estimator.

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

The loop itself (:func:`lloyd`) talks to the other ranks only through a ``comm`` object, so the
distributed version (:mod:`labkit.kmeans.distributed`) runs this same code with an all-reduce of the
k x (d + 1) sums and counts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .._validate import ArgumentError, check_choice, check_finite, check_int, check_number

__all__ = ["KMeans", "forbid", "assign", "kmeans_plusplus", "tolerance", "lloyd", "LloydResult", "LocalComm",
           "as_tensor", "resolve_device", "default_chunk_size"]

CHUNK_ELEMENTS = 1 << 22  # distances held at once: 4 Mi numbers (16 MiB in float32)
CHUNK_ROWS = 8192         # rows per chunk in the Lloyd loop (cache-sized on a CPU)


# ----------------------------------------------------------------------------- exercise guard
_FORBIDDEN: set[str] = set()


class forbid:
    """``with forbid("assign"):`` makes labkit's own version of an exercise raise (checks use it, so an
    answer that calls the library instead of writing the step fails with a clear message)."""

    def __init__(self, *names):
        self.names = set(names)

    def __enter__(self):
        self.added = self.names - _FORBIDDEN
        _FORBIDDEN.update(self.added)
        return self

    def __exit__(self, *exc):
        _FORBIDDEN.difference_update(self.added)


def _guard(name: str, what: str):
    if name in _FORBIDDEN:
        raise AssertionError(f"this exercise asks you to write {what} yourself; calling labkit's own "
                             f"version is not allowed here")


# ----------------------------------------------------------------------------- inputs
def resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"device must be a device this machine has, got {str(device)!r}: CUDA is not "
                            "available here (no GPU, or a CPU-only torch); pass device='cpu'")
    return dev


def resolve_dtype(dtype) -> torch.dtype:
    table = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
             torch.float64: torch.float64, np.float32: torch.float32, np.float64: torch.float64}
    try:
        return table[dtype]
    except (KeyError, TypeError):
        raise ArgumentError(f"dtype must be 'float32' or 'float64' (or the torch/numpy dtype), got {dtype!r}")


def as_tensor(X, name: str = "X", dtype=torch.float32, device="cpu") -> torch.Tensor:
    """``X`` as a 2-D finite tensor of ``dtype`` on ``device`` (numpy, lists or tensors accepted)."""
    t = X.detach() if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    if t.ndim != 2:
        raise ArgumentError(f"{name} must be a 2-D array (n_samples, n_features), got shape {tuple(t.shape)}"
                            "; reshape a single sample with x.reshape(1, -1)")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ArgumentError(f"{name} must hold at least one sample and one feature, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.uint8, torch.int16, torch.int8)):
        raise ArgumentError(f"{name} must hold numbers, got dtype {t.dtype}")
    if t.is_floating_point():
        check_finite(name, t)
    return t.to(device=device, dtype=dtype).contiguous()


def default_chunk_size(n: int, k: int) -> int:
    """Rows per chunk so that a chunk's distances hold at most ``CHUNK_ELEMENTS`` numbers."""
    return max(1, min(n, CHUNK_ELEMENTS // max(1, k)))


def tolerance(X: torch.Tensor, tol: float) -> float:
    """scikit-learn's absolute tolerance: ``tol * mean(var(X, axis=0))`` (population variance)."""
    if tol == 0:
        return 0.0
    return float(X.var(dim=0, unbiased=False).mean()) * tol


# ----------------------------------------------------------------------------- the two steps
def assign(X: torch.Tensor, centers: torch.Tensor, chunk_size: int | None = None, x_sq: torch.Tensor | None = None):
    """Nearest centre of every row: ``(labels int64 (n,), squared distances (n,))``, chunk by chunk.

    ``d2 = ||x||^2 - 2 x.C^T + ||C||^2`` is formed for ``chunk_size`` rows at a time (default: at
    most ``CHUNK_ELEMENTS`` distances in memory); ties go to the lower centre index (``argmin``).
    Squared distances are clamped at 0 (rounding can make them slightly negative).
    """
    _guard("assign", "the assignment step")
    n, k = X.shape[0], centers.shape[0]
    chunk = chunk_size or default_chunk_size(n, k)
    c_sq = (centers * centers).sum(1)
    labels = torch.empty(n, dtype=torch.int64, device=X.device)
    best = torch.empty(n, dtype=X.dtype, device=X.device)
    for s in range(0, n, chunk):
        xb = X[s:s + chunk]
        xs = x_sq[s:s + chunk] if x_sq is not None else (xb * xb).sum(1)
        d2 = torch.addmm(c_sq.unsqueeze(0), xb, centers.T, alpha=-2.0)  # ||C||^2 - 2 x.C^T
        m, idx = d2.min(1)
        labels[s:s + chunk] = idx
        best[s:s + chunk] = (m + xs).clamp_(min=0)
    return labels, best


def cluster_sums(X: torch.Tensor, labels: torch.Tensor, k: int, weights: torch.Tensor | None = None):
    """Per-cluster sums (k, d) and counts (k,) (weighted when ``weights`` is given)."""
    sums = torch.zeros(k, X.shape[1], dtype=X.dtype, device=X.device)
    if weights is None:
        sums.index_add_(0, labels, X)
        counts = torch.bincount(labels, minlength=k).to(X.dtype)
    else:
        sums.index_add_(0, labels, X * weights.unsqueeze(1))
        counts = torch.zeros(k, dtype=X.dtype, device=X.device).index_add_(0, labels, weights)
    return sums, counts


def _assign_pass(X, centers, chunk, x_sq):
    """Labels and squared distances to the nearest centre, chunk by chunk (the loop's assignment)."""
    _guard("assign", "the assignment step")
    n = X.shape[0]
    c_sq = (centers * centers).sum(1).unsqueeze(0)
    labels = torch.empty(n, dtype=torch.int64, device=X.device)
    best = torch.empty(n, dtype=X.dtype, device=X.device)
    for s in range(0, n, chunk):
        m, idx = torch.addmm(c_sq, X[s:s + chunk], centers.T, alpha=-2.0).min(1)
        labels[s:s + chunk] = idx
        best[s:s + chunk] = m
    best.add_(x_sq).clamp_(min=0)
    return labels, best


def _full_sums(X, labels, k, chunk, weights=None):
    """This process's [sums | counts] (k, d + 1) from scratch: per chunk ``onehot(labels)^T @ X_chunk``
    (a small matrix product: faster on a CPU than a scatter-add of every row)."""
    _guard("centroid_update", "the centroid update")
    n, d = X.shape
    packed = torch.zeros(k, d + 1, dtype=X.dtype, device=X.device)
    sums = packed[:, :d]
    for s in range(0, n, chunk):
        idx = labels[s:s + chunk]
        onehot = torch.zeros(idx.shape[0], k, dtype=X.dtype, device=X.device)
        onehot.scatter_(1, idx.unsqueeze(1), 1.0 if weights is None else weights[s:s + chunk].unsqueeze(1))
        sums.addmm_(onehot.T, X[s:s + chunk])
    if weights is None:
        packed[:, d] = torch.bincount(labels, minlength=k).to(X.dtype)
    else:
        packed[:, d] = torch.zeros(k, dtype=X.dtype, device=X.device).index_add_(0, labels, weights)
    return packed


def _update_sums(packed, X, labels, old_labels, chunk, weights=None):
    """[sums | counts] for ``labels`` from those for ``old_labels``: only the points that changed cluster
    are moved (subtracted from the old cluster, added to the new). The same sums up to rounding;
    recomputed from scratch when more than a quarter of the points changed."""
    k, d = packed.shape[0], packed.shape[1] - 1
    moved = torch.nonzero(labels != old_labels).flatten()
    if moved.numel() == 0:
        return packed
    if moved.numel() * 4 > X.shape[0]:
        return _full_sums(X, labels, k, chunk, weights)
    rows = X[moved] if weights is None else X[moved] * weights[moved].unsqueeze(1)
    w = torch.ones(moved.numel(), dtype=X.dtype, device=X.device) if weights is None else weights[moved]
    delta = torch.cat([rows, w.unsqueeze(1)], 1)
    packed = packed.clone()
    packed.index_add_(0, labels[moved], delta)
    packed.index_add_(0, old_labels[moved], delta, alpha=-1)
    return packed


# ----------------------------------------------------------------------------- k-means++
def kmeans_plusplus(X, n_clusters: int, random_state=None, sample_weight=None, n_local_trials: int | None = None,
                    chunk_size: int | None = None):
    """Greedy k-means++ as scikit-learn does it: ``(centers (k, d) tensor, indices (k,) numpy)``.

    First centre: a point drawn with probability proportional to its weight. Each next centre: draw
    ``n_local_trials`` (default ``2 + int(ln k)``) candidates with probability proportional to
    ``weight * D(x)^2`` (D = distance to the nearest centre chosen so far) and keep the one that
    lowers the potential ``sum weight * D^2`` the most. Uses ``np.random.RandomState(random_state)``
    exactly as scikit-learn does, so the indices match ``sklearn.cluster.kmeans_plusplus`` in float64.
    """
    _guard("assign", "the assignment step")
    X = X if isinstance(X, torch.Tensor) else as_tensor(X, dtype=torch.float64)
    n = X.shape[0]
    k = check_int("n_clusters", n_clusters, minimum=1, maximum=n,
                  hint=f"k-means needs 1 <= n_clusters <= n_samples ({n})")
    rs = random_state if isinstance(random_state, np.random.RandomState) else np.random.RandomState(random_state)
    w = np.ones(n) if sample_weight is None else np.asarray(
        sample_weight.cpu() if isinstance(sample_weight, torch.Tensor) else sample_weight, dtype=np.float64)
    trials = n_local_trials or 2 + int(np.log(k))
    x_sq = (X * X).sum(1)
    w_t = torch.as_tensor(w, dtype=X.dtype, device=X.device)

    def d2_to(rows):  # (len(rows), n) squared distances, clamped
        C = X[rows]
        return (x_sq.unsqueeze(0) - 2.0 * C @ X.T + (C * C).sum(1, keepdim=True)).clamp_(min=0)

    indices = np.full(k, -1, dtype=np.int64)
    indices[0] = rs.choice(n, p=w / w.sum())
    closest = d2_to([int(indices[0])])[0]
    pot = float(closest @ w_t)
    for c in range(1, k):
        rand = rs.uniform(size=trials) * pot
        cum = np.cumsum(w * closest.cpu().numpy().astype(np.float64))
        cand = np.clip(np.searchsorted(cum, rand), None, n - 1)
        dist = torch.minimum(closest.unsqueeze(0), d2_to(torch.as_tensor(cand, device=X.device)))
        pots = dist @ w_t
        best = int(torch.argmin(pots))
        pot, closest, indices[c] = float(pots[best]), dist[best], cand[best]
    return X[torch.as_tensor(indices, device=X.device)].clone(), indices


# ----------------------------------------------------------------------------- Lloyd
class LocalComm:
    """The single-process 'communicator': nothing to reduce; this process holds every point."""
    world_size, rank, offset = 1, 0, 0

    def __init__(self):
        self.numbers_reduced = 0  # numbers passed to all_reduce_ inside the loop (0 here)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def farthest(self, d2: torch.Tensor, m: int):
        """The global indices of the ``m`` points with the largest ``d2``, ties to the lower index."""
        order = torch.argsort(-d2, stable=True)[:m]
        return order

    def rows(self, X, global_idx, labels, weights):
        """Points, their labels and weights at global indices (all on this process)."""
        w = None if weights is None else weights[global_idx]
        return X[global_idx], labels[global_idx], w


@dataclass
class LloydResult:
    centers: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int
    inertia_history: list = field(default_factory=list)  # inertia at each assignment (before the update)
    n_relocated: int = 0
    iter_seconds: list = field(default_factory=list)
    numbers_per_iter: int = 0  # numbers all-reduced per iteration (measured by the comm)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def lloyd(X: torch.Tensor, centers: torch.Tensor, max_iter: int = 300, tol_abs: float = 0.0,
          chunk_size: int | None = None, weights: torch.Tensor | None = None, comm=None,
          x_sq: torch.Tensor | None = None) -> LloydResult:
    """Lloyd iterations from ``centers`` on (already centred) ``X``; see the module docstring for the rules.

    Per iteration: a chunked pass assigns the points; this process's per-cluster sums and counts
    are formed (from scratch in the first iteration, then by moving only the points that changed
    cluster); ``comm.all_reduce_`` adds them over the ranks as one ``k x (d + 1)`` tensor; empty clusters are relocated; the centres
    move to sums / counts. Stops when the squared shift summed over clusters is ``<= tol_abs``.
    """
    _guard("centroid_update", "the centroid update")
    comm = comm or LocalComm()
    n, d = X.shape
    k = centers.shape[0]
    chunk = chunk_size or min(CHUNK_ROWS if X.device.type == "cpu" else n, default_chunk_size(n, k))
    x_sq = (X * X).sum(1) if x_sq is None else x_sq
    centers = centers.clone()
    history, secs, relocated = [], [], 0
    labels = best = local = None
    shift = float("inf")
    start_numbers = getattr(comm, "numbers_reduced", 0)
    n_iter = 0
    for it in range(max_iter):
        t0 = time.perf_counter()
        old_labels = labels
        labels, best = _assign_pass(X, centers, chunk, x_sq)
        local = _full_sums(X, labels, k, chunk, weights) if old_labels is None else \
            _update_sums(local, X, labels, old_labels, chunk, weights)
        history.append(float((best if weights is None else best * weights).sum(dtype=torch.float64)))
        packed = comm.all_reduce_(local.clone())  # this rank's part -> everybody's sums and counts
        sums, counts = packed[:, :d], packed[:, d]
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            far_d2 = ((X - centers[labels]) ** 2).sum(1)
            far = comm.farthest(far_d2, int(empty.numel()))
            pts, old, w = comm.rows(X, far, labels, weights)
            for j, c in enumerate(empty.tolist()):
                wj = 1.0 if w is None else w[j]
                sums[old[j]] -= pts[j] * wj
                counts[old[j]] -= wj
                sums[c] = pts[j] * wj
                counts[c] = wj
            relocated += int(empty.numel())
        new = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp(min=1e-300).unsqueeze(1), centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        _sync(X.device)
        secs.append(time.perf_counter() - t0)
        n_iter = it + 1
        if shift <= tol_abs:
            break
    numbers = (getattr(comm, "numbers_reduced", 0) - start_numbers) // max(1, n_iter)
    if shift != 0.0:  # the last labels belong to the previous centres: assign once more
        labels, best = _assign_pass(X, centers, chunk, x_sq)
    inertia = float((best if weights is None else best * weights).sum(dtype=torch.float64))
    return LloydResult(centers, labels, inertia, n_iter, history, relocated, secs, numbers)


# ----------------------------------------------------------------------------- the estimator
class KMeans:
    """K-means with scikit-learn's interface, in PyTorch (CPU or GPU, float32 or float64).

    Parameters: ``n_clusters``; ``init`` = ``"k-means++"`` (greedy, as scikit-learn), ``"random"``
    (k distinct points) or an array (k, d); ``n_init`` restarts (the lowest inertia is kept; with an
    array init only one run is made); ``max_iter``; ``tol`` (relative, as scikit-learn);
    ``random_state``; ``dtype``; ``device``; ``chunk_size`` (rows per assignment chunk).

    Attributes after ``fit``: ``cluster_centers_`` (k, d), ``labels_`` (n,), ``inertia_``,
    ``n_iter_``, ``inertia_history_`` (inertia at each assignment of the kept run),
    ``n_relocated_`` (empty clusters relocated), ``iter_seconds_``. Arrays are numpy.
    """

    def __init__(self, n_clusters: int = 8, *, init="k-means++", n_init: int = 1, max_iter: int = 300,
                 tol: float = 1e-4, random_state=None, dtype="float32", device="cpu", chunk_size: int | None = None):
        self.n_clusters, self.init, self.n_init, self.max_iter, self.tol = n_clusters, init, n_init, max_iter, tol
        self.random_state, self.dtype, self.device, self.chunk_size = random_state, dtype, device, chunk_size

    def _check_params(self, n: int):
        check_int("n_clusters", self.n_clusters, minimum=1, maximum=n,
                  hint=f"k-means needs 1 <= n_clusters <= n_samples ({n})")
        check_int("n_init", self.n_init, minimum=1)
        check_int("max_iter", self.max_iter, minimum=1)
        check_number("tol", self.tol, minimum=0)
        if self.chunk_size is not None:
            check_int("chunk_size", self.chunk_size, minimum=1)
        if isinstance(self.init, str):
            check_choice("init", self.init, ("k-means++", "random", "k-means||"),
                         hint="or pass an array of shape (n_clusters, n_features)")

    def _initial(self, Xc, mean, rs, dtype, dev):
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
            from .distributed import kmeans_parallel
            return kmeans_parallel(Xc, k, random_state=int(rs.randint(2**31 - 1)), chunk_size=self.chunk_size)
        return kmeans_plusplus(Xc, k, rs, chunk_size=self.chunk_size)[0]

    def fit(self, X, y=None, sample_weight=None):
        """Cluster ``X`` (n, d); ``y`` is ignored (scikit-learn's convention). Returns ``self``."""
        dtype, dev = resolve_dtype(self.dtype), resolve_device(self.device)
        X = as_tensor(X, "X", dtype, dev)
        n = X.shape[0]
        self._check_params(n)
        w = None
        if sample_weight is not None:
            w = torch.as_tensor(np.asarray(sample_weight), dtype=dtype, device=dev).flatten()
            if w.numel() != n or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ArgumentError(f"sample_weight must be {n} finite non-negative numbers, got shape {tuple(w.shape)}")
        rs = self.random_state if isinstance(self.random_state, np.random.RandomState) \
            else np.random.RandomState(self.random_state)
        mean = X.mean(0)
        Xc = X - mean
        x_sq = (Xc * Xc).sum(1)
        tol_abs = float(x_sq.sum(dtype=torch.float64)) / Xc.numel() * self.tol  # = tol * mean(var(X, axis=0))
        runs = 1 if not isinstance(self.init, str) else self.n_init
        best = None
        for _ in range(runs):
            res = lloyd(Xc, self._initial(Xc, mean, rs, dtype, dev), self.max_iter, tol_abs, self.chunk_size, w,
                        x_sq=x_sq)
            if best is None or res.inertia < best.inertia:
                best = res
        self.cluster_centers_ = (best.centers + mean).cpu().numpy()
        self.labels_ = best.labels.cpu().numpy()
        self.inertia_, self.n_iter_ = best.inertia, best.n_iter
        self.inertia_history_, self.n_relocated_, self.iter_seconds_ = best.inertia_history, best.n_relocated, best.iter_seconds
        self.n_features_in_ = X.shape[1]
        return self

    def _fitted(self, X):
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("this KMeans is not fitted yet: call fit(X) before predict/transform")
        dtype, dev = resolve_dtype(self.dtype), resolve_device(self.device)
        X = as_tensor(X, "X", dtype, dev)
        if X.shape[1] != self.n_features_in_:
            raise ArgumentError(f"X must have {self.n_features_in_} features (as in fit), got {X.shape[1]}")
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

    def score(self, X) -> float:
        """Minus the inertia of ``X`` against the fitted centres (scikit-learn's sign: higher is better)."""
        X, C = self._fitted(X)
        lab = assign(X, C, self.chunk_size)[0]
        return -float(((X - C[lab]) ** 2).sum())

    def __repr__(self):
        return f"KMeans(n_clusters={self.n_clusters}, init={self.init!r}, n_init={self.n_init}, dtype={self.dtype!r}, device={self.device!r})"
