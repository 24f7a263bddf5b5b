"""The statistics of an ablation report: paired differences over seeds, intervals, Holm's adjustment.

Pure numpy and :mod:`math` (no scipy): the t distribution is computed here from its definition.

* :func:`t_cdf` and :func:`t_ppf`: Student's t distribution with ``df`` degrees of freedom (any real
  ``df > 0``). For ``t > 0`` the upper tail is ``P(T > t) = I_x(df/2, 1/2) / 2`` with ``x = df / (df + t^2)``,
  where ``I_x(a, b)`` is the regularised incomplete beta function (Abramowitz & Stegun 26.5.27 and 26.7.1).
  ``I_x(a, b)`` is evaluated by its continued fraction (A&S 26.5.8; the form given in Numerical Recipes,
  Press et al., 3rd ed. 2007, section 6.4)

      I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d1 / (1 + d2 / (1 + ...)))
      d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),   d_{2m} = m(b-m) x / ((a+2m-1)(a+2m)),

  summed with the modified Lentz method (Lentz 1976; Thompson & Barnett 1986), and through the symmetry
  ``I_x(a, b) = 1 - I_{1-x}(b, a)`` when ``x > (a+1)/(a+b+2)``, where the fraction converges slowly. Both ``x``
  and ``1-x = t^2/(df+t^2)`` are formed directly, so neither the far tail nor ``t`` near 0 loses digits.
  The quantile solves ``P(T > t) = p`` for the smaller tail ``p = min(q, 1-q)`` by Newton's method on a bracket
  that bisection keeps (geometrically while the bracket spans orders of magnitude): it cannot diverge.
* :func:`paired_difference`: the variant's and the baseline's metric on the same seeds, ``d_i = v_i - b_i``.
  ``diff = mean(d)``, ``sd`` (ddof=1), ``se = sd / sqrt(n)``, ``t = diff / se`` on ``n - 1`` degrees of freedom,
  the two-sided p-value ``2 P(T > |t|)`` (Student's paired t-test, exactly what ``scipy.stats.ttest_rel``
  computes), and the interval ``diff -/+ t_{(1+c)/2, n-1} se``; or, with ``method="bootstrap"``, the
  percentile bootstrap interval of the mean difference, resampling the seeds (the pairs) with replacement
  (Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, chapter 13), or its bias-corrected and
  accelerated form (BCa, ibid. chapter 14; ``method="bca"``). Wins, ties and losses count
  the seeds on which the variant was above, equal to or below the baseline.
* :func:`bootstrap_ci`: those bootstrap intervals on their own.
* :func:`mean_ci`: the t interval of one plain mean (a configuration's mean over its seeds).
* :func:`holm`: Holm's step-down adjusted p-values (Holm 1979, *Scand. J. Statist.* 6, 65-70): sort the m
  p-values, ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``, put them back in the input order. Rejecting
  where ``p~ <= alpha`` controls the family-wise error rate at ``alpha``.

Every function says what it could not do instead of crashing, and none reports a statistic it cannot support:
fewer than ``min_seeds`` (3) pairs, or differences that are all equal (sd = 0, so the noise cannot be estimated),
give no interval, no t and no p-value (``nan``), a ``note`` saying why and ``status`` "too few seeds" or
"zero variance". Two seeds would give a t interval on one degree of freedom (12.7 standard errors either side) and two
equal differences a "p = 0": numbers that look like evidence and are not.

The module is long because the t distribution (density, CDF by the incomplete beta's continued fraction, quantile
by Newton's method) is written out here rather than taken from scipy.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from labkit._validate import ArgumentError, validate_choice, validate_int, validate_number

__all__ = ["MIN_SEEDS", "TOO_FEW", "ZERO_VARIANCE", "bootstrap_ci", "holm", "mean_ci", "paired_difference", "t_cdf",
           "t_pdf", "t_ppf", "t_sf"]

MIN_SEEDS = 3  # the fewest paired seeds from which an interval or a p-value is reported
TOO_FEW, ZERO_VARIANCE = "too few seeds", "zero variance"  # the ``status`` of a comparison that has no test

_EPS = 1e-16  # relative accuracy asked of the continued fraction
_TINY = 1e-300  # Lentz's guard against a zero denominator
_MAX_TERMS = 20000


# ---------------------------------------------------------------- the incomplete beta and the t distribution

def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (without its prefactor), modified Lentz."""
    f = c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    f = d
    for m in range(1, _MAX_TERMS):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            step = c * d
            f *= step
        if abs(step - 1.0) < _EPS:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """Regularised incomplete beta I_x(a, b), given x and y = 1 - x (each formed accurately by the caller)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, y, x)
    log_front = a * math.log(x) + b * math.log(y) - math.log(a) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) * _beta_fraction(a, b, x)


def _check_df(df: Any) -> float:
    return validate_number("df", df, minimum=0, open_low=True, hint="pass the degrees of freedom, n - 1 for n seeds")


def _sf1(t: float, df: float) -> float:
    """P(T > t) for one float t."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    t2 = t * t
    upper = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))  # P(T > |t|)
    return upper if t >= 0 else 1.0 - upper


def _elementwise(fn, values, df):
    df = _check_df(df)
    if np.ndim(values) == 0:
        return fn(float(values), df)
    arr = np.asarray(values, dtype=float)
    return np.array([fn(float(v), df) for v in arr.ravel()]).reshape(arr.shape)


def t_sf(t, df):
    """P(T > t), the upper tail (accurate far out, where 1 - :func:`t_cdf` would round to 0)."""
    return _elementwise(_sf1, t, df)


def t_cdf(t, df):
    """P(T <= t) for Student's t with ``df > 0`` degrees of freedom (scalar or array ``t``)."""
    return _elementwise(lambda v, d: _sf1(-v, d), t, df)


def _pdf1(t: float, df: float) -> float:
    if math.isinf(t):
        return 0.0
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                    - (df + 1) / 2 * math.log1p(t * t / df))


def t_pdf(t, df):
    """The density of Student's t."""
    return _elementwise(_pdf1, t, df)


def _upper_quantile(p: float, sf, pdf) -> float:
    """The x > 0 with sf(x) = p, for 0 < p < 1/2 (sf decreasing, pdf = -sf'): Newton inside a bracket that
    bisection keeps, so it cannot diverge."""
    lo, hi = 0.0, 1.0
    while sf(hi) > p:  # grow the bracket: the tail of df=1 needs t ~ 1 / (pi p)
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            return math.inf
    x = 0.5 * (lo + hi)
    for _ in range(400):
        f = sf(x) - p
        if f == 0.0:
            return x
        if f > 0:
            lo = x
        else:
            hi = x
        dens = pdf(x)
        new = x + f / dens if dens > 0 else math.nan  # f' = -pdf
        if not lo < new < hi:  # Newton left the bracket: bisect (geometrically over orders of magnitude)
            new = math.sqrt(lo * hi) if lo > 0 and hi > 4 * lo else 0.5 * (lo + hi)
        if abs(new - x) <= 1e-15 * abs(x) or hi - lo <= 1e-15 * hi:
            return new
        x = new
    return x


def _ppf1(q: float, df: float) -> float:
    if math.isnan(q):
        return math.nan
    if q == 0.0:
        return -math.inf
    if q == 1.0:
        return math.inf
    if q == 0.5:
        return 0.0
    sf, pdf = (lambda x: _sf1(x, df)), (lambda x: _pdf1(x, df))
    return _upper_quantile(1.0 - q, sf, pdf) if q > 0.5 else -_upper_quantile(q, sf, pdf)


def _norm_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _norm_ppf(q: float) -> float:
    """The standard normal quantile (for BCa), by the same safeguarded Newton on erfc."""
    if q <= 0.0 or q >= 1.0:
        return -math.inf if q <= 0.0 else math.inf
    if q == 0.5:
        return 0.0
    sf = lambda z: 0.5 * math.erfc(z / math.sqrt(2.0))
    pdf = lambda z: math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return _upper_quantile(1.0 - q, sf, pdf) if q > 0.5 else -_upper_quantile(q, sf, pdf)


def t_ppf(q, df):
    """The quantile: the t with P(T <= t) = q, for q in [0, 1] (0 and 1 give -inf and inf)."""
    arr = np.asarray(q, dtype=float)
    if np.any((arr < 0) | (arr > 1)):
        raise ArgumentError(f"q must be probabilities in [0, 1], got {q!r}; pass e.g. 0.975 for a 95% interval")
    return _elementwise(_ppf1, q, df)


# ---------------------------------------------------------------- intervals and tests

def _as_sample(name: str, values: Any) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if a.ndim != 1 or a.size == 0:
        raise ArgumentError(f"{name} must be a non-empty 1-D sequence of numbers (one per seed), got shape "
                            f"{a.shape}")
    if np.isinf(a).any():
        raise ArgumentError(f"{name} holds an infinite value at index {int(np.argwhere(np.isinf(a))[0, 0])}; "
                            "a metric must be finite")
    return a


def _refuse_nan(name: str, a: np.ndarray) -> None:
    bad = np.isnan(a)
    if bad.any():
        raise ArgumentError(f"{name} holds {int(bad.sum())} NaN value(s) (first at index "
                            f"{int(np.argwhere(bad)[0, 0])}); pass nan='drop' to drop those pairs, or fix the run")


def _check_confidence(confidence: Any) -> float:
    return validate_number("confidence", confidence, minimum=0, maximum=1, open_low=True, open_high=True,
                        hint="pass e.g. 0.95")


def bootstrap_ci(diffs, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0,
                 method: str = "percentile") -> tuple[float, float]:
    """Bootstrap interval of ``mean(diffs)`` from ``n_boot`` resamples with replacement (numpy's
    ``default_rng(seed)``, so the interval is reproducible). One value: (nan, nan).

    * ``method="percentile"``: the ``(1-c)/2`` and ``(1+c)/2`` quantiles of the resampled means
      (Efron & Tibshirani 1993, section 13.3).
    * ``method="bca"``: bias-corrected and accelerated (Efron & Tibshirani 1993, section 14.3): the quantiles
      at ``Phi(z0 + (z0 + z_a) / (1 - acc (z0 + z_a)))`` for ``z_a = Phi^-1((1-c)/2)`` and ``Phi^-1((1+c)/2)``,
      with ``z0 = Phi^-1(share of resampled means below the mean, ties counted half)`` and the acceleration
      ``acc = sum(u^3) / (6 (sum(u^2))^1.5)`` from the jackknife means, ``u_i = mean(jackknife) - mean(d without
      i)``. The share is kept within ``[1/(2B), 1 - 1/(2B)]`` so that ``z0`` stays finite.
    """
    d = _as_sample("diffs", diffs)
    _refuse_nan("diffs", d)
    confidence = _check_confidence(confidence)
    n_boot = validate_int("n_boot", n_boot, minimum=10, hint="pass e.g. 10000 resamples")
    seed = validate_int("seed", seed, minimum=0)
    method = validate_choice("method", method, ("percentile", "bca"))
    n = d.size
    if n == 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)  # bound the index array's memory
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    levels = [alpha, 1.0 - alpha]
    if method == "bca":
        centre = float(d.mean())
        share = (np.sum(means < centre) + 0.5 * np.sum(means == centre)) / n_boot
        share = min(max(share, 0.5 / n_boot), 1.0 - 0.5 / n_boot)
        z0 = _norm_ppf(float(share))
        jack = (d.sum() - d) / (n - 1)
        u = jack.mean() - jack
        denom = 6.0 * float(np.sum(u * u)) ** 1.5
        acc = float(np.sum(u ** 3)) / denom if denom > 0 else 0.0
        levels = []
        for q in (alpha, 1.0 - alpha):
            z = z0 + _norm_ppf(q)
            levels.append(_norm_cdf(z0 + z / (1.0 - acc * z)))
    lo, hi = np.quantile(means, levels)
    return float(lo), float(hi)


def _check_min_seeds(min_seeds: Any) -> int:
    return validate_int("min_seeds", min_seeds, minimum=2, hint=f"pass {MIN_SEEDS} (the default) or more")


def mean_ci(values, confidence: float = 0.95, *, min_seeds: int = MIN_SEEDS) -> dict:
    """The t interval of a plain mean: ``mean -/+ t_{(1+c)/2, n-1} sd / sqrt(n)``.

    Returns ``n``, ``mean``, ``sd`` (ddof=1), ``lo``, ``hi``, ``status`` ("" or why there is no interval) and
    ``note`` ("" when there is nothing to say). Fewer than ``min_seeds`` values give ``lo``, ``hi`` = nan
    (status "too few seeds"); identical values give ``sd`` = 0 and no interval (status "zero variance"). NaN refused.
    """
    a = _as_sample("values", values)
    _refuse_nan("values", a)
    confidence = _check_confidence(confidence)
    min_seeds = _check_min_seeds(min_seeds)
    n, mean = a.size, float(a.mean())
    out = dict(n=n, mean=mean, sd=math.nan, lo=math.nan, hi=math.nan, status="", note="")
    if n > 1:
        out["sd"] = float(a.std(ddof=1))
    if n < min_seeds:
        return dict(out, status=TOO_FEW, note=f"{_seeds(n)}: no interval (at least {min_seeds} needed)")
    if np.ptp(a) <= 8 * np.finfo(float).eps * float(np.abs(a).max()):  # equal up to rounding
        return dict(out, sd=0.0, status=ZERO_VARIANCE, note="all values equal (sd = 0): no interval")
    half = _ppf1((1.0 + confidence) / 2.0, n - 1.0) * out["sd"] / math.sqrt(n)
    return dict(out, lo=mean - half, hi=mean + half)


def _seeds(n: int) -> str:
    return "one seed" if n == 1 else f"{n} seeds"


def paired_difference(variant, baseline, *, confidence: float = 0.95, method: str = "t", n_boot: int = 10000,
                      seed: int = 0, nan: str = "raise", min_seeds: int = MIN_SEEDS) -> dict:
    """Compare a variant with the baseline on the same seeds: ``variant[i]`` and ``baseline[i]`` share seed i.

    Higher is taken to be better: a seed where the variant is above the baseline is a win. For a metric
    where lower is better (a loss, an error rate) pass both negated, ``paired_difference(-v, -b)``: the
    differences, the interval and the wins then read "improvement".

    Returns a dict:

    * ``n`` (pairs used), ``mean_variant``, ``mean_baseline``, ``diff`` (mean of variant - baseline),
      ``sd`` (of the differences, ddof=1), ``se`` (= sd / sqrt(n)), ``df`` (= n - 1);
    * ``lo``, ``hi``: the ``confidence`` interval of the mean difference, the t interval
      (``method="t"``), or the percentile bootstrap over the pairs (``method="bootstrap"``) or its BCa
      correction (``method="bca"``), ``n_boot`` resamples from ``seed`` (see :func:`bootstrap_ci`);
    * ``t``, ``p``: the paired t statistic and its two-sided p-value. With ``method="bootstrap"`` or
      ``"bca"`` these are still the t-test's (the bootstrap gives the interval only);
    * ``wins``, ``ties``, ``losses``: seeds with variant >, ==, < baseline;
    * ``method``, ``confidence``, ``dropped`` (pairs dropped for NaN) and ``note`` ("" when nothing to say).

    * ``status``: "" when the interval and the test were computed; else why not (``lo``, ``hi``, ``t``, ``p``
      are then nan): "too few seeds" (fewer than ``min_seeds`` pairs, default 3) or "zero variance" (every
      difference equal, up to the rounding of ``v - b``: the noise cannot be estimated, and a t-test would
      report p = 0 for any non-zero difference).
    NaN in either input is refused (:class:`~labkit._validate.ArgumentError` naming the argument) unless
    ``nan="drop"``, which drops every pair holding a NaN and counts them in ``dropped``.
    """
    v = _as_sample("variant", variant)
    b = _as_sample("baseline", baseline)
    if v.size != b.size:
        raise ArgumentError(f"variant and baseline must be paired (one value per seed, same seeds), got "
                            f"len(variant)={v.size} and len(baseline)={b.size}")
    nan = validate_choice("nan", nan, ("raise", "drop"))
    method = validate_choice("method", method, ("t", "bootstrap", "bca"))
    confidence = _check_confidence(confidence)
    n_boot = validate_int("n_boot", n_boot, minimum=10, hint="pass e.g. 10000 resamples")
    seed = validate_int("seed", seed, minimum=0)
    min_seeds = _check_min_seeds(min_seeds)
    dropped = 0
    if nan == "raise":
        _refuse_nan("variant", v)
        _refuse_nan("baseline", b)
    else:
        keep = ~(np.isnan(v) | np.isnan(b))
        dropped = int((~keep).sum())
        v, b = v[keep], b[keep]
        if v.size == 0:
            raise ArgumentError(f"every one of the {dropped} pairs holds a NaN (nan='drop' left none); "
                                "there is nothing to compare")
    d = v - b
    n = d.size
    out = dict(n=n, mean_variant=float(v.mean()), mean_baseline=float(b.mean()), diff=float(d.mean()),
               sd=math.nan, se=math.nan, df=n - 1, lo=math.nan, hi=math.nan, t=math.nan, p=math.nan,
               wins=int((d > 0).sum()), ties=int((d == 0).sum()), losses=int((d < 0).sum()),
               method=method, confidence=confidence, dropped=dropped, status="", note="")
    notes = [f"{dropped} pair(s) with NaN dropped"] if dropped else []
    if n > 1:
        out.update(sd=float(d.std(ddof=1)), se=float(d.std(ddof=1)) / math.sqrt(n))
    if n < min_seeds:
        out.update(status=TOO_FEW, note="; ".join(notes + [f"{_seeds(n)}: no interval or p-value (at least "
                                                           f"{min_seeds} paired seeds needed)"]))
        return out
    scale = max(float(np.abs(v).max()), float(np.abs(b).max()))
    if np.ptp(d) <= 8 * np.finfo(float).eps * scale:  # equal up to the rounding of v - b
        out.update(sd=0.0, se=0.0, status=ZERO_VARIANCE,
                   note="; ".join(notes + ["all differences equal (sd = 0): no interval or p-value"]))
        return out
    out["note"] = "; ".join(notes)
    diff = out["diff"]
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t = diff / se
    p = min(1.0, 2.0 * _sf1(abs(t), n - 1.0))
    if method == "t":
        half = _ppf1((1.0 + confidence) / 2.0, n - 1.0) * se
        lo, hi = diff - half, diff + half
    else:
        lo, hi = bootstrap_ci(d, confidence, n_boot, seed, "percentile" if method == "bootstrap" else "bca")
    out.update(sd=sd, se=se, t=t, p=p, lo=lo, hi=hi)
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    With the m non-NaN p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted value of the i-th is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``: step-down, never below the raw p, monotone in the raw p and
    capped at 1. Tied p-values get the same adjusted value. A NaN (a comparison with no p-value, e.g. one
    seed) stays NaN and is not counted in m. Values outside [0, 1] are refused.
    """
    try:
        p = np.asarray(pvalues, dtype=float)
    except (TypeError, ValueError):
        raise ArgumentError(f"pvalues must be a sequence of numbers in [0, 1], got {pvalues!r}") from None
    if p.ndim != 1:
        raise ArgumentError(f"pvalues must be a 1-D sequence, got shape {p.shape}")
    ok = ~np.isnan(p)
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        bad = p[ok][(p[ok] < 0) | (p[ok] > 1)][0]
        raise ArgumentError(f"pvalues must lie in [0, 1] (or be NaN), got {bad!r}")
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(ok)
    m = idx.size
    if m:
        order = idx[np.argsort(p[idx], kind="stable")]
        stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
        out[order] = np.maximum.accumulate(stepped)
    return [float(x) for x in out]
