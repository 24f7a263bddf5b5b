"""Distributed k-means: every rank holds a shard, the ranks all-reduce k x (d + 1) numbers per iteration.

Per Lloyd iteration each rank assigns its own points, then forms per-cluster **sums** (k x d) and
**counts** (k) of its shard, packed in one ``k x (d + 1)`` tensor, and all-reduces it. After the
all-reduce every rank holds the global sums and counts, so every rank computes the same new centres
``sums / counts``: the points never move, only ``k (d + 1)`` numbers per iteration do (330 for k = 10,
d = 32), whatever n is. The loop is :func:`labkit.kmeans.loop.lloyd` itself, given a
communicator (:class:`DistComm`), so the distributed and the single-process runs execute the same code.

Besides the loop: the global mean and variance (for centring and scikit-learn's tolerance) take two
all-reduces of d + 1 and d numbers once; the initial centres are made once, on rank 0 (greedy
k-means++ on its shard, or an array you pass), and broadcast (k x d numbers); an empty cluster
(rare) gathers each rank's farthest candidates. In float64, from the same initial centres, the
result equals one process's: same assignments, centres within 1e-12 (only the order of additions
differs).

k-means|| (:func:`kmeans_parallel`, Bahmani et al. 2012, "Scalable k-means++", PVLDB 5(7)) is the
scalable initialisation used by Spark MLlib and cuML: instead of k sequential passes over the data
(k-means++), a few rounds (5 here; Spark's default is 2) in which every point joins the candidate set
independently with probability ``min(1, l D(x)^2 / phi)`` (``l = 2k`` oversampling, ``phi`` the current
cost); the candidates are weighted by the number of points nearest to them and reclustered into k
centres (weighted greedy k-means++ then 30 weighted Lloyd iterations, as Spark does) on rank 0,
then broadcast.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .._compat import moved_names
from .._validate import ArgumentError, validate_int, validate_number
from .loop import LocalComm, assign, lloyd
from .seeding import as_tensor, kmeans_plusplus, resolve_dtype

__all__ = ["DistComm", "shard_bounds", "shard", "fit_distributed", "DistributedResult", "kmeans_parallel",
           "centroid_update", "rank_and_world_size"]

__getattr__ = moved_names(__name__, {"world": "labkit.kmeans.distributed:rank_and_world_size"})


def rank_and_world_size(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of the default (or given) process group; ``(0, 1)`` when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous rows ``[start, stop)`` of ``n``: sizes differ by at most one, none empty."""
    n = validate_int("n", n, minimum=1)
    world_size = validate_int("world_size", world_size, minimum=1, maximum=n,
                           hint=f"every rank needs at least one point: use at most {n} ranks for {n} points")
    rank = validate_int("rank", rank, minimum=0, maximum=world_size - 1)
    return rank * n // world_size, (rank + 1) * n // world_size


def shard(X, rank: int, world_size: int):
    """Rows ``shard_bounds(len(X), rank, world_size)`` of ``X`` (no padding, no repeats: each point once)."""
    s, e = shard_bounds(len(X), rank, world_size)
    return X[s:e]


class DistComm:
    """What :func:`lloyd` needs from the ranks, over ``torch.distributed`` (gloo or NCCL)."""

    def __init__(self, n_local: int, device, group=None):
        import torch.distributed as dist

        self.dist, self.group, self.device = dist, group, device
        self.rank, self.world_size = rank_and_world_size(group)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.int64, device=device), group=group)
        self.sizes = [int(s) for s in sizes]
        self.n_total = sum(self.sizes)
        self.offset = sum(self.sizes[:self.rank])
        self.numbers_reduced = 0  # by all_reduce_ (the loop's one collective)
        self.numbers_other = 0    # relocation, set-up and init traffic

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(t, group=self.group)
        self.numbers_reduced += t.numel()
        return t

    def reduce_other_(self, t: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(t, group=self.group)
        self.numbers_other += t.numel()
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self.dist.all_gather(out, t.contiguous(), group=self.group)
        self.numbers_other += t.numel() * self.world_size
        return out

    def farthest(self, d2: torch.Tensor, m: int) -> torch.Tensor:
        """Global indices of the ``m`` largest ``d2`` over all ranks (ties to the lower global index)."""
        order = torch.argsort(-d2, stable=True)[:m]
        vals = torch.full((m,), -float("inf"), dtype=d2.dtype, device=d2.device)
        idx = torch.full((m,), 2**62, dtype=torch.int64, device=d2.device)
        vals[:order.numel()], idx[:order.numel()] = d2[order], order + self.offset
        v = torch.cat(self.gather(vals)).cpu().numpy()
        i = torch.cat(self.gather(idx)).cpu().numpy()
        top = np.lexsort((i, -v))[:m]
        return torch.as_tensor(i[top], device=d2.device)

    def rows(self, X, global_idx, labels, weights):
        """Rows, labels and weights at global indices, sent by their owners to every rank (one all-reduce)."""
        d = X.shape[1]
        buf = torch.zeros(len(global_idx), d + 2, dtype=X.dtype, device=X.device)
        local = global_idx - self.offset
        mine = (local >= 0) & (local < X.shape[0])
        li = local[mine]
        buf[mine, :d] = X[li]
        buf[mine, d] = labels[li].to(X.dtype) if labels is not None else 0
        buf[mine, d + 1] = weights[li] if weights is not None else 1.0
        self.reduce_other_(buf)
        w = None if weights is None else buf[:, d + 1]
        return buf[:, :d], buf[:, d].round().long(), w


def _comm(n_local, device):
    return DistComm(n_local, device) if rank_and_world_size()[1] > 1 else LocalComm()


def centroid_update(X_local: torch.Tensor, labels_local: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The distributed centroid update (one iteration's M-step): new centres, equal on every rank.

    Per-cluster sums and counts of this rank's points, all-reduced as one k x (d + 1) tensor, then
    sums / counts; a cluster with no point on any rank keeps its old centre (the exercise's rule;
    the full :func:`fit_distributed` relocates it instead).
    """
    import torch.distributed as dist

    from .loop import _guard

    _guard("centroid_update", "the centroid update")
    k, d = centers.shape
    packed = torch.zeros(k, d + 1, dtype=X_local.dtype, device=X_local.device)
    packed[:, :d].index_add_(0, labels_local, X_local)
    packed[:, d] = torch.bincount(labels_local, minlength=k).to(X_local.dtype)
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(packed)
    counts = packed[:, d:]
    return torch.where(counts > 0, packed[:, :d] / counts.clamp(min=1), centers)


@dataclass
class DistributedResult:
    """One rank's view of a distributed fit (centres, inertia and n_iter are the same on every rank)."""
    centers: np.ndarray
    labels: np.ndarray       # this rank's points only
    offset: int              # global index of this rank's first point
    inertia: float
    n_iter: int
    inertia_history: list = field(default_factory=list)
    numbers_per_iter: int = 0  # numbers this rank all-reduced per Lloyd iteration (measured)
    numbers_other: int = 0     # set-up, init and relocation traffic (measured)
    iter_seconds: list = field(default_factory=list)
    n_relocated: int = 0
    world_size: int = 1


def fit_distributed(X_local, n_clusters: int, *, init="k-means++", max_iter: int = 300, tol: float = 1e-4,
                    random_state=0, dtype="float64", chunk_size: int | None = None, device="cpu") -> DistributedResult:
    """K-means over all ranks' shards, called on every rank with its own ``X_local``.

    ``init``: ``"k-means++"`` (rank 0 runs greedy k-means++ on its shard and broadcasts), an array
    (k, d) (rank 0's copy is broadcast, so every rank surely starts from the same centres), or
    ``"k-means||"`` (:func:`kmeans_parallel` over all shards). Works with no process group too (one rank).
    """
    import torch.distributed as dist

    dt = resolve_dtype(dtype)
    X = as_tensor(X_local, "X_local", dt, device)
    rank, ws = rank_and_world_size()
    comm = _comm(X.shape[0], X.device)
    n_total = getattr(comm, "n_total", X.shape[0])
    k = validate_int("n_clusters", n_clusters, minimum=1, maximum=n_total,
                  hint=f"k-means needs 1 <= n_clusters <= the number of points over all ranks ({n_total})")
    validate_int("max_iter", max_iter, minimum=1)
    validate_number("tol", tol, minimum=0)
    d = X.shape[1]
    head = torch.cat([X.sum(0), torch.tensor([float(X.shape[0])], dtype=dt, device=X.device)])
    if ws > 1:
        comm.reduce_other_(head)
    mean = head[:d] / head[d]
    Xc = X - mean
    sq = (Xc * Xc).sum(0)
    if ws > 1:
        comm.reduce_other_(sq)
    tol_abs = float((sq / n_total).mean()) * tol if tol else 0.0
    if isinstance(init, str) and init == "k-means||":
        C0 = kmeans_parallel(Xc, k, random_state=random_state, chunk_size=chunk_size)
    else:
        if isinstance(init, str):
            if init != "k-means++":
                raise ArgumentError(f"init must be 'k-means++', 'k-means||' or an array (k, d), got {init!r}")
            if rank == 0 and X.shape[0] < k:
                raise ArgumentError(f"init='k-means++' runs on rank 0's shard, which has {X.shape[0]} < "
                                    f"n_clusters={k} points; use init='k-means||' or fewer ranks")
            C0 = kmeans_plusplus(Xc, k, random_state)[0] if rank == 0 else torch.zeros(k, d, dtype=dt, device=X.device)
        else:
            C0 = as_tensor(init, "init", dt, X.device)
            if tuple(C0.shape) != (k, d):
                raise ArgumentError(f"init must have shape (n_clusters, n_features) = {(k, d)}, got {tuple(C0.shape)}")
            C0 = C0 - mean
        if ws > 1:
            dist.broadcast(C0, src=0)
            comm.numbers_other += C0.numel()
    res = lloyd(Xc, C0, max_iter, tol_abs, chunk_size, comm=comm)
    tail = torch.tensor(res.inertia_history + [res.inertia], dtype=dt, device=X.device)
    if ws > 1:  # once, at the end: the per-iteration inertia of every rank's part, and the final inertia
        comm.reduce_other_(tail)
    tail = tail.tolist()
    return DistributedResult((res.centers + mean).cpu().numpy(), res.labels.cpu().numpy(), getattr(comm, "offset", 0),
                             tail[-1], res.n_iter, tail[:-1], res.numbers_per_iter, getattr(comm, "numbers_other", 0),
                             res.iter_seconds, res.n_relocated, ws)


def kmeans_parallel(X_local: torch.Tensor, n_clusters: int, *, oversampling: float | None = None, rounds: int = 5,
                    random_state=0, chunk_size: int | None = None, return_info: bool = False,
                    distributed: bool = True):
    """k-means|| initial centres (k, d), computed over every rank's shard and equal on all ranks.

    1. one point drawn uniformly over all points (a shared random stream picks its global index);
    2. ``rounds`` times: every point joins the candidates with probability
       ``min(1, oversampling * D(x)^2 / phi)`` (each rank draws for its own points), the new
       candidates are gathered on every rank;
    3. each candidate is weighted by the number of points nearest to it (an all-reduce of counts);
    4. rank 0 reclusters the weighted candidates (greedy k-means++, then 30 weighted Lloyd
       iterations) and broadcasts the k centres.

    ``return_info`` also returns ``{"candidates", "rounds_run", "weights_sum"}``. ``distributed=False``
    treats ``X_local`` as all the data even inside a process group (what ``KMeans(init="k-means||")`` does).
    """
    import torch.distributed as dist

    X = X_local
    rank, ws = rank_and_world_size() if distributed else (0, 1)
    comm = _comm(X.shape[0], X.device) if distributed else LocalComm()
    n_total = getattr(comm, "n_total", X.shape[0])
    k = validate_int("n_clusters", n_clusters, minimum=1, maximum=n_total)
    rounds = validate_int("rounds", rounds, minimum=1)
    ell = validate_number("oversampling", 2.0 * k if oversampling is None else oversampling, minimum=0, open_low=True)
    seed = int(random_state or 0) % (2**32)
    shared = np.random.RandomState(seed)
    first = torch.tensor([int(shared.randint(n_total))], device=X.device)
    C = comm.rows(X, first, None, None)[0] if ws > 1 else X[first].clone()
    d2 = assign(X, C, chunk_size)[1]
    rounds_run = 0
    for r in range(rounds):
        phi = d2.sum().reshape(1)
        if ws > 1:
            comm.reduce_other_(phi)
        if float(phi) <= 0:
            break
        u = torch.as_tensor(np.random.RandomState([seed, rank, r]).uniform(size=X.shape[0]), dtype=X.dtype,
                            device=X.device)
        new = X[u < ell * d2 / phi]
        if ws > 1:
            counts = [int(c) for c in comm.gather(torch.tensor([new.shape[0]], device=X.device))]
            pad = torch.zeros(max(counts), X.shape[1], dtype=X.dtype, device=X.device)
            pad[:new.shape[0]] = new
            new = torch.cat([g[:c] for g, c in zip(comm.gather(pad), counts)])
        rounds_run += 1
        if new.shape[0]:
            C = torch.cat([C, new])
            d2 = torch.minimum(d2, assign(X, new, chunk_size)[1])
    m = C.shape[0]
    if m < k:
        raise ArgumentError(f"k-means|| found only {m} candidate centres for n_clusters={k} (the data may hold "
                            f"fewer than {k} distinct points); raise rounds or oversampling, or use init='k-means++'")
    w = torch.bincount(assign(X, C, chunk_size)[0], minlength=m).to(X.dtype)
    if ws > 1:
        comm.reduce_other_(w)
    if rank == 0:
        C0 = kmeans_plusplus(C, k, shared, sample_weight=w)[0]
        centers = lloyd(C, C0, max_iter=30, tol_abs=0.0, weights=w).centers
    else:
        centers = torch.zeros(k, X.shape[1], dtype=X.dtype, device=X.device)
    if ws > 1:
        dist.broadcast(centers, src=0)
    if return_info:
        return centers, {"candidates": m, "rounds_run": rounds_run, "weights_sum": float(w.sum())}
    return centers
