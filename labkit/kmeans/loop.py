"""The Lloyd loop and its two steps (assign in chunks, per-cluster sums), shared by one process and many.

:func:`lloyd` talks to other ranks only through a ``comm`` object: :class:`LocalComm` here (nothing
to reduce), :class:`labkit.kmeans.distributed.DistComm` over ``torch.distributed``. The rules (the
tolerance, empty clusters, the final assignment) are described in :mod:`labkit.kmeans.estimator`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..devices import now

__all__ = ["assign", "cluster_sums", "lloyd", "LloydResult", "LocalComm", "forbid", "default_chunk_size",
           "CHUNK_ELEMENTS", "CHUNK_ROWS"]

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


def default_chunk_size(n: int, k: int) -> int:
    """Rows per chunk so that a chunk's distances hold at most ``CHUNK_ELEMENTS`` numbers."""
    return max(1, min(n, CHUNK_ELEMENTS // max(1, k)))


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
    k = packed.shape[0]
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


def lloyd(X: torch.Tensor, centers: torch.Tensor, max_iter: int = 300, tol_abs: float = 0.0,
          chunk_size: int | None = None, weights: torch.Tensor | None = None, comm=None,
          x_sq: torch.Tensor | None = None) -> LloydResult:
    """Lloyd iterations from ``centers`` on (already centred) ``X``; see the module docstring for the rules.

    Per iteration: a chunked pass assigns the points; this process's per-cluster sums and counts
    are formed (from scratch in the first iteration, then by moving only the points that changed
    cluster); ``comm.all_reduce_`` adds them over the ranks as one ``k x (d + 1)`` tensor;
    empty clusters are relocated; the centres
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
        t0 = now(X.device)  # synchronised at both ends: on a GPU an iteration ends when its kernels have run
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
        secs.append(now(X.device) - t0)
        n_iter = it + 1
        if shift <= tol_abs:
            break
    numbers = (getattr(comm, "numbers_reduced", 0) - start_numbers) // max(1, n_iter)
    if shift != 0.0:  # the last labels belong to the previous centres: assign once more
        labels, best = _assign_pass(X, centers, chunk, x_sq)
    inertia = float((best if weights is None else best * weights).sum(dtype=torch.float64))
    return LloydResult(centers, labels, inertia, n_iter, history, relocated, secs, numbers)
