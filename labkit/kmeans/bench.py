"""``python -m labkit.kmeans.bench`` (later ``python -m labkit bench kmeans``): labkit's k-means against
scikit-learn's ``KMeans``, measured side by side in one run.

Both get the same initial centres (``n_init`` arrays made by greedy k-means++, seeds 0, 1, ...; each
restart is one run from one array, the lowest inertia is kept), the same ``max_iter`` and ``tol``,
the same data in float32 and the same thread count (``torch.set_num_threads`` and threadpoolctl's
limit for scikit-learn's OpenMP loops). Trials alternate (labkit, scikit-learn, labkit, ...) after
one untimed warm-up of each; the table gives medians and the median of the per-pair time ratios.
Targets: inertia within 1% of scikit-learn's, time ratio <= 1.0.

The distributed part runs the same fit on 2 ranks (each rank building its shard from the same seed)
beside one process: the median time per Lloyd iteration, and the numbers each rank all-reduced per
iteration (measured), against k(d + 1). On the CPU the ranks are gloo processes and everything runs on one
thread each. With ``--device cuda`` the ranks run where ``backend="auto"`` puts them: NCCL, one GPU per
rank, when there are 2 GPUs or more, and the one process on a GPU too; with a single GPU NCCL cannot
run 2 ranks, so the ranks are gloo processes on the CPU and the one process runs on the CPU as well (like
for like). The table's "ran on" column says which ran.

``--device cuda`` runs labkit on the GPU (scikit-learn stays on the CPU, with every core unless
``--threads``); ``--gpu`` is the GPU size preset (1,000,000 x 64, k = 64). Without CUDA it stops with
a clear message and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from ..devices import now


def _sets(args) -> list[tuple[str, dict, int]]:
    if args.gpu:
        return [("generated 1,000,000 x 64", {"name": "generated", "n": 1_000_000, "d": 64, "centers": 64}, 64)]
    n = 50_000 if args.quick else 200_000
    return [("digits 1797 x 64", {"name": "digits"}, 10),
            (f"generated {n:,} x 32", {"name": "generated", "n": n, "d": 32, "centers": 10}, 10)]


def compare(X, k, inits, max_iter, tol, device="cpu", threads=1, sk_threads=None, repeats=3) -> dict:
    """Interleaved trials of labkit and scikit-learn from the same inits; medians and ratios."""
    from sklearn.cluster import KMeans as SK
    from threadpoolctl import threadpool_limits

    from .estimator import KMeans

    torch.set_num_threads(threads)

    def ours():
        t0 = now(device)  # synchronised: the GPU's queued work counts where it runs
        fits = [KMeans(k, init=c, max_iter=max_iter, tol=tol, device=device).fit(X) for c in inits]
        seconds = now(device) - t0
        best = min(fits, key=lambda f: f.inertia_)
        return seconds, best.inertia_, best.n_iter_, best

    def theirs():
        with threadpool_limits(sk_threads or threads):
            t0 = time.perf_counter()
            fits = [SK(k, init=c, n_init=1, max_iter=max_iter, tol=tol).fit(X) for c in inits]
            best = min(fits, key=lambda f: f.inertia_)
            return time.perf_counter() - t0, best.inertia_, best.n_iter_, best

    ours(), theirs()  # warm-up (CUDA context, caches, lazy imports)
    a, b = [], []
    for _ in range(repeats):
        a.append(ours())
        b.append(theirs())
    ratios = [x[0] / y[0] for x, y in zip(a, b)]
    fa = a[-1][3]
    return {"labkit s": statistics.median(x[0] for x in a), "sklearn s": statistics.median(y[0] for y in b),
            "time ratio": statistics.median(ratios), "inertia ratio": f"{a[-1][1] / b[-1][1]:.6f}",
            "iterations": f"{a[-1][2]} / {b[-1][2]}",
            "labkit ms/iter": 1e3 * float(np.median(fa.iter_seconds_)), "_labels_equal": None}


def _dist_rank(ctx, data, k, init, max_iter, tol):
    from .datasets import load
    from .distributed import fit_distributed, shard

    X = shard(load(**data), ctx.rank, ctx.world_size)
    r = fit_distributed(X, k, init=init, max_iter=max_iter, tol=tol, dtype="float32", device=ctx.device)
    return {"ms_per_iter": 1e3 * float(np.median(r.iter_seconds)), "numbers": r.numbers_per_iter,
            "n_iter": r.n_iter, "inertia": r.inertia}


def distributed(label, data, X, k, init, max_iter, tol, repeats=3, device="cpu") -> dict:
    """2 ranks beside one process, interleaved; medians. ``device="cpu"``: gloo ranks and the process on one thread
    each. Otherwise the ranks take ``backend="auto"`` (NCCL with a GPU each where there are 2 GPUs or more, else gloo
    on the CPU) and the one process runs where they do; the row's ``ran on`` says which."""
    from ..runtime import Pool
    from .estimator import KMeans

    torch.set_num_threads(1)
    one, two, numbers = [], [], 0
    with Pool(2, backend="gloo" if device == "cpu" else "auto", quiet=True, echo=False) as pool:
        where = "cuda" if pool.backend == "nccl" else "cpu"
        ran_on = ("2 NCCL ranks on 2 GPUs, 1 process on a GPU" if where == "cuda" else
                  "2 gloo ranks, 1 process, on the CPU, 1 thread each"
                  + ("" if device == "cpu" else f" ({pool.reason})"))
        pool.run(_dist_rank, kwargs={"data": data, "k": k, "init": init, "max_iter": 2, "tol": tol}, timeout=600)
        for _ in range(repeats):
            f = KMeans(k, init=init, max_iter=max_iter, tol=tol, device=where).fit(X)
            one.append(1e3 * float(np.median(f.iter_seconds_)))
            res = pool.run(_dist_rank, kwargs={"data": data, "k": k, "init": init, "max_iter": max_iter, "tol": tol},
                           timeout=600)
            two.append(max(r["ms_per_iter"] for r in res))
            numbers = res[0]["numbers"]
    d = X.shape[1]
    return {"set": label, "ran on": ran_on, "1 process ms/iter": statistics.median(one),
            "2 ranks ms/iter": statistics.median(two),
            "speed-up": statistics.median(one) / statistics.median(two),
            "numbers all-reduced / iter (measured)": numbers, "k(d+1)": k * (d + 1),
            "bytes / iter": numbers * 4, "iterations": res[0]["n_iter"]}


def _accuracy(quick: bool) -> int:
    """The accuracy table (the protocol is labkit.semisup's; the methods are lab 06's)."""
    from ..viz import format_table
    from .cluster_label import accuracy_rows

    seeds = range(3 if quick else 10)
    t0 = time.perf_counter()
    rows = accuracy_rows(ks=(1, 3, 5, 10), seeds=seeds, progress=True)
    print(f"digits / 16, stratified 50/50 split, K labels per class, test accuracy, mean ± sd over {len(seeds)} seeds; "
          "logistic regression (C=1) for every trained model; nothing tuned on the test half")
    print(format_table([{"method": r["method"], "K": r["K"], "mean": r["mean"], "sd": r["sd"], "seconds": r["seconds"],
                         **({"error": r["error"]} if "error" in r else {})} for r in rows], floatfmt="{:.3f}"))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.kmeans.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 50,000-row generated set, 1 restart, 2 trials")
    p.add_argument("--repeats", type=int, default=None, help="timed trials of each (default 5; 2 with --quick)")
    p.add_argument("--n-init", type=int, default=None, help="restarts, each from the same k-means++ array (default 3)")
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both (default 1 on the CPU; on --device cuda scikit-learn gets every core)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (labkit only; scikit-learn runs on the CPU)")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU size preset: 1,000,000 x 64, k = 64 (implies --device cuda)")
    p.add_argument("--no-distributed", action="store_true", help="skip the 2-rank comparison")
    p.add_argument("--accuracy", action="store_true",
                   help="instead: the cluster-then-label accuracy table by the semi-supervised protocol "
                        "(digits, K in 1, 3, 5, 10; 10 seeds, 3 with --quick)")
    args = p.parse_args(argv)
    from ..viz import format_table

    if args.accuracy:
        return _accuracy(args.quick)

    device = "cuda" if args.gpu else args.device
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        print(f"error: --device {device} needs a CUDA GPU, but torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run without --device cuda/--gpu "
              "for the CPU benchmark", file=sys.stderr)
        return 2
    repeats = args.repeats or (2 if args.quick or args.gpu else 5)
    n_init = args.n_init or (1 if args.quick or args.gpu else 3)
    threads = args.threads or 1
    sk_threads = args.threads or (os.cpu_count() if device != "cpu" else 1)
    from .datasets import load
    from .estimator import kmeans_plusplus

    rows, drows = [], []
    t_start = time.perf_counter()
    for label, data, k in _sets(args):
        X = load(**data)
        X64 = torch.as_tensor(X, dtype=torch.float64)
        inits = [kmeans_plusplus(X64 - X64.mean(0), k, s)[0].add(X64.mean(0)).numpy().astype(np.float32)
                 for s in range(n_init)]
        r = compare(X, k, inits, args.max_iter, args.tol, device, threads, sk_threads, repeats)
        r.pop("_labels_equal")
        rows.append({"set": label, "k": k, "restarts": n_init, **r,
                     "inertia ok (<1%)": abs(float(r["inertia ratio"]) - 1) <= 0.01,
                     "time ok (<=1)": r["time ratio"] <= 1.0})
        print(f"  {label}: done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
        if not args.no_distributed:
            drows.append(distributed(label, data, X, k, inits[0], args.max_iter, args.tol, repeats, device))
    where = f"labkit on {device}" + (f" ({torch.cuda.get_device_name()})" if device != "cpu" else "")
    print(f"k-means: labkit vs scikit-learn KMeans, same inits, max_iter={args.max_iter}, tol={args.tol:g}, float32; "
          f"{where}; threads: labkit {threads}, scikit-learn {sk_threads}; medians of {repeats} interleaved trials")
    print(format_table(rows, floatfmt="{:.4g}"))
    if drows:
        print("\ndistributed Lloyd: 2 ranks beside 1 process, same init (where: the 'ran on' column); "
              "ms per iteration (median; for 2 ranks the slower rank)")
        print(format_table(drows, floatfmt="{:.4g}"))
    print(f"\n({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
