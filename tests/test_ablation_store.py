"""Lab 08's harness: studies, the SQLite store, the runner's workers, kill -9 and resume, shards and merge, the CLI.

The trials here are a tiny function (no training) that writes a line to a side log at each start, so that the
tests count starts independently of the store."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from labkit._validate import ArgumentError
from labkit.ablation.reporting import report
from labkit.ablation.runner import in_shard, parse_shard, run_study
from labkit.ablation.store import SCHEMA_VERSION, MergeConflict, Store, StoreError, merge
from labkit.ablation.study import Study, StudyFileError, load_study

FAKE = '''
import os, time
def trial(config, seed):
    with open(os.environ["SIDE_LOG"], "a") as f:
        f.write(f"{config['x']}|{config['boom']}|{seed}\\n")
    time.sleep(config.get("sleep", 0.0))
    if config["boom"] == "raise":
        raise RuntimeError("boom on purpose")
    if config["boom"] == "die":
        os._exit(3)
    if config["boom"] == "hang":
        time.sleep(600)
    # b: a clear gain that differs a little by seed (equal differences have zero variance: the report tests nothing)
    bonus = {"a": 0.0, "b": 0.1 + 0.001 * seed, "c": 0.001 * (-1) ** seed}[config["x"]]
    return {"accuracy": 0.5 + 0.01 * seed + bonus, "seconds": time.time(),
            "curve": [{"step": 1, "test_accuracy": 0.4}, {"step": 2, "test_accuracy": 0.5 + bonus}]}
'''


@pytest.fixture()
def fake(tmp_path, monkeypatch, trial_module):
    monkeypatch.setenv("SIDE_LOG", str(tmp_path / "side.log"))
    monkeypatch.setenv("LABKIT_NO_PROGRESS", "1")
    return trial_module("fake_trial", FAKE)


def _starts(tmp_path) -> list[str]:
    p = tmp_path / "side.log"
    return p.read_text().splitlines() if p.exists() else []


def _study(fake, **kw):
    args = dict(name="t", baseline={"x": "a", "boom": "no", "sleep": 0.0}, factors={"x": ["b", "c"]},
                seeds=[0, 1, 2, 3], trial=fake.trial)
    args.update(kw)
    return Study(**args)


def test_design_and_keys(fake):
    s = _study(fake, factors={"x": ["b", "c"], "boom": ["raise"]})
    labels = [lab for lab, _, _ in s.configurations()]
    assert labels == ["baseline", "x=b", "x=c", "boom=raise"]
    trials = s.trials()
    assert len(trials) == 4 * 4 and len({t.key for t in trials}) == 16
    assert [t.seed for t in trials[:4]] == [0, 0, 0, 0]  # seed-major: a stopped study has whole pairs
    g = _study(fake, factors={"x": ["b", "c"], "boom": ["raise"]}, design="grid")
    assert len(g.configurations()) == 3 * 2  # every combination, the baseline once
    assert {t.key for t in _study(fake).trials()} == {t.key for t in _study(fake).trials()}  # stable
    # a different seed list, config or code version gives different keys
    other = _study(fake, baseline={"x": "a", "boom": "no", "sleep": 0.001})
    assert not {t.key for t in other.trials()} & {t.key for t in _study(fake).trials()}


@pytest.mark.parametrize("kw, match", [
    (dict(factors={}), "factors is empty"),
    (dict(factors={"y": ["b"]}), "no baseline value"),
    (dict(factors={"x": []}), r"factors\['x'\] is empty"),
    (dict(factors={"x": ["a"]}), "lists the baseline value"),
    (dict(factors={"x": "b"}), "must be a list"),
    (dict(seeds=[]), "seeds must be a non-empty"),
    (dict(seeds=[1, 1]), "must not repeat"),
    (dict(design="best-of-n"), "design must be one of"),
    (dict(design="grid", grid=[]), "grid is empty"),
    (dict(name="a b"), "name must be"),
])
def test_bad_studies(fake, kw, match):
    with pytest.raises(ArgumentError, match=match):
        _study(fake, **kw)


def test_store_schema_and_refusals(tmp_path):
    db = tmp_path / "r.db"
    s = Store(db)
    assert s.journal_mode == "wal"
    assert s.save_study("a", {"seeds": [0], "code": "c"}) == []
    assert s.save_study("a", {"seeds": [0], "code": "c"}) == []
    assert s.save_study("a", {"seeds": [0, 1], "code": "c"}) == ["seeds"]  # updated: trials are keyed on their own
    assert s.studies()["a"]["seeds"] == [0, 1]
    assert s.claim("k1", study="a", label="baseline", config={}, seed=0, code="c")
    assert s.finish("k1", 0.5, {"accuracy": 0.5})
    assert not s.claim("k1", study="a", label="baseline", config={}, seed=0, code="c")  # done: never again
    s.close()
    con = sqlite3.connect(db)
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}.*nothing in it was changed"):
        Store(db)
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM trials WHERE key='k1'").fetchone() == (0.5,)  # kept
    con.close()
    other = tmp_path / "other.db"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE t (a)")
    c.commit()
    c.close()
    with pytest.raises(StoreError, match="not one labkit wrote"):
        Store(other)
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a labkit results database"):
        Store(tmp_path / "junk.db")
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "no" / "such.db")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_read_only_store_is_a_clear_error(tmp_path, fake):
    db = tmp_path / "ro" / "r.db"
    db.parent.mkdir()
    run_study(_study(fake, seeds=[0]), db, workers=1, echo=False)
    for p in db.parent.iterdir():
        p.chmod(0o444)
    db.parent.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="read-only"):
            run_study(_study(fake, seeds=[0, 1]), db, workers=1, echo=False)
    finally:
        db.parent.chmod(0o755)


def test_run_resume_failures_and_report(tmp_path, fake):
    db = tmp_path / "r.db"
    s = _study(fake, factors={"x": ["b", "c"], "boom": ["raise", "die"]}, seeds=[0, 1, 2])
    got = []
    out = run_study(s, db, workers=2, on_result=got.append, echo=False)
    assert (out.done, out.failed, out.ran) == (9, 6, 15)
    assert len(got) == 15
    with Store(db) as st:
        rows = {(r["label"], r["seed"]): r for r in st.rows()}
    assert "boom on purpose" in rows[("boom=raise", 0)]["error"]
    assert "RuntimeError" in rows[("boom=raise", 0)]["traceback"]
    assert "exited with status 3" in rows[("boom=die", 1)]["error"]
    n = len(_starts(tmp_path))
    again = run_study(s, db, workers=2, echo=False)  # resume: nothing to do
    assert (again.ran, again.already_done, again.skipped_failed) == (0, 9, 6)
    assert len(_starts(tmp_path)) == n
    retry = run_study(s, db, workers=1, retry_failed=True, echo=False)
    assert retry.ran == 6 and len(_starts(tmp_path)) == n + 6
    rep = report(db)
    b = rep.row("x=b")
    assert b["n"] == 3 and b["diff"] == pytest.approx(0.101) and b["wins"] == 3 and b["verdict"] == "helps"
    assert rep.row("x=c")["verdict"] == "no evidence"
    assert rep.row("boom=raise")["n"] == 0 and "boom=raise" in rep.missing
    assert any("boom on purpose" in e for e in rep.failed.values())
    text = rep.table()
    assert "x=b" in text and "Holm" in text
    csv = rep.to_csv(tmp_path / "r.csv")
    assert csv.splitlines()[0].startswith("label,n,mean,diff") and (tmp_path / "r.csv").exists()
    assert len(rep.curves["x=b"]) == 3


def test_a_hanging_trial_is_stopped(tmp_path, fake):
    s = _study(fake, factors={"boom": ["hang"]}, seeds=[0])
    out = run_study(s, tmp_path / "r.db", workers=2, trial_timeout=3, echo=False)
    assert (out.done, out.failed) == (1, 1)
    assert "trial_timeout" in next(iter(out.errors.values()))


def test_full_or_read_only_disk_is_a_clear_error_and_keeps_what_is_stored(tmp_path):
    db = tmp_path / "r.db"
    s = Store(db)
    s.claim("k1", study="a", label="baseline", config={}, seed=0, code="c")
    s.finish("k1", 0.5, {"accuracy": 0.5})
    pages = s._db.execute("PRAGMA page_count").fetchone()[0]
    s._db.execute(f"PRAGMA max_page_count = {pages + 1}")  # the file may not grow: a full disk, as SQLite sees it
    s.claim("k2", study="a", label="baseline", config={}, seed=1, code="c")
    with pytest.raises(StoreError, match="disk is full.*finished trials are kept"):
        s.finish("k2", 0.6, {"accuracy": 0.6, "curve": ["x" * 100] * 200})
    s.close()
    ro = Store(db)
    ro._db.close()
    ro._db = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)  # as a read-only disk reads
    with pytest.raises(StoreError, match="read-only"):
        ro.claim("k3", study="a", label="baseline", config={}, seed=2, code="c")
    ro.close()
    with Store(db) as st:
        assert {r["key"]: r["status"] for r in st.rows()} == {"k1": "done", "k2": "running"}


def _write_study(tmp_path, seeds=6, sleep=0.7) -> str:
    p = tmp_path / "s.toml"
    p.write_text(textwrap.dedent(f"""\
        name = "kill"
        seeds = {list(range(seeds))}
        trial = "fake_trial:trial"

        [baseline]
        x = "a"
        boom = "no"
        sleep = {sleep}

        [factors]
        x = ["b", "c"]
        """))
    return str(p)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "labkit", "ablate", *args], capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.mark.slow
def test_kill_minus_9_and_resume_loses_nothing_and_runs_nothing_twice(tmp_path, fake):
    """The study's process is killed with SIGKILL at random moments, three times, then resumed to the end."""
    study = _write_study(tmp_path)
    db = tmp_path / "s.db"
    rng = random.Random(8)
    total = 3 * 6  # trials of 0.7 s: longer than a worker takes to notice that its study died
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "labkit", "ablate", study, "--db", str(db), "-j", "2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = len(_starts(tmp_path))
        deadline = time.monotonic() + 60
        target = before + 3 + rng.randrange(3)  # a third start: at least one trial of this run has finished
        while len(_starts(tmp_path)) < target and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.7))  # then anywhere within a trial
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    with Store(db) as st:
        done_before = {r["key"]: r["value"] for r in st.rows(status="done")}
    assert 0 < len(done_before) < total, "the kills should land in the middle of the study"
    r = _cli(study, "--db", str(db), "-j", "2")
    assert r.returncode == 0, r.stderr
    assert "interrupted" in r.stdout
    with Store(db) as st:
        rows = st.rows()
        assert st.counts()["done"] == total
        events = st.events()
    assert all(r["status"] == "done" for r in rows)
    for k, v in done_before.items():  # nothing finished was lost or run again
        assert next(r for r in rows if r["key"] == k)["value"] == v
    starts = {}
    for line in _starts(tmp_path):
        starts[line] = starts.get(line, 0) + 1
    assert len(starts) == total
    for row in rows:  # every extra start of a trial is one the store recorded as interrupted
        line = f"{row['config']['x']}|no|{row['seed']}"
        assert starts[line] <= 1 + row["interrupted"], (line, starts[line], row["interrupted"])
        assert sum(e["event"] == "done" and e["key"] == row["key"] for e in events) == 1
    assert sum(r["interrupted"] for r in rows) >= 1
    again = _cli(study, "--db", str(db))  # resuming a finished study starts nothing
    assert again.returncode == 0 and "0 to run" in again.stdout
    assert sum(starts.values()) == len(_starts(tmp_path))


def test_shards_merge_and_conflicts(tmp_path, fake):
    s = _study(fake)
    keys = [t.key for t in s.trials()]
    slices = [[k for k in keys if in_shard(k, (i, 3))] for i in range(3)]
    assert sorted(sum(slices, [])) == sorted(keys) and all(slices)  # disjoint and complete
    for i in range(3):
        run_study(s, tmp_path / f"s{i}.db", workers=1, shard=f"{i}/3", echo=False)
    got = merge(tmp_path / "all.db", [tmp_path / f"s{i}.db" for i in range(3)])
    assert got["added"] == len(keys)
    whole = report(tmp_path / "all.db")
    run_study(s, tmp_path / "one.db", workers=2, echo=False)
    assert [r["mean"] for r in whole.rows] == pytest.approx([r["mean"] for r in report(tmp_path / "one.db").rows])
    assert merge(tmp_path / "all.db", [tmp_path / "one.db"])["same"] == len(keys)  # same results: fine
    con = sqlite3.connect(tmp_path / "one.db")
    con.execute("UPDATE trials SET value = value + 0.5 WHERE rowid = 1")
    con.commit()
    con.close()
    with pytest.raises(MergeConflict, match="same hash but different results"):
        merge(tmp_path / "all.db", [tmp_path / "one.db"])
    r = _cli("merge", str(tmp_path / "all.db"), str(tmp_path / "one.db"))
    assert r.returncode == 1 and "refused" in r.stderr
    with pytest.raises(ArgumentError, match="shard must look like"):
        parse_shard("1-3")
    with pytest.raises(ArgumentError, match="slices are numbered"):
        parse_shard("3/3")


def test_study_file_errors_name_the_line_and_key(tmp_path, fake):
    p = tmp_path / "bad.toml"
    p.write_text('name = "x"\ntrial = "fake_trial:trial"\n[baseline]\nx = "a"\n[factors]\nx = ["a"]\n')
    with pytest.raises(StudyFileError, match=r"line 6, key factors\.x: .*lists the baseline value"):
        load_study(p)
    p.write_text('name = "x"\n[baseline]\nx = = "a"\n[factors]\nx = ["b"]\n')
    with pytest.raises(StudyFileError, match="not valid TOML.*line 3"):
        load_study(p)
    p.write_text('name = "x"\nseed = [1]\n[baseline]\nx = "a"\n[factors]\nx = ["b"]\n')
    with pytest.raises(StudyFileError, match="line 2, key seed: unknown key"):
        load_study(p)
    p.write_text('name = "x"\ntrial = "no_such_module:f"\n[baseline]\nx = "a"\n[factors]\nx = ["b"]\n')
    with pytest.raises(StudyFileError, match="line 2, key trial: cannot import"):
        load_study(p)
    r = _cli(str(p), cwd=tmp_path)
    assert r.returncode == 2 and "cannot import" in r.stderr


def test_cli_runs_resumes_and_reports(tmp_path, fake):
    study = _write_study(tmp_path, seeds=3, sleep=0.0)
    r = _cli(study, "-j", "2", "--csv", str(tmp_path / "out.csv"), cwd=tmp_path)  # the results file: ./s.db
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.db").exists()
    assert "9 done" in r.stdout and "x=b" in r.stdout and (tmp_path / "out.csv").exists()
    r = _cli(study, "--report", cwd=tmp_path)
    assert r.returncode == 0 and "x=b" in r.stdout and "helps" in r.stdout
    r = _cli(study, "--report", "--db", str(tmp_path / "none.db"))
    assert r.returncode == 2 and "does not exist yet" in r.stderr
    assert len(_starts(tmp_path)) == 9


def test_more_seeds_reuse_what_is_done(tmp_path, fake):
    db = tmp_path / "r.db"
    first = run_study(_study(fake, seeds=[0, 1]), db, workers=1, echo=False)
    assert first.done == 6
    more = run_study(_study(fake, seeds=[0, 1, 2]), db, workers=1, echo=False)
    assert (more.already_done, more.ran) == (6, 3)
    assert report(db).row("x=b")["n"] == 3
    assert len(_starts(tmp_path)) == 9


def test_a_trial_function_the_workers_cannot_load_is_one_clear_error(tmp_path, fake, trial_module):
    from labkit.ablation.runner import WorkerError

    gone_trial = trial_module("gone_trial", "def trial(config, seed):\n    return {'accuracy': 1.0}\n")

    s = _study(fake, trial=gone_trial.trial, seeds=[0])
    (tmp_path / "gone_trial.py").unlink()  # the workers import it by name: it is not there any more
    said = "(?s)could not load the study's trial function.*No module named 'gone_trial'"
    with pytest.raises(WorkerError, match=said):
        run_study(s, tmp_path / "r.db", workers=1, echo=False)
    with Store(tmp_path / "r.db") as st:
        assert st.counts()["running"] == 0


def test_recover_refuses_while_another_run_holds_a_trial(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Store(tmp_path / "r.db") as st:
            st.claim("k1", study="a", label="baseline", config={}, seed=0, code="c", pid=other.pid)
            with pytest.raises(StoreError, match=f"being run by process {other.pid}.*another run"):
                st.recover(wait=0.5)
            assert st.statuses() == {"k1": "running"}  # untouched
            other.kill()
            other.wait()
            assert st.recover(wait=0.5) == ["k1"] and st.statuses() == {"k1": "interrupted"}
    finally:
        other.kill()
        other.wait()
