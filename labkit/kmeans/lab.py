"""Lab 06's rank functions, exercise checks, notebook callbacks and tour.

Rank functions (run through :func:`labkit.launch`): :func:`fit_rank` (distributed k-means, each rank
slicing its shard), :func:`kmeans_parallel_rank` (k-means|| init), :func:`centroid_update_rank`
(runs a learner's distributed update under the check). Checks: :func:`check_assign`,
:func:`check_centroid_update`. The notebook's runners: :func:`run_demo`, :func:`accuracy_rows`,
:func:`moons_experiment`; its data sets: :func:`load` (from :mod:`labkit.kmeans.datasets`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..checks import CheckResult, expect_close, expect_equal, run_cases
from ..tour import lab_name
from . import estimator as E
from .cluster_label import accuracy_methods, accuracy_rows, cluster_then_label
from .datasets import load  # the notebook reads its data sets here (labkit.kmeans.lab.load)
from .distributed import fit_distributed, kmeans_parallel, shard

__all__ = ["fit_rank", "kmeans_parallel_rank", "centroid_update_rank", "gather_labels", "check_assign",
           "check_centroid_update", "run_demo", "accuracy_methods", "accuracy_rows", "moons_experiment", "load", "tour"]


# ----------------------------------------------------------------------------- rank functions
def _data(X, data):
    if X is not None:
        return np.asarray(X)
    return load(**(data or {}))


def fit_rank(ctx, X=None, data: dict | None = None, n_clusters: int = 10, init=None, dtype: str = "float64",
             max_iter: int = 300, tol: float = 1e-4, seed: int = 0) -> dict:
    """Distributed k-means: every rank takes its contiguous shard of ``X`` (or of ``load(**data)``, built
    on each rank so the data never travel) and runs :func:`fit_distributed`; returns its view as a dict."""
    Xl = shard(_data(X, data), ctx.rank, ctx.world_size)
    r = fit_distributed(Xl, n_clusters, init="k-means++" if init is None else init, max_iter=max_iter, tol=tol,
                        random_state=seed, dtype=dtype, device=ctx.device)
    return {"centers": r.centers, "labels": r.labels, "offset": r.offset, "inertia": r.inertia, "n_iter": r.n_iter,
            "inertia_history": r.inertia_history, "numbers_per_iter": r.numbers_per_iter,
            "numbers_other": r.numbers_other, "iter_seconds": r.iter_seconds, "world_size": r.world_size}


def kmeans_parallel_rank(ctx, X=None, data: dict | None = None, n_clusters: int = 10, seed: int = 0,
                         rounds: int = 5, dtype: str = "float64") -> dict:
    """k-means|| over the ranks' shards: the k centres (equal on every rank) and the candidate count."""
    Xl = E.as_tensor(shard(_data(X, data), ctx.rank, ctx.world_size), "X", E.resolve_dtype(dtype), ctx.device)
    C, info = kmeans_parallel(Xl, n_clusters, random_state=seed, rounds=rounds, return_info=True)
    return {"centers": C.cpu().numpy(), **info}


def gather_labels(results) -> np.ndarray:
    """All ranks' labels in global order (each rank returned its shard's)."""
    return np.concatenate([r["labels"] for r in sorted(results, key=lambda r: r["offset"])])


# ----------------------------------------------------------------------------- exercise 1: assignment
def reference_assign(X, C) -> np.ndarray:
    """The definition, directly: argmin_j ||x - c_j||^2 (float64, ties to the lower index)."""
    X, C = np.asarray(X, np.float64), np.asarray(C, np.float64)
    return ((X[:, None, :] - C[None, :, :]) ** 2).sum(-1).argmin(1)


def check_assign(fn) -> "CheckResult":
    """Exercise: ``fn(X, C, chunk_size) -> labels`` (torch tensors in, n integer labels out), in chunks.

    Cases: random data in float32 and float64, one centre, centres of very different norms (an answer
    that drops the ``||C||^2`` term picks the wrong ones), a chunk size that does not divide n, fresh
    random data each run (a hard-coded answer fails). Calling labkit's own assignment fails.
    """
    rng = np.random.default_rng()

    def case(n, d, k, dtype, chunk, seed=None, spread=1.0):
        def thunk():
            g = np.random.default_rng(seed) if seed is not None else rng
            X = torch.as_tensor(g.normal(size=(n, d)), dtype=dtype)
            C = torch.as_tensor(g.normal(size=(k, d)) * spread * (1 + np.arange(k))[:, None], dtype=dtype)
            with E.forbid("assign"):
                got = fn(X.clone(), C.clone(), chunk)
            got = np.asarray(got.cpu() if hasattr(got, "cpu") else got)
            expect_equal(got.shape, (n,), what="labels shape")
            if got.dtype.kind not in "iu":
                raise AssertionError(f"labels must be integers (argmin indices), got dtype {got.dtype}")
            want = reference_assign(X, C)
            wrong = int((got != want).sum())
            if wrong:
                raise AssertionError(f"{wrong} of {n} points got a centre that is not their nearest "
                                     f"(first at row {int(np.flatnonzero(got != want)[0])})")
        return thunk

    cases = [("300 x 5, k = 4, float32, chunks of 64", case(300, 5, 4, torch.float32, 64, seed=1)),
             ("one centre: every label is 0", case(50, 3, 1, torch.float64, 16, seed=2)),
             ("centres of very different norms (needs ||C||^2)",
              case(400, 8, 6, torch.float64, 100, seed=3, spread=2.0)),
             ("chunk size 7 does not divide n = 250", case(250, 4, 5, torch.float64, 7, seed=4)),
             ("fresh random data, 2,000 x 16, k = 20", case(2000, 16, 20, torch.float32, 512))]
    return run_cases("assignment step (chunked)", cases,
                     hint="per chunk: d2 = (xb*xb).sum(1, keepdim=True) - 2 * xb @ C.T + (C*C).sum(1); "
                          "labels[s:e] = d2.argmin(1); do not call labkit.kmeans.assign")


# ----------------------------------------------------------------------------- exercise 2: distributed update
def reference_update(X, labels, C) -> np.ndarray:
    """Single-process M-step: mean of each cluster's points; an empty cluster keeps its centre."""
    X, C = np.asarray(X, np.float64), np.asarray(C, np.float64).copy()
    for j in range(len(C)):
        m = labels == j
        if m.any():
            C[j] = X[m].mean(0)
    return C


def centroid_update_rank(ctx, fn, X, labels, centers) -> np.ndarray:
    """Run the learner's ``fn(X_local, labels_local, centers)`` on this rank's shard (labkit's own
    update is switched off, so an answer that calls it fails)."""
    Xl = torch.as_tensor(shard(X, ctx.rank, ctx.world_size)).to(ctx.device)  # on the rank's device, as on a GPU
    ll = torch.as_tensor(shard(labels, ctx.rank, ctx.world_size)).to(ctx.device)
    try:
        with E.forbid("centroid_update"):
            out = fn(Xl, ll, torch.as_tensor(centers).to(ctx.device))
    except NotImplementedError:
        return "not attempted"
    except Exception as e:  # say what went wrong on which rank, in the check's own words
        return f"rank {ctx.rank} of {ctx.world_size} raised {type(e).__name__}: {e}"
    return np.asarray(out.detach().cpu() if hasattr(out, "detach") else out, dtype=np.float64)


def _raise_not_implemented():
    raise NotImplementedError


def _update_case_data(seed: int, n: int = 240, d: int = 3, k: int = 5):
    g = np.random.default_rng(seed)
    labels = np.sort(g.integers(0, k - 1, size=n))  # sorted: every shard holds different clusters; k-1 empty
    X = g.normal(size=(n, d)) + labels[:, None] * 3.0
    return X, labels, g.normal(size=(k, d))


def check_centroid_update(fn, world_sizes=(2, 3)) -> "CheckResult":
    """Exercise: ``fn(X_local, labels_local, centers) -> new centers`` on every rank, through ``labkit.launch``.

    Compared on every rank with the single-process update on all the points, for 1, 2 and 3 ranks.
    The shards hold different clusters in different amounts, so skipping the all-reduce (local means)
    or averaging the ranks' means gives wrong centres; the last cluster is empty (keep its centre).
    A stub is detected in this process first, without starting ranks.
    """
    from ..runtime import launch

    X, labels, C = _update_case_data(0, n=12)
    try:  # a stub says so here; anything else (no process group here) is judged on the ranks
        fn(torch.as_tensor(X), torch.as_tensor(labels), torch.as_tensor(C))
    except NotImplementedError:
        return run_cases("distributed centroid update", [("stub", _raise_not_implemented)])
    except Exception:
        pass

    def case(ws, seed):
        def thunk():
            X, labels, C = _update_case_data(seed)
            got = launch(centroid_update_rank, ws, kwargs={"fn": fn, "X": X, "labels": labels, "centers": C},
                         echo=False, timeout=120, pool=True)
            want = reference_update(X, labels, C)
            for g in got:
                if isinstance(g, str):
                    if g == "not attempted":
                        raise NotImplementedError
                    raise AssertionError(g)
            for r, g in enumerate(got):
                expect_close(g, want, rtol=1e-9, atol=1e-9, what=f"centres on rank {r} of {ws}")
        return thunk

    return run_cases("distributed centroid update", [(f"{ws} rank(s)", case(ws, 10 + ws)) for ws in world_sizes],
                     hint="per-cluster sums and counts of the local points, one dist.all_reduce of both "
                          "(k x (d+1) numbers, made on X_local.device: NCCL takes no CPU tensor), then sums / counts; "
                          "a count of 0 keeps the old centre")


# ----------------------------------------------------------------------------- notebook callbacks
def run_demo(k: int = 30, K: int = 5, seed: int = 0) -> dict:
    """Cluster-then-label on the protocol's digits split (one seed): pseudo-labels, counts, test accuracy."""
    from ..semisup import logistic_regression, split

    sp = split(K, seed)
    r = cluster_then_label(sp.X_train, sp.y_semi, k, y_true=sp.y_train, random_state=seed)
    keep = r.y_pseudo >= 0
    acc = float((logistic_regression().fit(sp.X_train[keep], r.y_pseudo[keep]).predict(sp.X_test) == sp.y_test).mean())
    base = float((logistic_regression().fit(sp.X_train[sp.labelled], sp.y_semi[sp.labelled]).predict(sp.X_test)
                  == sp.y_test).mean())
    return {"split": sp, "result": r, "accuracy": acc, "supervised_only": base, "k": k, "K": K, "seed": seed}


def moons_experiment(seeds=range(3), n: int = 400, noise: float = 0.08, k_per_class: int = 3,
                     n_clusters=(2, 10)) -> list[dict]:
    """Two moons: cluster-then-label (k-means, k in ``n_clusters``) against label spreading, same labels.

    Transductive accuracy on the unlabelled points; the classifier step is skipped (the pseudo-labels
    are the prediction), so the only difference is how labels travel: along k-means's convex cells,
    or along the data's neighbourhood graph.
    """
    from sklearn.semi_supervised import LabelSpreading

    from ..data import semi_supervised_targets, two_moons

    rows = []
    for s in seeds:
        X, y = two_moons(n, noise, seed=s)
        X = np.asarray(X, np.float64)
        ys = semi_supervised_targets(y, k_per_class, s)
        unl = ys < 0
        for k in n_clusters:
            r = cluster_then_label(X, ys, k, y_true=y, random_state=s, unlabelled_clusters="nearest")
            rows.append({"method": f"cluster-then-label, k={k}", "seed": s,
                         "accuracy": float((r.y_pseudo[unl] == y[unl]).mean())})
        ls = LabelSpreading(kernel="rbf", gamma=20.0, alpha=0.99, max_iter=1000).fit(X, ys)
        rows.append({"method": "label spreading (RBF)", "seed": s,
                     "accuracy": float((ls.transduction_[unl] == y[unl]).mean())})
    return rows


# ----------------------------------------------------------------------------- tour
def tour(world_size: int = 2) -> list[dict]:
    from ..runtime import launch
    from ..tour import run_check

    lab = lab_name(__package__)
    X = load("digits").astype(np.float64)
    init = E.kmeans_plusplus(torch.as_tensor(X), 10, 0)[0].numpy()
    local = E.KMeans(10, init=init, dtype="float64").fit(X)

    def vs_sklearn():
        from sklearn.cluster import KMeans as SK

        sk = SK(10, init=init, n_init=1).fit(X)
        rel = abs(local.inertia_ / sk.inertia_ - 1)
        return (rel < 1e-9 and (local.labels_ == sk.labels_).all(),
                f"inertia ratio - 1 = {rel:.1e}, {local.n_iter_} iterations")

    def distributed():
        res = launch(fit_rank, world_size, kwargs={"X": X, "init": init, "dtype": "float64"}, echo=False, pool=True)
        same = (gather_labels(res) == local.labels_).all()
        err = float(np.abs(res[0]["centers"] - local.cluster_centers_).max())
        return same and err < 1e-12, f"{world_size} ranks: same labels {same}, max centre error {err:.1e}, " \
                                     f"{res[0]['numbers_per_iter']} numbers all-reduced per iteration"

    def parallel_init():
        res = launch(kmeans_parallel_rank, world_size, kwargs={"X": X, "n_clusters": 10}, echo=False, pool=True)
        C = res[0]["centers"]
        ok = C.shape == (10, 64) and np.isfinite(C).all() and len(np.unique(C.round(9), axis=0)) == 10 \
            and all(np.array_equal(C, r["centers"]) for r in res)
        return ok, f"{res[0]['candidates']} candidates -> 10 centres, equal on all ranks"

    def cluster_label():
        d = run_demo(30, 5, 0)
        r = d["result"]
        return d["accuracy"] > 0.8, (f"K=5: {r.n_pseudo} pseudo-labels, {r.pseudo_accuracy:.1%} right; "
                                     f"accuracy {d['accuracy']:.3f} vs supervised-only {d['supervised_only']:.3f}")

    return [run_check(lab, "k-means = scikit-learn KMeans (digits, same init, float64)", vs_sklearn),
            run_check(lab, f"distributed ({world_size} ranks) = one process in float64", distributed),
            run_check(lab, "k-means|| gives a valid init", parallel_init),
            run_check(lab, "cluster-then-label on digits (1 seed)", cluster_label)]
