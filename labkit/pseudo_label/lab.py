"""Lab 07's rank function, exercise checks and tour.

* :func:`protocol_rank`: the evaluation protocol split over ranks (each rank runs every ``world_size``-th seed;
  the rows are gathered on every rank), so that ``launch(protocol_rank, 2, kwargs=...)`` gives the same table
  as :func:`labkit.semisup.evaluate` in one process.
* :func:`check_e_step`: the learner's E-step against the library's on several cases (priors, covariances,
  points far from every mean); calling the library's own E-step is refused.
* :func:`check_threshold`: the learner's rule ``choose_threshold(confidence, correct) -> t`` is given held-out
  labelled points of a calibrated and of an under-confident model; the check measures the precision and the
  count of the pseudo-labels that ``t`` admits among the unlabelled points.
* The notebook's runners (:func:`demo`, :func:`calibration_rows`, :func:`cnn_runs` with :data:`CNN_SETTINGS`;
  :func:`fixmatch_rows` over :data:`FIXMATCH_TRIED` is how those settings were chosen) and the lab's methods for
  :func:`labkit.semisup.evaluate`, read here from :mod:`labkit.pseudo_label.methods`: :data:`GENERATIVE` (the
  model's fixed settings), :func:`generative`, :func:`generative_supervised`, :data:`METHODS`, :func:`make_methods`,
  :func:`local_protocol`.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from ..checks import CheckResult, expect_close, refusing, run_cases
from ..tour import lab_name
from . import generative as _gen
from . import methods as _methods
from .methods import GENERATIVE, METHODS, generative, generative_supervised, local_protocol, make_methods

__all__ = ["demo", "calibration_rows", "CNN_SETTINGS", "FIXMATCH_TRIED", "cnn_runs", "fixmatch_rows",
           "protocol_rank", "local_protocol", "METHODS", "make_methods", "GENERATIVE",
           "generative", "generative_supervised", "check_e_step", "check_threshold", "threshold_cases", "tour"]

LAB = lab_name(__package__)


def _merge(parts: list[list[dict]], seeds: list[int], world_size: int) -> list[dict]:
    """Rows from each rank's seeds -> one row per (method, K), accuracies in seed order."""
    out = []
    for i, row in enumerate(parts[0]):
        acc_by_seed = {}
        secs = 0.0
        for r, rows in enumerate(parts):
            mine = seeds[r::world_size]
            secs += rows[i]["seconds"]
            for s, a in zip(mine, rows[i]["accuracies"]):
                acc_by_seed[s] = a
        a = np.array([acc_by_seed[s] for s in seeds if s in acc_by_seed])
        merged = {"method": row["method"], "K": row["K"], "mean": float(a.mean()) if a.size else float("nan"),
                  "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0, "seeds": len(a), "seconds": secs,
                  "accuracies": a.tolist()}
        errs = [rows[i]["error"] for rows in parts if "error" in rows[i]]
        if errs:
            merged["error"] = errs[0]
        out.append(merged)
    return out


def protocol_rank(ctx, methods: list[str] | None = None, ks=(5,), seeds=(0, 1), dataset=None, threads: int = 1):
    """Run :func:`labkit.semisup.evaluate` on seeds ``seeds[rank::world_size]``; gather; every rank returns the
    merged rows (same order and values as one process would give)."""
    import torch
    import torch.distributed as dist

    from .. import semisup

    torch.set_num_threads(threads)
    seeds = list(seeds)
    mine = seeds[ctx.rank::ctx.world_size]
    if mine:
        rows = semisup.evaluate(make_methods(methods), ks=ks, seeds=mine, dataset=dataset)
    else:  # more ranks than seeds: an empty row set with the same shape
        rows = [{"method": m, "K": k, "accuracies": [], "seconds": 0.0}
                for m in (methods or list(METHODS)) for k in ks]
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, rows)
    return _merge(parts, seeds, ctx.world_size)


# ----------------------------------------------------------------------------- the notebook's demo
def demo(k: int = 5, lam: float = 1.0, threshold: float = 0.9, seed: int = 0) -> dict:
    """One protocol split: the generative model fitted on labels only and by EM (weight ``lam``), its
    temperature cross-fitted on the labelled points, the unlabelled points it pseudo-labels above
    ``threshold`` (count, precision against the hidden labels), and logistic regression trained on labelled +
    pseudo-labelled points against labelled only. The widgets' callback."""
    from .. import semisup
    from .confidence import cross_fitted_temperature, validate_threshold

    threshold = validate_threshold(threshold)
    sp = semisup.split(k, seed)
    sup = _gen.GaussianEM(**{**_methods.GENERATIVE, "lam": 0.0}).fit(sp.X_train, sp.y_semi)
    em = _gen.GaussianEM(**{**_methods.GENERATIVE, "lam": lam}).fit(sp.X_train, sp.y_semi)
    T = cross_fitted_temperature(lambda: _gen.GaussianEM(**{**_methods.GENERATIVE, "lam": lam}), sp.X_train, sp.y_semi,
                                 seed=seed, repeats=2)
    T = 1.0 if T is None else T
    pool = np.flatnonzero(sp.y_semi < 0)
    raw = em.predict_proba(sp.X_train[pool])
    em.temperature = T
    cal = em.predict_proba(sp.X_train[pool])
    em.temperature = 1.0
    pred = em.classes_[cal.argmax(1)]
    ok = cal.max(1) >= threshold
    y_plus = sp.y_semi.copy()
    y_plus[pool[ok]] = pred[ok]
    lr_lab = semisup.logistic_regression().fit(sp.X_train[sp.labelled], sp.y_semi[sp.labelled])
    known = y_plus >= 0
    lr_plus = semisup.logistic_regression().fit(sp.X_train[known], y_plus[known])
    return {"split": sp, "sup": sup, "em": em, "temperature": T, "pool": pool, "raw": raw, "calibrated": cal,
            "pool_truth": sp.y_train[pool], "admitted": int(ok.sum()),
            "precision": float((pred[ok] == sp.y_train[pool][ok]).mean()) if ok.any() else float("nan"),
            "acc": {"generative, labelled only": sup.score(sp.X_test, sp.y_test),
                    f"generative EM (lam={lam:g})": em.score(sp.X_test, sp.y_test),
                    "LR, labelled only": lr_lab.score(sp.X_test, sp.y_test),
                    "LR, labelled + pseudo-labelled": lr_plus.score(sp.X_test, sp.y_test)}}


def calibration_rows(seeds=(0, 1, 2), k: int = 5, repeats: int = 2) -> list[dict]:
    """Per seed: EM's temperature cross-fitted on the labelled points, the ECE on the unlabelled points before
    and after scaling, and (for reference only, it uses the hidden labels) the ECE at the best possible T."""
    from .. import semisup
    from .confidence import cross_fitted_temperature, expected_calibration_error, fit_temperature, softmax

    rows = []
    for s in seeds:
        sp = semisup.split(k, s)
        em = _gen.GaussianEM(**_methods.GENERATIVE).fit(sp.X_train, sp.y_semi)
        pool = np.flatnonzero(sp.y_semi < 0)
        lp, truth = em.predict_joint_log_proba(sp.X_train[pool]), sp.y_train[pool]
        T = cross_fitted_temperature(lambda: _gen.GaussianEM(**_methods.GENERATIVE), sp.X_train, sp.y_semi,
                                     seed=s, repeats=repeats)
        T_best = fit_temperature(lp, truth)
        rows.append({"seed": s, "T (labelled points)": T, "ECE raw": expected_calibration_error(softmax(lp), truth),
                     "ECE scaled": expected_calibration_error(softmax(lp, T), truth),
                     "best T (hidden labels)": T_best,
                     "ECE at best T": expected_calibration_error(softmax(lp, T_best), truth)})
    return rows


# ----------------------------------------------------------------------------- the CNN runs (section 5)
#: The settings of section 5's three CNN runs, chosen on development seeds 100-102 (:data:`FIXMATCH_TRIED`,
#: :func:`fixmatch_rows`), never on the notebook's seeds. With 50 labels a fresh CNN is confident about no
#: unlabelled point, so the first ``warmup`` steps train on the labels alone; then the unlabelled loss joins.
CNN_SETTINGS = {"steps": 600, "warmup": 200, "threshold": 0.9, "batch_unlabelled": 64}

#: What was tried for FixMatch (the knobs the FixMatch paper tunes: threshold, unlabelled ratio mu =
#: batch_unlabelled / 32, augmentation strength, steps, lambda_u; plus a supervised warm-up), each beside the
#: supervised-only run of the same length.
FIXMATCH_TRIED = {
    "supervised, 100 steps": {"mode": "supervised", "steps": 100},
    "FixMatch, 100 steps, t=0.95, no warm-up": {"mode": "fixmatch", "steps": 100, "batch_unlabelled": 64},
    "supervised, 200 steps": {"mode": "supervised", "steps": 200},
    "FixMatch, 200 steps, warm-up 100, t=0.95": {"mode": "fixmatch", "steps": 200, "warmup": 100,
                                                  "batch_unlabelled": 64},
    "FixMatch, 200 steps, warm-up 100, t=0.8": {"mode": "fixmatch", "steps": 200, "warmup": 100, "threshold": 0.8,
                                                 "batch_unlabelled": 64},
    "FixMatch, 200 steps, warm-up 100, t=0.9, mu=4": {"mode": "fixmatch", "steps": 200, "warmup": 100,
                                                       "threshold": 0.9, "batch_unlabelled": 128},
    "supervised, 300 steps": {"mode": "supervised", "steps": 300},
    "FixMatch, 300 steps, warm-up 100, t=0.9": {"mode": "fixmatch", "steps": 300, "warmup": 100, "threshold": 0.9,
                                                 "batch_unlabelled": 64},
    "FixMatch, 300 steps, warm-up 200, t=0.9": {"mode": "fixmatch", "steps": 300, "warmup": 200, "threshold": 0.9,
                                                 "batch_unlabelled": 64},
    "supervised, 600 steps": {"mode": "supervised", "steps": 600},
    "FixMatch, 600 steps, warm-up 200, t=0.9 (chosen)": {"mode": "fixmatch", **CNN_SETTINGS},
}


def cnn_runs(seed: int = 0, k: int = 5, modes=("supervised", "pseudo_label", "fixmatch"), **settings) -> list:
    """Section 5: :func:`~labkit.pseudo_label.train_cnn` in each mode on one protocol split (K = ``k``, ``seed``),
    with :data:`CNN_SETTINGS` updated by ``settings``; the hidden labels go to the log only."""
    from .. import semisup
    from .consistency import train_cnn

    sp = semisup.split(k, seed)
    kw = {**CNN_SETTINGS, **settings}
    return [train_cnn(sp.X_train, sp.y_semi, mode, y_true=sp.y_train, X_test=sp.X_test, y_test=sp.y_test, seed=seed,
                      **kw) for mode in modes]


def fixmatch_rows(configs: dict | None = None, seeds=(100, 101, 102), k: int = 5) -> list[dict]:
    """Each ``{name: train_cnn keyword arguments}`` (default :data:`FIXMATCH_TRIED`) on the same splits: test
    accuracy mean, sd and per seed, and the mask rate over the last 20% of steps (mean over seeds). Minutes on
    two cores: it is how :data:`CNN_SETTINGS` was chosen, not something the notebook runs."""
    from .. import semisup
    from .consistency import train_cnn

    configs = FIXMATCH_TRIED if configs is None else configs
    seeds = list(seeds)
    acc = {name: [] for name in configs}
    mask = {name: [] for name in configs}
    for s in seeds:
        sp = semisup.split(k, s)
        for name, kw in configs.items():
            run = train_cnn(sp.X_train, sp.y_semi, y_true=sp.y_train, X_test=sp.X_test, y_test=sp.y_test, seed=s,
                            **kw)
            acc[name].append(run.test_accuracy)
            mask[name].append(run.summary()["mask rate (last 20%)"])
    rows = []
    for name in configs:
        a, m = np.array(acc[name]), np.array(mask[name], dtype=float)
        rows.append({"configuration": name, "mean": float(a.mean()),
                     "sd": float(a.std(ddof=1)) if len(a) > 1 else float("nan"), "per seed": a.round(3).tolist(),
                     "mask rate (last 20%)": float(m.mean()) if np.isfinite(m).all() else float("nan")})
    return rows


# ----------------------------------------------------------------------------- exercise 1: the E-step
@contextlib.contextmanager
def _no_library_e_step():
    """While the learner's function runs, labkit's own E-step (and everything built on it) refuses to run."""
    with refusing(_gen.log_joint, why="you called labkit's own E-step (e_step / log_joint / predict_proba): write the "
                        "responsibilities yourself from the means, covariances and priors"):
        yield


def _random_case(rng, n, d, C, spread=3.0, far=0.0, skew_priors=False, same_cov=False):
    means = rng.normal(scale=spread, size=(C, d))
    covs = []
    for _ in range(C):
        A = rng.normal(size=(d, d)) * (0.3 + rng.random())
        covs.append(A @ A.T + 0.5 * np.eye(d))
    if same_cov:
        covs = [covs[0]] * C
    covs = np.stack(covs)
    priors = rng.dirichlet(np.ones(C) * (0.5 if skew_priors else 50.0))
    Z = means[rng.integers(0, C, size=n)] + rng.normal(size=(n, d))
    if far:
        Z = Z + far * rng.normal(size=(1, d))
    return Z, means, covs, priors


def e_step_cases(seed: int | None = None) -> list[tuple[str, tuple]]:
    """The check's cases: fresh random numbers each call unless ``seed`` is given (hard-coding cannot pass)."""
    rng = np.random.default_rng(seed)
    return [
        ("2-D, 3 classes, equal covariances", _random_case(rng, 20, 2, 3, same_cov=True)),
        ("unequal priors (pi matters)", _random_case(rng, 30, 2, 3, spread=0.8, skew_priors=True, same_cov=True)),
        ("different covariances (log|Sigma| matters)", _random_case(rng, 30, 3, 4, spread=1.0)),
        ("5-D, 10 classes", _random_case(rng, 50, 5, 10)),
        ("points far from every mean (needs log-sum-exp)", _random_case(rng, 10, 4, 3, far=200.0)),
    ]


def check_e_step(e_step_fn, seed: int | None = None) -> CheckResult:
    """``e_step_fn(Z, means, covariances, priors) -> R`` with full covariances (C, d, d): R[i, c] = P(y=c|z_i)."""
    def case(args):
        def thunk():
            Z, means, covs, priors = args
            with _no_library_e_step():
                got = e_step_fn(Z.copy(), means.copy(), covs.copy(), priors.copy())
            got = np.asarray(got, dtype=float)
            want, _ = _gen.e_step(Z, means, covs, priors, "full")
            if got.shape != want.shape:
                raise AssertionError(f"return an (n, C) = {want.shape} array of responsibilities, "
                                     f"got shape {got.shape}")
            if not np.all(np.isfinite(got)):
                raise AssertionError(f"{int((~np.isfinite(got)).sum())} NaN/inf responsibilities: exp of very negative "
                                     "log-densities underflows to 0/0; subtract the row maximum before exp "
                                     "(log-sum-exp)")
            if not np.allclose(got.sum(axis=1), 1, atol=1e-6):
                raise AssertionError("rows must sum to 1: divide each row by its sum (normalise over classes)")
            expect_close(got, want, rtol=1e-5, atol=1e-6, what="responsibilities")
        return thunk

    return run_cases("E-step: responsibilities P(y = c | z)", [(n, case(a)) for n, a in e_step_cases(seed)],
                     hint="log r_ic = log pi_c + log N(z_i; mu_c, Sigma_c) - logsumexp_k(...); "
                          "log N = -(d log 2pi + log|Sigma| + (z-mu)^T Sigma^-1 (z-mu)) / 2")


# ----------------------------------------------------------------------------- exercise 2: the threshold
_THRESHOLD_CACHE: dict = {}


def threshold_cases(seeds=(0, 1, 2)) -> list[dict]:
    """For each seed (K = 10): a generative model fitted on half the labels; the other half are held-out
    labelled points. Two scenarios per seed: calibrated (temperature fitted on the held-out half) and
    under-confident (5x that temperature). Each gives the held-out (confidence, correct) and the unlabelled
    pool's (confidence, correct) that the check scores."""
    from .. import semisup
    from .confidence import fit_temperature, softmax

    key = tuple(seeds)
    if key in _THRESHOLD_CACHE:
        return _THRESHOLD_CACHE[key]
    cases = []
    for s in seeds:
        sp = semisup.split(10, s)
        rng = np.random.default_rng(s)
        val = np.sort(np.concatenate([rng.choice(np.flatnonzero(sp.y_semi == c), 5, replace=False)
                                      for c in range(10)]))
        y2 = sp.y_semi.copy()
        y2[val] = -1
        m = _gen.GaussianEM(**{**_methods.GENERATIVE, "lam": 0.0}).fit(sp.X_train, y2)
        lv = m.predict_joint_log_proba(sp.X_train[val])
        T = fit_temperature(lv, sp.y_semi[val])
        pool = np.flatnonzero(sp.y_semi < 0)
        lp = m.predict_joint_log_proba(sp.X_train[pool])
        for name, temp in (("calibrated", T), ("under-confident", 5 * T)):
            pv, pp = softmax(lv, temp), softmax(lp, temp)
            cases.append({"name": f"seed {s}, {name} (T = {temp:.1f})",
                          "val_confidence": pv.max(1), "val_correct": pv.argmax(1) == sp.y_semi[val],
                          "pool_confidence": pp.max(1), "pool_correct": pp.argmax(1) == sp.y_train[pool]})
    _THRESHOLD_CACHE[key] = cases
    return cases


def admitted(threshold: float, case: dict) -> tuple[int, float]:
    """How many pool points a threshold admits and the precision of their pseudo-labels."""
    ok = case["pool_confidence"] >= threshold
    return int(ok.sum()), float(case["pool_correct"][ok].mean()) if ok.any() else float("nan")


def check_threshold(choose_threshold, min_precision: float = 0.95, min_share: float = 0.25,
                    seeds=(0, 1, 2)) -> CheckResult:
    """``choose_threshold(confidence, correct) -> t`` from held-out labelled points only; passes when, on the
    unlabelled pool, the pseudo-labels admitted by ``t`` are at least ``min_precision`` right and at least
    ``min_share`` of the pool."""
    def case(c):
        def thunk():
            t = choose_threshold(c["val_confidence"].copy(), c["val_correct"].copy())
            try:
                t = float(t)
            except (TypeError, ValueError):
                raise AssertionError(f"return one number, the threshold, got {t!r}") from None
            if not 0 < t <= 1:
                raise AssertionError(f"a posterior threshold lies in (0, 1], got {t:g}")
            n, prec = admitted(t, c)
            share = n / len(c["pool_confidence"])
            if share < min_share:
                raise AssertionError(f"t = {t:.3f} admits {n} pseudo-labels ({share:.0%} of the pool, need "
                                     f">= {min_share:.0%}): too strict for this model's confidences")
            if prec < min_precision:
                raise AssertionError(f"t = {t:.3f} admits {n} pseudo-labels ({share:.0%}) but only {prec:.1%} are "
                                     f"right (need >= {min_precision:.0%}): too lenient")
        return thunk

    return run_cases(f"threshold: precision >= {min_precision:.0%} and count >= {min_share:.0%} of the pool",
                     [(c["name"], case(c)) for c in threshold_cases(seeds)],
                     hint="one fixed number cannot suit both a calibrated and an under-confident model: pick t "
                          "from the held-out points, e.g. the lowest confidence above which they are (almost) "
                          "all right")


# ----------------------------------------------------------------------------- tour
def tour(world_size: int = 2) -> list[dict]:
    from .. import semisup
    from ..runtime import launch
    from ..tour import run_check
    from .confidence import odds_to_posterior_threshold, posterior_odds
    from .consistency import train_cnn

    def em_monotone():
        sp = semisup.split(5, 0)
        m = _gen.GaussianEM(**_methods.GENERATIVE).fit(sp.X_train, sp.y_semi)
        d = np.diff(m.log_likelihood_)
        acc = m.score(sp.X_test, sp.y_test)
        return (bool((d >= -1e-9).all()) and acc > 0.8,
                f"{m.n_iter_} EM iterations, min step {d.min():.2e}, acc {acc:.3f}")

    def odds():
        p = np.random.default_rng(0).dirichlet(np.ones(10) * 0.3, size=500)
        t = 9.0
        same = np.array_equal(posterior_odds(p) >= t, p.max(1) >= odds_to_posterior_threshold(t))
        return same, "D >= 9 selects exactly the points with p >= 0.9"

    def ranks():
        kw = {"methods": ["generative EM"], "ks": (5,), "seeds": tuple(range(max(2, world_size)))}
        t0 = time.perf_counter()
        got = launch(protocol_rank, world_size, kwargs=kw, echo=False, timeout=300)[0]
        ref = local_protocol(**kw)
        same = got[0]["accuracies"] == ref[0]["accuracies"]
        return same, (f"{world_size} ranks, {len(kw['seeds'])} seeds, acc {got[0]['mean']:.3f}, "
                      f"{time.perf_counter() - t0:.1f} s")

    def cnn():
        sp = semisup.split(5, 0)
        run = train_cnn(sp.X_train, sp.y_semi, "fixmatch", steps=20, y_true=sp.y_train)
        return len(run.mask_rate) == 20, f"20 FixMatch steps, last mask rate {run.mask_rate[-1]:.2f}"

    return [run_check(LAB, "EM log-likelihood never decreases", em_monotone),
            run_check(LAB, "odds threshold t = posterior threshold t/(1+t)", odds),
            run_check(LAB, f"protocol on {world_size} ranks = one process", ranks),
            run_check(LAB, "CNN with FixMatch runs and logs", cnn)]
