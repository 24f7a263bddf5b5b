"""labkit.ablation.stats (and plots): the t distribution, paired differences, intervals and Holm, on known numbers."""
import ast
import math
from pathlib import Path

import numpy as np
import pytest

from labkit._validate import ArgumentError
from labkit.ablation import stats
from labkit.ablation.stats import bootstrap_ci, holm, mean_ci, paired_difference, t_cdf, t_pdf, t_ppf, t_sf

DFS = list(range(1, 61))
TS = [-40.0, -6.0, -2.5, -1.0, -0.2, 0.0, 0.05, 0.7, 1.5, 2.0, 3.0, 8.0, 100.0]
QS = [1e-10, 1e-4, 0.005, 0.025, 0.1, 0.3, 0.5, 0.6, 0.9, 0.975, 0.995, 0.9999, 1 - 1e-9]


def test_stats_imports_no_scipy():
    tree = ast.parse(Path(stats.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "scipy" not in names and names <= {"__future__", "math", "numpy", "labkit", "collections", "typing"}


# ---------------------------------------------------------------- the t distribution

def test_t_cdf_closed_forms_df1_df2_including_tiny_t():
    # df=1 is Cauchy: 1/2 + atan(t)/pi; df=2: 1/2 + t / (2 sqrt(2 + t^2)) (both exact, to compare near t=0 too)
    for t in [-1e6, -30.0, -1.0, -1e-8, 0.0, 1e-8, 0.3, 1.0, 7.0, 1e6]:
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-12, abs=1e-15)
    # the far tail keeps its relative accuracy: P(T > 1e6) for Cauchy = atan(1e-6)/pi
    assert t_sf(1e6, 1) == pytest.approx(math.atan(1e-6) / math.pi, rel=1e-10)


def test_t_cdf_sf_pdf_against_scipy_on_a_grid():
    sst = pytest.importorskip("scipy.stats")
    for df in DFS + [0.5, 1.5, 3.7, 200.0, 5000.0]:
        ours = t_cdf(np.array(TS), df)
        ref = sst.t.cdf(TS, df)
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(t_sf(np.array(TS), df), sst.t.sf(TS, df), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(t_pdf(np.array(TS), df), sst.t.pdf(TS, df), rtol=1e-10, atol=1e-300)


def test_t_ppf_against_scipy_and_inverts_cdf():
    sst = pytest.importorskip("scipy.stats")
    for df in DFS + [0.5, 2.5, 1000.0]:
        ours = t_ppf(np.array(QS), df)
        np.testing.assert_allclose(ours, sst.t.ppf(QS, df), rtol=1e-10)
        for q, t in zip(QS, ours):
            assert (t_cdf(t, df) if q < 0.5 else 1 - t_sf(t, df)) == pytest.approx(q, rel=1e-9)
    # the textbook table: t_{0.975, 1} = 12.706, t_{0.975, 10} = 2.228, t_{0.995, 30} = 2.750
    assert t_ppf(0.975, 1) == pytest.approx(12.7062047, rel=1e-7)
    assert t_ppf(0.975, 10) == pytest.approx(2.2281389, rel=1e-7)
    assert t_ppf(0.995, 30) == pytest.approx(2.7499957, rel=1e-7)
    # the normal quantile BCa uses, by the same solver
    np.testing.assert_allclose([stats._norm_ppf(q) for q in QS], sst.norm.ppf(QS), rtol=1e-12, atol=1e-15)


def test_t_edges_and_bad_input():
    assert t_ppf(0.5, 3) == 0.0 and t_ppf(0.0, 3) == -math.inf and t_ppf(1.0, 3) == math.inf
    assert t_cdf(math.inf, 4) == 1.0 and t_cdf(-math.inf, 4) == 0.0 and math.isnan(t_cdf(math.nan, 4))
    assert t_ppf(0.975, 5) == pytest.approx(-t_ppf(0.025, 5), rel=1e-14)  # 1 - 0.975 != 0.025 exactly
    assert isinstance(t_cdf(1.0, 3), float) and t_cdf(np.zeros((2, 3)), 3).shape == (2, 3)
    with pytest.raises(ArgumentError, match="df"):
        t_cdf(1.0, 0)
    with pytest.raises(ArgumentError, match="df"):
        t_ppf(0.9, -2)
    with pytest.raises(ArgumentError, match="q must"):
        t_ppf(1.5, 3)


# ---------------------------------------------------------------- paired differences

def _pairs(rng, n, shift=0.01):
    b = rng.normal(0.8, 0.05, n)
    return b + rng.normal(shift, 0.02, n), b


def test_paired_t_matches_scipy_ttest_rel_and_its_interval():
    sst = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in [2, 3, 5, 8, 20, 50]:
        for conf in (0.95, 0.9, 0.99):
            v, b = _pairs(rng, n)
            r = paired_difference(v, b, confidence=conf, min_seeds=2)  # 2: the arithmetic on one degree of freedom
            ref = sst.ttest_rel(v, b)
            ci = ref.confidence_interval(conf)
            assert r["t"] == pytest.approx(ref.statistic, rel=1e-12)
            assert r["p"] == pytest.approx(ref.pvalue, rel=1e-9)
            assert r["lo"] == pytest.approx(ci.low, rel=1e-10) and r["hi"] == pytest.approx(ci.high, rel=1e-10)
            d = v - b
            assert r["diff"] == pytest.approx(d.mean()) and r["sd"] == pytest.approx(d.std(ddof=1))
            assert r["n"] == n and r["df"] == n - 1 and r["note"] == ""
            assert r["mean_variant"] == pytest.approx(v.mean()) and r["mean_baseline"] == pytest.approx(b.mean())


def test_paired_on_known_numbers():
    # d = [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3), interval 2 -/+ 4.302653 / sqrt(3)
    r = paired_difference([2, 4, 6], [1, 2, 3])
    assert r["diff"] == 2 and r["sd"] == pytest.approx(1.0) and r["t"] == pytest.approx(2 * math.sqrt(3))
    assert r["hi"] - r["diff"] == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-10)
    assert r["p"] == pytest.approx(0.07417990022744862, rel=1e-9)  # 2 P(T_2 > 2 sqrt 3) = 1 - 2 sqrt3/ sqrt(14)
    assert r["p"] == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=1e-12)


def test_wins_ties_losses_and_sign_flip_for_lower_is_better():
    v, b = [0.9, 0.8, 0.7, 0.5], [0.8, 0.8, 0.75, 0.4]
    r = paired_difference(v, b)
    assert (r["wins"], r["ties"], r["losses"]) == (2, 1, 1)
    flipped = paired_difference(-np.array(v), -np.array(b))  # a loss: lower is better
    assert (flipped["wins"], flipped["losses"]) == (1, 2) and flipped["diff"] == pytest.approx(-r["diff"])
    assert flipped["p"] == pytest.approx(r["p"]) and flipped["lo"] == pytest.approx(-r["hi"])


def test_one_seed_gives_no_interval():
    r = paired_difference([0.9], [0.8])
    assert r["n"] == 1 and r["diff"] == pytest.approx(0.1) and r["wins"] == 1
    assert all(math.isnan(r[k]) for k in ("lo", "hi", "p", "t", "sd"))
    assert "one seed: no interval" in r["note"]
    rb = paired_difference([0.9], [0.8], method="bootstrap")
    assert math.isnan(rb["lo"]) and "one seed" in rb["note"]
    m = mean_ci([0.5])
    assert m["mean"] == 0.5 and math.isnan(m["lo"]) and "one seed" in m["note"]


@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_identical_differences_give_no_interval_and_no_p(method):
    # 0.3 - 0.2 and 0.6 - 0.5 differ in the last bit: still "equal" (rounding). A t-test would say p = 0 here.
    r = paired_difference([0.3, 0.6, 0.9], [0.2, 0.5, 0.8], method=method)
    assert r["sd"] == 0 and r["diff"] == pytest.approx(0.1) and r["status"] == "zero variance"
    assert all(math.isnan(r[k]) for k in ("lo", "hi", "t", "p")) and "sd = 0" in r["note"]
    z = paired_difference([0.3, 0.6, 0.1], [0.3, 0.6, 0.1], method=method)
    assert math.isnan(z["p"]) and math.isnan(z["lo"]) and z["ties"] == 3 and z["status"] == "zero variance"
    m = mean_ci([0.7, 0.7, 0.7])
    assert m["mean"] == pytest.approx(0.7) and m["sd"] == 0 and math.isnan(m["lo"]) and m["status"] == "zero variance"


@pytest.mark.parametrize("method", ["t", "bootstrap", "bca"])
def test_fewer_than_three_seeds_give_no_interval_and_no_p(method):
    # two seeds: the t interval would stand on one degree of freedom, and two equal differences would read p = 0
    for v, b in (([0.5, 0.7], [0.45, 0.5]), ([0.9, 0.8], [0.8, 0.7])):
        r = paired_difference(v, b, method=method)
        assert r["n"] == 2 and r["status"] == "too few seeds" and "at least 3" in r["note"]
        assert all(math.isnan(r[k]) for k in ("lo", "hi", "t", "p"))
        assert r["diff"] == pytest.approx(np.mean(np.subtract(v, b))) and r["wins"] == 2
    assert paired_difference([0.5, 0.7, 0.6], [0.45, 0.5, 0.58], method=method)["status"] == ""
    four = paired_difference([0.5, 0.7, 0.6, 0.2], [0.45, 0.5, 0.58, 0.1], min_seeds=5)
    assert four["status"] == "too few seeds" and math.isnan(four["p"]) and "at least 5" in four["note"]
    assert mean_ci([0.5, 0.6])["status"] == "too few seeds" and math.isnan(mean_ci([0.5, 0.6])["lo"])
    with pytest.raises(ArgumentError, match="min_seeds"):
        paired_difference([1, 2, 3], [1, 3, 2], min_seeds=1)


def test_nan_refused_naming_the_argument_or_dropped_on_request():
    with pytest.raises(ArgumentError, match=r"baseline holds 1 NaN.*index 1.*nan='drop'"):
        paired_difference([1.0, 2.0, 3.0], [1.0, math.nan, 2.0])
    with pytest.raises(ArgumentError, match="variant holds 2 NaN"):
        paired_difference([math.nan, 2.0, math.nan], [1.0, 1.0, 2.0])
    r = paired_difference([1.0, 2.0, math.nan, 4.0], [0.5, math.nan, 2.0, 3.0], nan="drop")
    assert r["n"] == 2 and r["dropped"] == 2 and "dropped" in r["note"]
    assert r["diff"] == pytest.approx(0.75)
    with pytest.raises(ArgumentError, match="nothing to compare"):
        paired_difference([math.nan], [1.0], nan="drop")
    with pytest.raises(ArgumentError, match="nan must be one of"):
        paired_difference([1.0], [1.0], nan="ignore")


def test_bad_input_is_named():
    with pytest.raises(ArgumentError, match=r"len\(variant\)=3 and len\(baseline\)=2"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ArgumentError, match="method must be one of"):
        paired_difference([1, 2], [1, 3], method="BCa")
    with pytest.raises(ArgumentError, match="confidence"):
        paired_difference([1, 2], [1, 3], confidence=95)
    with pytest.raises(ArgumentError, match="variant must be a non-empty"):
        paired_difference([], [])
    with pytest.raises(ArgumentError, match="baseline holds an infinite"):
        paired_difference([1, 2], [1, math.inf])
    with pytest.raises(ArgumentError, match="variant must be a sequence"):
        paired_difference(["a", "b"], [1, 2])
    with pytest.raises(ArgumentError, match="n_boot"):
        paired_difference([1, 2], [1, 3], method="bootstrap", n_boot=0)


def test_bootstrap_interval_is_deterministic_contains_the_centre_and_nears_the_t_interval():
    rng = np.random.default_rng(3)
    v, b = _pairs(rng, 40)
    rt = paired_difference(v, b)
    rb = paired_difference(v, b, method="bootstrap", n_boot=4000, seed=7)
    assert rb == paired_difference(v, b, method="bootstrap", n_boot=4000, seed=7)
    assert rb["lo"] != paired_difference(v, b, method="bootstrap", n_boot=4000, seed=8)["lo"]
    assert rb["lo"] < rt["diff"] < rb["hi"]
    assert rb["p"] == rt["p"] and rb["t"] == rt["t"] and rb["method"] == "bootstrap"
    # on normal data the percentile interval is a little narrower (it ignores the t vs normal factor and the
    # n/(n-1) of the variance) but close: within 15% on each side for n = 40
    width = rt["hi"] - rt["lo"]
    assert abs(rb["lo"] - rt["lo"]) < 0.15 * width and abs(rb["hi"] - rt["hi"]) < 0.15 * width
    lo, hi = bootstrap_ci(v - b, 0.95, 4000, 7)
    assert (lo, hi) == (rb["lo"], rb["hi"])


def test_bootstrap_ci_against_a_direct_resampling():
    d = np.array([0.1, -0.2, 0.4, 0.3, 0.05])
    rng = np.random.default_rng(11)
    means = d[rng.integers(0, 5, size=(500, 5))].mean(axis=1)
    assert bootstrap_ci(d, 0.9, 500, 11) == pytest.approx(tuple(np.quantile(means, [0.05, 0.95])))


def test_bca_matches_scipy_bootstrap_where_the_percentile_interval_does_not():
    sst = pytest.importorskip("scipy.stats")
    d = np.random.default_rng(4).exponential(0.02, 15) - 0.01  # skewed: BCa moves the interval to the right
    ref = sst.bootstrap((d,), np.mean, n_resamples=20000, method="BCa", rng=np.random.default_rng(2))
    ref = (ref.confidence_interval.low, ref.confidence_interval.high)
    width = ref[1] - ref[0]
    bca = bootstrap_ci(d, 0.95, 20000, 1, method="bca")
    perc = bootstrap_ci(d, 0.95, 20000, 1)
    assert abs(bca[0] - ref[0]) < 0.05 * width and abs(bca[1] - ref[1]) < 0.05 * width  # Monte Carlo noise ~2%
    assert abs(perc[1] - ref[1]) > 0.08 * width  # ~13%: the test tells the two apart
    r = paired_difference(d + 1.0, np.ones(15), method="bca", n_boot=20000, seed=1)
    assert (r["lo"], r["hi"]) == pytest.approx(bca) and r["method"] == "bca"
    assert r["p"] == pytest.approx(sst.ttest_1samp(d, 0).pvalue, rel=1e-6)
    small = paired_difference([0.5, 0.7], [0.45, 0.5], method="bca", n_boot=200, min_seeds=2)  # n = 2: no crash
    assert small["lo"] <= small["hi"] and math.isfinite(small["lo"])
    with pytest.raises(ArgumentError, match="method must be one of 'percentile', 'bca'"):
        bootstrap_ci(d, method="basic")


def test_mean_ci_against_scipy():
    sst = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(5).normal(0.7, 0.1, 9)
    m = mean_ci(x, 0.9)
    lo, hi = sst.t.interval(0.9, 8, loc=x.mean(), scale=sst.sem(x))
    assert m["lo"] == pytest.approx(lo, rel=1e-10) and m["hi"] == pytest.approx(hi, rel=1e-10)
    assert m["n"] == 9 and m["sd"] == pytest.approx(x.std(ddof=1)) and m["note"] == ""


@pytest.mark.parametrize("n", [3, 8])
def test_t_interval_coverage_on_simulated_paired_data(n):
    # 2000 small paired samples with a true difference of 0.02: the 95% interval should cover it ~95% of
    # the time (binomial sd ~0.5%); a z interval (1.96) would cover only ~86% (n=3) -- the t quantile matters
    rng = np.random.default_rng(2024 + n)
    hits = 0
    for _ in range(2000):
        b = rng.normal(0.8, 0.05, n)
        v = b + 0.02 + rng.normal(0, 0.03, n)
        r = paired_difference(v, b)
        hits += r["lo"] <= 0.02 <= r["hi"]
    assert 0.93 <= hits / 2000 <= 0.97


# ---------------------------------------------------------------- Holm

def test_holm_hand_computed_and_order_restored():
    # sorted 0.005, 0.01, 0.03, 0.04 (m=4): 4*0.005=0.02, 3*0.01=0.03, 2*0.03=0.06, max(1*0.04, 0.06)=0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2, 0.5, 0.9]) == pytest.approx([0.6, 1.0, 1.0])  # capped at 1, monotone
    assert holm([0.04]) == [0.04] and holm([]) == []


def test_holm_ties_nan_and_bad_values():
    out = holm([0.02, 0.01, 0.02, 0.01])  # 4*0.01=0.04, max(3*0.01, .04)=0.04, 2*0.02=0.04, 0.04
    assert out == pytest.approx([0.04, 0.04, 0.04, 0.04])
    out = holm([0.01, math.nan, 0.02])  # m = 2: 0.02, 0.02
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert all(math.isnan(x) for x in holm([math.nan, math.nan]))
    with pytest.raises(ArgumentError, match=r"\[0, 1\]"):
        holm([0.1, 1.2])


def test_holm_properties_on_random_pvalues():
    rng = np.random.default_rng(9)
    for m in (1, 2, 5, 13):
        p = rng.uniform(0, 0.3, m)
        adj = np.array(holm(p))
        assert np.all(adj >= p) and np.all(adj <= 1)
        order = np.argsort(p)
        assert np.all(np.diff(adj[order]) >= 0)  # monotone in the raw p
        assert adj[order[0]] == pytest.approx(min(1.0, m * p[order[0]]))  # the smallest gets Bonferroni
        assert np.all(adj <= np.minimum(1, m * p) + 1e-15)  # never worse than Bonferroni


# ---------------------------------------------------------------- plots (smoke level, Agg)

@pytest.fixture
def plt():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def test_differences_chart_bars_colours_and_error_bars(plt):
    from matplotlib.colors import to_hex

    from labkit.ablation import plots

    rng = np.random.default_rng(1)
    b = rng.normal(0.8, 0.02, 5)
    rows = [dict(paired_difference(b + 0.05 + rng.normal(0, 0.005, 5), b), label="mixup"),
            dict(paired_difference(b - 0.04 + rng.normal(0, 0.005, 5), b), label="no augmentation"),
            dict(paired_difference(b + rng.normal(0, 0.02, 5), b), label="label smoothing"),
            dict(paired_difference([0.9], [0.8]), label="one seed")]
    ax = plots.differences(rows, title="t")
    bars = ax.patches
    assert len(bars) == 4
    assert [round(p.get_width(), 12) for p in bars] == [round(r["diff"], 12) for r in rows]
    colours = [to_hex(p.get_facecolor()) for p in bars]
    assert colours[0] == plots.interval_colour(rows[0]) == plots._ABOVE
    assert colours[1] == plots._BELOW
    assert colours[3] == plots._NOISE  # no interval
    assert rows[2]["lo"] < 0 < rows[2]["hi"] and colours[2] == plots._NOISE  # seed 1: the interval holds 0
    assert [t.get_text() for t in ax.get_yticklabels()] == [r["label"] for r in rows]
    segments = [c for c in ax.collections if hasattr(c, "get_segments")]
    assert sum(len(c.get_segments()) for c in segments) == 3  # error bars for the three rows with an interval
    assert any(np.allclose(line.get_xdata(), 0) for line in ax.lines)  # the zero line
    assert [t.get_text() for t in ax.texts] == ["won 5/5", "won 0/5", "won 2/5", "won 1/1, no interval"]
    assert ax.get_title() == "t"


def test_learning_curves_one_line_and_band_per_label(plt):
    from labkit.ablation import plots

    def seed(shift, steps=(0, 10, 20)):
        return [{"step": s, "test_accuracy": 0.5 + s / 100 + shift, "loss": 1.0} for s in steps]

    data = {"baseline": [seed(0.0), seed(0.02), seed(-0.02)], "mixup": [seed(0.01), seed(0.03, (0, 10, 20, 30))],
            "empty": [[{"step": 0, "loss": 1.0}]]}
    _, ax = plt.subplots()
    assert plots.curves(data, ax=ax) is ax
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # "empty" has no test_accuracy: skipped
    base = ax.lines[0]
    np.testing.assert_allclose(base.get_xdata(), [0, 10, 20])
    np.testing.assert_allclose(base.get_ydata(), [0.5, 0.6, 0.7])  # mean over the three seeds
    mix = ax.lines[1]
    np.testing.assert_allclose(mix.get_xdata(), [0, 10, 20, 30])
    np.testing.assert_allclose(mix.get_ydata(), [0.52, 0.62, 0.72, 0.83])  # step 30: only one seed
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(0.48) and band[:, 1].max() == pytest.approx(0.72)
    ax2 = plots.curves(data, metric="loss")
    assert len(ax2.lines) == 3 and ax2.get_ylabel() == "loss"


def test_differences_chart_takes_the_tables_verdict_with_a_legend(plt):
    # a raw interval that excludes 0 but a Holm verdict of "no evidence" must be drawn grey, like the table says
    from matplotlib.colors import to_hex

    from labkit.ablation import plots

    rows = [dict(paired_difference([0.86, 0.87, 0.88, 0.85, 0.87], [0.84, 0.85, 0.855, 0.84, 0.845]), label="a"),
            dict(paired_difference([0.70, 0.71, 0.69, 0.70, 0.72], [0.84, 0.85, 0.855, 0.84, 0.845]), label="b"),
            dict(paired_difference([0.9, 0.8], [0.8, 0.7]), label="two seeds")]
    assert rows[0]["lo"] > 0 and rows[1]["hi"] < 0
    for r, v in zip(rows, ("no evidence", "hurts", "too few seeds")):
        r["verdict"] = v
    ax = plots.differences(rows)
    colours = [to_hex(p.get_facecolor()) for p in ax.patches[:3]]
    assert colours == [plots.VERDICT_COLOURS["no evidence"], plots.VERDICT_COLOURS["hurts"],
                       plots.VERDICT_COLOURS["too few seeds"]]
    assert colours[0] != plots.interval_colour(rows[0])  # the raw interval alone would have said green
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["hurts (Holm-adjusted p < 0.05)",
                                                          "no evidence after Holm's adjustment",
                                                          "too few seeds: no test"]
    assert [t.get_text() for t in ax.texts][2] == "won 2/2, no interval"
    with pytest.raises(ValueError, match="verdict 'maybe'"):
        plots.differences([dict(rows[0], verdict="maybe")])
