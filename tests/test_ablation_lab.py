"""Lab 08's exercise checks, notebook helpers, report views and tour (the harness itself: test_ablation_store)."""
from __future__ import annotations

import math
import os

import pytest

from labkit.ablation import BASELINE, FACTORS, Factor, Study, load_study, report, run_study, selection_bias
from labkit.ablation import lab as L
from labkit.ablation.reporting import _verdict


def right(row):
    if row["p_holm"] >= 0.05:
        return "no evidence"
    return "helps" if row["diff"] > 0 else "hurts"


def by_means(row):  # reads the mean difference only
    return "no evidence" if abs(row["diff"]) < 0.01 else ("helps" if row["diff"] > 0 else "hurts")


def raw_p(row):  # forgets the adjustment for many comparisons
    if row["p"] >= 0.05:
        return "no evidence"
    return "helps" if row["diff"] > 0 else "hurts"


def asks_the_library(row):
    return _verdict(row, 0.05, False)


def stub(row):
    raise NotImplementedError


def test_verdict_rows_have_the_cases_they_claim():
    rows = {what: (row, exp) for what, row, exp in L.verdict_rows(3)}
    noisy = rows["a large mean difference with noise larger still"]
    assert noisy[1] == "no evidence" and noisy[0]["lo"] < 0 < noisy[0]["hi"]
    small = rows["a small but very consistent gain"]
    assert small[1] == "helps" and small[0]["diff"] < 0.01
    (border,) = [(r, e) for w, (r, e) in rows.items() if w.startswith("p = ")]
    assert border[0]["p"] < 0.05 <= border[0]["p_holm"] and border[1] == "no evidence"


def test_check_verdict():
    assert L.check_verdict(right).passed
    assert L.check_verdict(stub).attempted is False
    bad = L.check_verdict(by_means)
    assert not bad.passed and "p_holm" in bad.hint
    assert not L.check_verdict(raw_p).passed
    short = L.check_verdict(asks_the_library)
    assert not short.passed and "read the row's columns yourself" in str(short)
    assert not L.check_verdict(lambda row: "maybe").passed


def _dropout():
    return Factor("dropout", [0.0, 0.3], apply=lambda r, v: setattr(r, "dropout", v))


def test_check_factor_wrong_factors(tmp_path):
    db = str(tmp_path / "none.db")
    got = L.check_factor(_dropout(), db)
    assert not got.passed and "does not exist" in str(got)  # the last case needs the study
    assert sum(c.ok for c in got.cases) == 4
    renamed = Factor("my_loss", ["ce", "smooth"], apply=FACTORS["loss"].apply)
    assert "shipped factor" in str(L.check_factor(renamed, db))
    own_loss = Factor("loss", ["ce", "smooth"], apply=lambda r, v: None)
    assert "one of the lab's factors" in str(L.check_factor(own_loss, db))
    inert = Factor("nothing", [0, 1], apply=lambda r, v: None)
    assert "same recipe" in str(L.check_factor(inert, db))
    assert "expected your function to return" in str(L.check_factor(lambda db: {"name": "dropout"}, db))

    def stub(db):
        raise NotImplementedError

    assert L.check_factor(stub, db).attempted is False


@pytest.mark.slow
def test_check_factor_runs_the_learners_study(tmp_path):
    def run_my_study(db):
        f = _dropout()
        study = Study("mine", {**BASELINE, "steps": 20, "dropout": 0.0}, {"dropout": [0.3]}, seeds=[0, 1],
                      extra_factors=[f])
        got = run_study(study, db, workers=2, echo=False, progress=False)
        assert got.done + got.already_done == 4, got.errors
        return f

    db = str(tmp_path / "mine.db")
    assert L.check_factor(run_my_study, db).passed
    elsewhere = L.check_factor(lambda d: run_my_study(db), str(tmp_path / "other.db"))  # ran into another file
    assert not elsewhere.passed and "does not exist" in str(elsewhere)


def test_study_file_round_trip(tmp_path):
    spec = {"name": "rt", "seeds": [0, 1], "baseline": dict(BASELINE),
            "factors": {"distill": [{"T": 4.0, "alpha": 0.7}], "loss": ["smooth"], "reg": ["l2"]}}
    path = L.write_study_file(str(tmp_path / "rt.toml"), spec)
    s = load_study(path)
    assert s.baseline == BASELINE and s.factors == spec["factors"] and s.seeds == [0, 1]
    assert [lab for lab, _, _ in s.configurations()] == ["baseline", "distill=T=4.0,alpha=0.7", "loss=smooth", "reg=l2"]


def test_example_study_file_loads():
    s = load_study(os.path.join(os.path.dirname(L.__file__), "example_study.toml"))
    assert s.baseline == BASELINE and len(s.configurations()) > 5


def test_bad_factor_values_name_the_factor():
    with pytest.raises(ValueError, match=r"factors\['augment'\].*no value 'rotate'"):
        Study("x", dict(BASELINE), {"augment": ["rotate"]})
    with pytest.raises(ValueError, match="unknown factor 'dropout'"):
        Study("x", {**BASELINE, "dropout": 0.0}, {"dropout": [0.1]})


NOISE = '''
import random
def trial(config, seed):
    r = random.Random(f"{config['x']}-{seed}")
    return {"accuracy": 0.9 + r.gauss(0, 0.02), "loss": 0.3 + r.gauss(0, 0.01)}
'''


def test_best_of_n_overstates_the_winner(tmp_path, trial_module):
    noise_trial = trial_module("noise_trial", NOISE)

    study = Study("noise", {"x": "a"}, {"x": ["b", "c", "d", "e", "f"]}, seeds=list(range(6)), trial=noise_trial.trial)
    db = tmp_path / "n.db"
    run_study(study, db, workers=2, echo=False, progress=False)
    sb = selection_bias(db)
    assert sb["configurations"] == 6 and len(sb["picks"]) == 6
    assert sb["bias"] > 0 and sb["picked_mean"] > sb["fresh_mean"]
    rep = report(db)
    assert all(r["verdict"] in ("no evidence", "") for r in rep.rows)  # noise: Holm finds nothing
    loss = report(db, metric="loss", lower_is_better=True)
    assert loss.metric == "loss" and loss.rows[0]["mean"] == pytest.approx(0.3, abs=0.02)
    with pytest.raises(ValueError, match="returned 'nope'"):
        report(db, metric="nope")


def test_report_views(tmp_path, trial_module):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    curve = '"curve": [{"step": 1, "test_accuracy": 0.5}], "loss"'
    noise_trial = trial_module("noise_trial", NOISE.replace('"loss"', curve))
    study = Study("views", {"x": "a"}, {"x": ["b"]}, seeds=[0, 1, 2], trial=noise_trial.trial)
    db = tmp_path / "v.db"
    run_study(study, db, workers=1, echo=False, progress=False)
    rep = report(db, method="bootstrap", n_boot=500)
    assert "<table" in rep._repr_html_() and "bootstrap" in rep.table()
    from labkit.ablation import plots

    assert plots.differences(rep.rows) is not None
    assert plots.curves(rep.curves) is not None
    assert not math.isnan(rep.row("x=b")["lo"])
    with pytest.raises(KeyError, match="labels are"):
        rep.row("nope")


def test_report_with_two_seeds_says_too_few_seeds_and_prints_dashes(tmp_path, trial_module):
    # two seeds: the report must not print an interval, a p-value or a verdict such as "hurts"
    noise_trial = trial_module("noise_trial", NOISE)
    study = Study("two", {"x": "a"}, {"x": ["b", "c"]}, seeds=[0, 1], trial=noise_trial.trial)
    db = tmp_path / "two.db"
    run_study(study, db, workers=1, echo=False, progress=False)
    rep = report(db)
    for label in ("x=b", "x=c"):
        r = rep.row(label)
        assert r["n"] == 2 and r["verdict"] == "too few seeds"
        assert all(math.isnan(r[k]) for k in ("lo", "hi", "p", "p_holm")) and not math.isnan(r["diff"])
    text, html = rep.table(), rep._repr_html_()
    assert "nan" not in text.lower() and "\u2014" in text and "too few seeds" in text and "hurts" not in text
    assert "nan" not in html.lower() and "\u2014" in html
    assert "too few seeds" in rep.html(labels=["x=b"], columns=("label", "lo", "verdict"))
    assert L.check_verdict(right, rep).passed  # rows without a test are not asked about


def test_report_zero_variance_gives_no_p(tmp_path, trial_module):
    # a variant that adds exactly 0.01 on every seed: sd = 0, so no test (a t-test would print p = 0)
    const = trial_module("const_trial", """
import random
def trial(config, seed):
    return {"accuracy": 0.8 + random.Random(seed).gauss(0, 0.02) + (0.01 if config["x"] == "b" else 0.0)}
""")
    study = Study("flat", {"x": "a"}, {"x": ["b"]}, seeds=[0, 1, 2, 3], trial=const.trial)
    db = tmp_path / "flat.db"
    run_study(study, db, workers=1, echo=False, progress=False)
    r = report(db).row("x=b")
    assert r["verdict"] == "zero variance" and math.isnan(r["p"]) and r["diff"] == pytest.approx(0.01)


@pytest.mark.slow
def test_tour():
    rows = L.tour(2)
    assert rows and all(r["ok"] for r in rows), rows


def test_bench_store_overhead_and_help(capsys):
    from labkit.ablation import bench

    assert 0 < bench.store_overhead(10) < 5.0
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_runs_and_prints_its_ratios(capsys):
    from labkit.ablation import bench

    assert bench.main(["--quick", "--seeds", "1", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "ratio 2/1" in out and "store per trial" in out
