"""Lab 07: generative EM, confidence and calibration, self-training, consistency training, checks, bench."""
import numpy as np
import pytest
from scipy.stats import multivariate_normal

import labkit
from labkit import semisup
from labkit.pseudo_label import (
    GaussianEM,
    SelfTraining,
    bench,
    cross_fitted_temperature,
    e_step,
    expected_calibration_error,
    fit_temperature,
    lab,
    log_joint,
    methods,
    odds_to_posterior_threshold,
    posterior_odds,
    posterior_to_odds_threshold,
    reliability_diagram,
    softmax,
    strong_augment,
    train_cnn,
    weak_augment,
)


@pytest.fixture(scope="module")
def sp5():
    return semisup.split(5, 0)


# --------------------------------------------------------------------------- the generative model and EM
@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_em_log_likelihood_never_decreases(sp5, cov, lam):
    m = GaussianEM(n_components=15, covariance_type=cov, shrinkage=3.0, lam=lam, max_iter=40, tol=0).fit(
        sp5.X_train, sp5.y_semi)
    ll = np.array(m.log_likelihood_)
    assert len(ll) == m.n_iter_ + 1 and m.n_iter_ >= 5
    assert np.all(np.diff(ll) >= -1e-10 * np.abs(ll[1:])), np.diff(ll).min()


def test_em_with_two_components_per_class_is_monotone(sp5):
    m = GaussianEM(n_components=10, covariance_type="full", shrinkage=3.0, components_per_class=2, tol=0,
                   max_iter=25).fit(sp5.X_train, sp5.y_semi)
    assert len(m.means_) == 20 and list(m.component_class_[:4]) == [0, 0, 1, 1]
    assert np.all(np.diff(m.log_likelihood_) >= -1e-10 * abs(m.log_likelihood_[-1]))
    p = m.predict_proba(sp5.X_test)
    assert p.shape == (len(sp5.X_test), 10) and m.score(sp5.X_test, sp5.y_test) > 0.85
    sup = GaussianEM(n_components=10, covariance_type="tied", shrinkage=1.0, components_per_class=2,
                     lam=0.0).fit(sp5.X_train, sp5.y_semi)
    assert sup.n_iter_ > 0  # EM over the sub-components of the labelled points alone


def test_em_monotone_without_shrinkage_on_blobs():
    X, y = labkit.data.blobs(n=300, centers=3, seed=1, n_features=4)
    ys = labkit.data.semi_supervised_targets(y, 3, 0)
    for cov in ("tied", "diag", "spherical"):
        m = GaussianEM(n_components=None, covariance_type=cov, shrinkage=0.0, tol=0, max_iter=30).fit(X, ys)
        assert np.all(np.diff(m.log_likelihood_) >= -1e-9 * np.abs(m.log_likelihood_[-1]))


def test_lam_zero_is_the_supervised_fit(sp5):
    m = GaussianEM(n_components=10, covariance_type="full", shrinkage=2.0, lam=0.0).fit(sp5.X_train, sp5.y_semi)
    assert m.n_iter_ == 0 and len(m.log_likelihood_) == 1
    Z = m._project(sp5.X_train)
    lab_ = sp5.y_semi >= 0
    for c in m.classes_:
        np.testing.assert_allclose(m.means_[c], Z[sp5.y_semi == c].mean(axis=0), atol=1e-10)
    np.testing.assert_allclose(m.priors_, np.bincount(sp5.y_semi[lab_]) / lab_.sum())
    # shrinkage: (scatter + tau s2 I) / (N_c + tau)
    c = 3
    D = Z[sp5.y_semi == c] - m.means_[c]
    want = (D.T @ D + 2.0 * m._s2 * np.eye(10)) / (len(D) + 2.0)
    np.testing.assert_allclose(m.covariances_[c], want, atol=1e-10)


def test_log_joint_and_e_step_against_scipy():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(40, 3))
    means = rng.normal(size=(4, 3))
    A = rng.normal(size=(4, 3, 3))
    covs = A @ A.transpose(0, 2, 1) + np.eye(3)
    pri = np.array([0.1, 0.2, 0.3, 0.4])
    want = np.stack([np.log(pri[c]) + multivariate_normal(means[c], covs[c]).logpdf(Z) for c in range(4)], 1)
    np.testing.assert_allclose(log_joint(Z, means, covs, pri, "full"), want, rtol=1e-10)
    np.testing.assert_allclose(log_joint(Z, means, covs[0], pri, "tied"),
                               np.stack([np.log(pri[c]) + multivariate_normal(means[c], covs[0]).logpdf(Z)
                                         for c in range(4)], 1), rtol=1e-10)
    dg = np.abs(rng.normal(size=(4, 3))) + 0.5
    np.testing.assert_allclose(log_joint(Z, means, dg, pri, "diag"),
                               np.stack([np.log(pri[c]) + multivariate_normal(means[c], np.diag(dg[c])).logpdf(Z)
                                         for c in range(4)], 1), rtol=1e-10)
    R, lse = e_step(Z + 500.0, means, covs, pri, "full")  # far away: still finite, rows sum to 1
    assert np.all(np.isfinite(R)) and np.allclose(R.sum(1), 1)


def test_tied_without_shrinkage_matches_sklearn_lda():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    X, y = labkit.data.blobs(n=400, centers=4, seed=3, n_features=5, cluster_std=2.0)
    ours = GaussianEM(n_components=None, covariance_type="tied", shrinkage=0.0, lam=0.0).fit(X, y).predict(X)
    theirs = LinearDiscriminantAnalysis(solver="lsqr").fit(X, y).predict(X)
    assert (ours == theirs).mean() >= 0.995


def test_estimator_conventions(sp5):
    from sklearn.base import clone

    m = GaussianEM(n_components=10, covariance_type="tied", shrinkage=1.0)
    assert not hasattr(m, "means_")
    with pytest.raises(RuntimeError, match="not fitted"):
        m.predict(sp5.X_test)
    assert m.fit(sp5.X_train, sp5.y_semi) is m
    for a in ("classes_", "means_", "covariances_", "priors_", "log_likelihood_", "n_iter_", "transduction_"):
        assert hasattr(m, a)
    assert np.array_equal(m.transduction_[sp5.labelled], sp5.y_semi[sp5.labelled]) and (m.transduction_ >= 0).all()
    c = clone(m)
    assert c.get_params() == m.get_params() and not hasattr(c, "means_")
    p = m.predict_proba(sp5.X_test)
    assert p.shape == (len(sp5.X_test), 10) and np.allclose(p.sum(1), 1)
    st = SelfTraining(GaussianEM(n_components=10, covariance_type="tied", shrinkage=1.0, lam=0), threshold=0.99)
    assert st.fit(sp5.X_train, sp5.y_semi) is st and hasattr(st, "transduction_")


def test_em_helps_with_full_covariances_and_hurts_with_spherical():
    """Measured on 3 seeds at K = 5: EM beats its own supervised fit when the model fits (full covariances)
    and loses to it with one spherical Gaussian per class (Cozman and Cohen's misspecification effect)."""
    full = semisup.evaluate({"em": methods.generative(), "sup": methods.generative_supervised()}, ks=(5,),
                            seeds=range(3))
    sph = semisup.evaluate({"em": methods.generative(covariance_type="spherical"),
                            "sup": methods.generative_supervised(covariance_type="spherical")}, ks=(5,), seeds=range(3))
    assert full[0]["mean"] > full[1]["mean"] + 0.02
    assert sph[0]["mean"] < sph[1]["mean"] - 0.01


def test_shifted_labels():
    img = np.zeros((1, 64))
    img[0, 3 * 8 + 4] = 1.0  # row 3, column 4
    right = methods.shift_images(img, 0, 1).reshape(8, 8)
    down = methods.shift_images(img, 1, 0).reshape(8, 8)
    assert right[3, 5] == 1 and down[4, 4] == 1 and right.sum() == down.sum() == 1
    edge = np.zeros((1, 64))
    edge[0, 7] = 1.0  # row 0, last column: moved right it falls off
    assert methods.shift_images(edge, 0, 1).sum() == 0
    y = np.array([0, -1, 1, -1])
    Xa, ya = methods.with_shifted_labels(np.random.default_rng(0).random((4, 64)), y)
    assert Xa.shape == (4 + 2 * 4, 64) and list(ya[4:]) == [0, 1] * 4
    with pytest.raises(ValueError, match="square images"):
        methods.shift_images(np.zeros((2, 10)), 0, 1)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("X,y,match", [
    (np.array([[0.0, np.nan], [1, 1]]), [0, 1], "NaN or infinite"),
    (np.array([[0.0, np.inf], [1, 1]]), [0, 1], "NaN or infinite"),
    (np.zeros((3, 2)), [0, 1], "different lengths"),
    (np.zeros((3, 2)), [0, 1.5, -1], "integer class labels or -1"),
    (np.zeros((3, 2)), np.array(["a", -1, "b"], dtype=object), "-1 marks an unlabelled point only among integer"),
    (np.zeros((3, 2)), [0, -2, 1], "labels >= 0, or -1"),
    (np.zeros((3, 2)), [-1, -1, -1], "no labelled point"),
    (np.zeros(3), [0, 1, 0], "2-D array"),
])
def test_bad_data_is_refused(X, y, match):
    with pytest.raises(ValueError, match=match):
        GaussianEM(n_components=None, covariance_type="spherical").fit(X, y)
    with pytest.raises(ValueError, match=match):
        SelfTraining(GaussianEM(n_components=None)).fit(X, y)


@pytest.mark.parametrize("t", [0, -0.1, 1.5, float("nan")])
def test_threshold_outside_0_1_is_refused(sp5, t):
    with pytest.raises(ValueError, match=r"threshold must be .*\(0, 1\]"):
        SelfTraining(GaussianEM(n_components=5), threshold=t).fit(sp5.X_train, sp5.y_semi)
    with pytest.raises(ValueError, match=r"threshold must be .*\(0, 1\]"):
        train_cnn(sp5.X_train, sp5.y_semi, threshold=t, steps=1)


def test_bad_parameters_are_refused(sp5):
    with pytest.raises(ValueError, match=r"lam must be .*\[0, 1\]"):
        GaussianEM(lam=2).fit(sp5.X_train, sp5.y_semi)
    with pytest.raises(ValueError, match="covariance_type must be one of"):
        GaussianEM(covariance_type="banana").fit(sp5.X_train, sp5.y_semi)
    with pytest.raises(ValueError, match="n_components must be"):
        GaussianEM(n_components=500).fit(sp5.X_train, sp5.y_semi)
    with pytest.raises(ValueError, match="shrinkage must be > 0"):
        GaussianEM(covariance_type="full", shrinkage=0).fit(sp5.X_train, sp5.y_semi)
    with pytest.raises(ValueError, match=r"k_per_class=200 is larger than the smallest class .* pass k_per_class <="):
        semisup.split(200, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        train_cnn(sp5.X_train, sp5.y_semi, mode="mixup", steps=1)


# --------------------------------------------------------------------------- confidence and calibration
def test_odds_threshold_is_a_posterior_threshold():
    p = np.random.default_rng(0).dirichlet(np.ones(10) * 0.3, size=2000)
    for t in (0.5, 1.0, 4.0, 9.0, 99.0):
        assert np.array_equal(posterior_odds(p) >= t, p.max(1) >= odds_to_posterior_threshold(t))
        assert posterior_to_odds_threshold(odds_to_posterior_threshold(t)) == pytest.approx(t)
    assert odds_to_posterior_threshold(9) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="t must be"):
        odds_to_posterior_threshold(0)


def test_ece_and_reliability_by_definition():
    rng = np.random.default_rng(1)
    n = 20000
    conf = rng.uniform(0.1, 1.0, size=n)
    y = (rng.random(n) < conf).astype(int)  # calibrated by construction: right with probability conf
    proba = np.stack([1 - conf, conf], 1)
    # predicted class is 1 where conf > 0.5; make the "true" label match the definition of correct
    pred = proba.argmax(1)
    truth = np.where(y == 1, pred, 1 - pred)
    top = proba.max(1)
    truth = np.where(rng.random(n) < top, pred, 1 - pred)
    assert expected_calibration_error(proba, truth) < 0.02
    over = np.stack([np.full(n, 0.0), np.full(n, 1.0)], 1)  # says 1.0 always, right about half the time
    half = rng.integers(0, 2, size=n)
    assert expected_calibration_error(over, half) == pytest.approx(1 - (half == 1).mean(), abs=1e-12)
    d = reliability_diagram(proba, truth, n_bins=5)
    assert d["count"].sum() == n and len(d["accuracy"]) == 5 and d["ece"] == expected_calibration_error(proba, truth, 5)


def test_temperature_is_recovered_and_keeps_the_argmax():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=6.0, size=(4000, 5))
    T_true = 3.0
    p = softmax(logits, T_true)
    y = np.array([rng.choice(5, p=row) for row in p])
    T = fit_temperature(logits, y)
    assert T == pytest.approx(T_true, rel=0.1)
    assert np.array_equal(softmax(logits, T).argmax(1), logits.argmax(1))


def test_cross_fitted_temperature_uses_labels_only(sp5):
    make = lambda: GaussianEM(**{**methods.GENERATIVE, "lam": 0.0})  # noqa: E731
    T = cross_fitted_temperature(make, sp5.X_train, sp5.y_semi)
    assert T > 1.0  # the raw posteriors are over-confident
    assert cross_fitted_temperature(make, sp5.X_train, semisup.split(1, 0).y_semi) is None


# --------------------------------------------------------------------------- self-training and its failures
@pytest.mark.slow
def test_self_training_matches_sklearn(sp5):
    from sklearn.semi_supervised import SelfTrainingClassifier

    ours = SelfTraining(semisup.logistic_regression(), threshold=0.9).fit(sp5.X_train, sp5.y_semi)
    theirs = SelfTrainingClassifier(semisup.logistic_regression(), threshold=0.9).fit(sp5.X_train, sp5.y_semi)
    assert (ours.transduction_ == theirs.transduction_).mean() > 0.99
    assert ours.history_[0]["added"] == int((theirs.labeled_iter_ == 1).sum())


def test_failure_nothing_passes(sp5):
    from sklearn.linear_model import LogisticRegression

    st = SelfTraining(LogisticRegression(C=0.01, max_iter=2000), threshold=0.9).fit(sp5.X_train, sp5.y_semi)
    assert [f.kind for f in st.failures_] == ["nothing_passed"] and st.termination_condition_ == "no_change"
    assert "highest confidence was" in str(st.failures_[0]) and st.pseudo_counts_.sum() == 0


def test_failure_collapse_with_one_label_per_class():
    sp = semisup.split(1, 0)
    st = SelfTraining(semisup.logistic_regression(), threshold=0.5).fit(sp.X_train, sp.y_semi, y_true=sp.y_train)
    kinds = [f.kind for f in st.diagnose(sp.y_train)]
    assert "collapse" in kinds and "wrong_labels" in kinds
    assert (st.pseudo_counts_ == 0).sum() >= 3  # several classes get no pseudo-label at all
    assert "accuracy" in st.history_[0]


def test_wrong_labels_detected_with_few_labels_not_with_more():
    make = lambda: GaussianEM(n_components=10, covariance_type="full", shrinkage=3.0, lam=0.0)  # noqa: E731
    sp2, sp5 = semisup.split(2, 0), semisup.split(5, 0)
    few = SelfTraining(make(), threshold=0.99).fit(sp2.X_train, sp2.y_semi)
    kinds = [f.kind for f in few.diagnose(sp2.y_train)]
    assert "wrong_labels" in kinds and few.pseudo_label_precision(sp2.y_train) < 0.9
    more = SelfTraining(make(), threshold=0.99).fit(sp5.X_train, sp5.y_semi)
    assert more.diagnose(sp5.y_train) == [] and more.pseudo_label_precision(sp5.y_train) > 0.9


# --------------------------------------------------------------------------- CNN: pseudo-labels and FixMatch
def test_augmentations_keep_shape():
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 1, 8, 8)
    assert weak_augment(x, g).shape == x.shape and strong_augment(x, g).shape == x.shape
    one = torch.zeros(1, 1, 8, 8)
    one[0, 0, 4, 4] = 1
    assert weak_augment(one, g).sum() == 1  # a shift of at most 1 pixel keeps an inner pixel


def test_cnn_logs_mask_rate_and_pseudo_label_accuracy(sp5):
    for mode in ("pseudo_label", "fixmatch"):
        run = train_cnn(sp5.X_train, sp5.y_semi, mode, steps=6, y_true=sp5.y_train, X_test=sp5.X_test,
                        y_test=sp5.y_test, threshold=0.5)
        assert len(run.mask_rate) == 6 and len(run.pseudo_accuracy) == 6 and len(run.loss) == 6
        assert all(0 <= m <= 1 for m in run.mask_rate) and 0 <= run.test_accuracy <= 1
    sup = train_cnn(sp5.X_train, sp5.y_semi, "supervised", steps=3)
    assert sup.mask_rate == [] and sup.summary()["mode"] == "supervised"


def test_cnn_warmup_is_supervised_then_unlabelled(sp5):
    kw = {"steps": 8, "y_true": sp5.y_train, "X_test": sp5.X_test, "y_test": sp5.y_test, "seed": 3}
    sup = train_cnn(sp5.X_train, sp5.y_semi, "supervised", **kw)
    for mode in ("pseudo_label", "fixmatch"):
        all_warm = train_cnn(sp5.X_train, sp5.y_semi, mode, warmup=8, **kw)   # = supervised, step for step
        assert all_warm.loss == sup.loss and all_warm.test_accuracy == sup.test_accuracy
        assert np.isnan(all_warm.mask_rate).all() and np.isnan(all_warm.summary()["mask rate (last 20%)"])
        half = train_cnn(sp5.X_train, sp5.y_semi, mode, warmup=4, threshold=0.1, **kw)
        assert half.loss[:4] == sup.loss[:4] and half.loss[4:] != sup.loss[4:]
        assert np.isnan(half.mask_rate[:4]).all() and np.isfinite(half.mask_rate[4:]).all()
        assert len(half.mask_rate) == len(half.pseudo_accuracy) == 8
        assert 0 <= half.summary()["mask rate (last 20%)"] <= 1
    for bad in (-1, 9, 2.5):
        with pytest.raises(ValueError, match="warmup"):
            train_cnn(sp5.X_train, sp5.y_semi, "fixmatch", steps=8, warmup=bad)


def test_confidence_counts_and_histogram_show_every_prediction():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.pseudo_label import plots

    conf = np.array([0.05, 0.15, 0.95, 0.99, 1.0, 1.0, 0.55])
    right = np.array([False, True, True, False, True, True, True])
    c = plots.confidence_counts(conf, right, bins=10)
    assert c["right"].sum() + c["wrong"].sum() == len(conf)
    assert c["right"][9] == 3 and c["wrong"][9] == 1 and c["wrong"][0] == 1 and c["right"][5] == 1
    ax = plots.confidence_histogram(conf, right, threshold=0.9)
    assert ax.get_yscale() == "linear"
    written = sorted(int(t.get_text()) for t in ax.texts if t.get_text())
    assert written == sorted([1, 1, 1, 3, 1])          # every non-empty bar carries its count
    with pytest.raises(ValueError, match="same shape"):
        plots.confidence_counts(conf, right[:3])
    plt.close("all")


def test_cnn_is_the_shared_pooled_digits_cnn(sp5):
    import torch

    from labkit.models import pooled_digits_cnn

    _, model = train_cnn(sp5.X_train, sp5.y_semi, "supervised", steps=1, return_model=True)
    assert [tuple(p.shape) for p in model.parameters()] == [tuple(p.shape) for p in pooled_digits_cnn().parameters()]
    a, b = pooled_digits_cnn(classes=3, seed=4), pooled_digits_cnn(classes=3, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_old_names_still_work_and_warn():
    import torch

    import labkit.pseudo_label as pl
    from labkit.models import pooled_digits_cnn
    from labkit.pseudo_label.generative import validate_semi_supervised

    with pytest.warns(DeprecationWarning, match="validate_semi_supervised"):
        assert pl.check_semi_supervised is validate_semi_supervised
    with pytest.warns(DeprecationWarning, match="pooled_digits_cnn"):
        torch.manual_seed(1)
        old = pl.SmallCNN(4)  # the old positional n_classes, the same model from the same generator state
    torch.manual_seed(1)
    new = pooled_digits_cnn(classes=4)
    assert all(torch.equal(p, q) for p, q in zip(old.parameters(), new.parameters()))
    assert lab.GENERATIVE is methods.GENERATIVE and lab.generative is methods.generative  # the notebook's route


# --------------------------------------------------------------------------- distributed protocol
@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_protocol_on_ranks_equals_one_process(world_size):
    kw = {"methods": ["generative EM"], "ks": (3,), "seeds": (0, 1, 2)}
    got = labkit.launch(lab.protocol_rank, world_size, kwargs=kw, echo=False, timeout=300)
    ref = lab.local_protocol(**kw)
    for rank_rows in got:
        assert [r["accuracies"] for r in rank_rows] == [r["accuracies"] for r in ref]
        assert [r["mean"] for r in rank_rows] == pytest.approx([r["mean"] for r in ref])


# --------------------------------------------------------------------------- exercise checks
def _good_e_step(Z, means, covs, priors):
    L = np.stack([np.log(priors[c]) + multivariate_normal(means[c], covs[c]).logpdf(Z) for c in range(len(means))], 1)
    L -= L.max(1, keepdims=True)
    R = np.exp(L)
    return R / R.sum(1, keepdims=True)


def test_e_step_check():
    assert lab.check_e_step(_good_e_step).passed

    def naive(Z, means, covs, priors):  # no log-sum-exp: 0/0 far from every mean
        L = np.stack([priors[c] * multivariate_normal(means[c], covs[c]).pdf(Z) for c in range(len(means))], 1)
        return L / L.sum(1, keepdims=True)

    def no_prior(Z, means, covs, priors):
        return _good_e_step(Z, means, covs, np.full(len(priors), 1 / len(priors)))

    def shortcut(Z, means, covs, priors):
        return e_step(Z, means, covs, priors)[0]

    def stub(Z, means, covs, priors):
        raise NotImplementedError

    with np.errstate(all="ignore"):
        r = lab.check_e_step(naive)
    assert not r.passed and "log-sum-exp" in r.summary()
    r = lab.check_e_step(no_prior)
    assert not r.passed and any("unequal priors" in c.name for c in r.failed_cases)
    r = lab.check_e_step(shortcut)
    assert not r.passed and "labkit's own E-step" in r.summary()
    r = lab.check_e_step(stub)
    assert not r.attempted and "not attempted" in r.summary()
    assert lab.check_e_step(_good_e_step).passed  # the refusal is lifted afterwards


def test_threshold_check():
    def choose(conf, correct):
        wrong = conf[~correct]
        return float(min(1.0, wrong.max() + 1e-12)) if len(wrong) else float(conf.min())

    assert lab.check_threshold(choose).passed
    strict = lab.check_threshold(lambda c, k: 0.9)
    assert not strict.passed and "too strict" in strict.summary()
    lenient = lab.check_threshold(lambda c, k: 0.5)
    assert not lenient.passed and "too lenient" in lenient.summary()
    assert not lab.check_threshold(lambda c, k: 1.5).passed
    stub = lab.check_threshold(lambda c, k: (_ for _ in ()).throw(NotImplementedError))
    assert not stub.attempted


# --------------------------------------------------------------------------- bench and tour
def test_bench_quick_prints_the_table(capsys):
    assert bench.main(["--ks", "5", "--seeds", "2", "--methods", "generative EM", "generative, labelled only",
                       "LabelSpreading (sklearn)"]) == 0
    out = capsys.readouterr().out
    assert "K=5" in out and "generative EM" in out and "above its labelled-only fit" in out
    with pytest.raises(SystemExit):
        bench.main(["--help"])


def test_bench_on_mnist_format_files(tmp_path, write_mnist, capsys):
    labels = np.repeat(np.arange(10), 30)
    write_mnist(tmp_path, np.random.default_rng(0).permutation(labels), np.arange(10))
    rc = bench.main(["--dataset", "mnist", "--root", str(tmp_path), "--seeds", "1", "--limit", "300",
                     "--methods", "generative EM", "LabelSpreading (sklearn)"])
    out = capsys.readouterr().out
    assert rc == 0 and "MNIST, first 300 training images" in out and "K=10" in out
    assert bench.main(["--dataset", "mnist", "--root", str(tmp_path / "none")]) == 2
    assert "MNIST is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_tour():
    rows = lab.tour(2)
    assert len(rows) == 4 and all(r["ok"] for r in rows), rows


def test_one_blas_thread_limits_blas_and_restores_it():
    from threadpoolctl import threadpool_info

    def blas():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    before = blas()
    assert before, "NumPy's BLAS is visible to threadpoolctl"
    limiter = semisup.one_blas_thread()
    try:
        assert blas() == [1] * len(before)
    finally:
        limiter.restore_original_limits()
    assert blas() == before
