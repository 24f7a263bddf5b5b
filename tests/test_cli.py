"""doctor, tour and the command line."""
import os
import subprocess
import sys

import pytest

import labkit
from labkit.runtime import doctor as doctor_mod
from labkit.tour import LABS, run_tour

pytestmark = pytest.mark.timeout(900)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_doctor_reports_working_gloo():
    report = labkit.doctor(echo=False)
    assert report.ok, report.text()
    names = [f.what for f in report.findings]
    assert "gloo all-reduce, 2 ranks" in names
    assert all(f.ok for f in report.findings if f.what.startswith("gloo"))
    assert "CPUs" in report.info and "torch" in report.info


def test_doctor_fails_with_a_fix_when_something_needed_is_missing(monkeypatch):
    monkeypatch.setattr(doctor_mod, "NEEDED", doctor_mod.NEEDED + ["labkit_no_such_module"])
    report = doctor_mod.doctor(backends=False, echo=False)
    assert not report.ok
    text = report.text()
    assert "[FAIL] import labkit_no_such_module" in text and "fix: pip install -r requirements.txt" in text


def test_doctor_cli_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "labkit", "doctor", "--no-backends"], capture_output=True, text=True,
                        cwd=REPO, timeout=480)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = subprocess.run(
        [sys.executable, "-c", "import sys, labkit.runtime.doctor as d; d.NEEDED.append('labkit_no_such_module');"
                               "from labkit.__main__ import main; sys.exit(main(['doctor', '--no-backends']))"],
        capture_output=True, text=True, cwd=REPO, timeout=480)
    assert broken.returncode == 1 and "labkit_no_such_module" in broken.stdout


def test_tour_start_here_quick_path():
    rows = run_tour(["00 start"], echo=False)
    assert rows and all(r["result"] == "ok" for r in rows), rows


def test_every_lab_has_a_tour_and_its_bench_a_main():
    import importlib
    import inspect

    from labkit.__main__ import BENCHES

    for lab in LABS:
        tour = getattr(importlib.import_module(f"{lab.package}.lab"), "tour", None)
        assert callable(tour), f"{lab.package}.lab has no tour()"
        assert "world_size" in inspect.signature(tour).parameters, f"{lab.package}.lab.tour ignores world_size"
        if lab.bench:
            assert callable(importlib.import_module(f"{lab.package}.bench").main), lab.package
            assert BENCHES[lab.bench] == f"{lab.package}.bench"
        if lab.notebook:
            assert os.path.exists(os.path.join(REPO, "notebooks", lab.notebook)), lab.notebook
    assert sorted(BENCHES) == sorted(lab.bench for lab in LABS if lab.bench)


def test_tour_rejects_unknown_lab():
    with pytest.raises(ValueError, match="no lab matches"):
        run_tour(["no-such-lab"], echo=False)


def test_bench_launch_prints_table_with_ratio():
    p = subprocess.run([sys.executable, "-m", "labkit", "bench", "launch", "--world-sizes", "2", "--cold-runs", "1",
                        "--warm-runs", "5"], capture_output=True, text=True, cwd=REPO, timeout=480)
    assert p.returncode == 0, p.stderr
    assert "speed-up" in p.stdout and "target: pooled re-run" in p.stdout


def test_doctor_function_survives_repeated_calls():
    # the module is labkit.runtime.doctor, so importing it never replaces the labkit.doctor function
    assert labkit.doctor(backends=False, echo=False).ok
    assert callable(labkit.doctor) and labkit.doctor(backends=False, echo=False).ok


def test_progress_bar_yields_every_item(monkeypatch):
    from labkit.viz import progress

    assert list(progress(range(5), desc="x")) == [0, 1, 2, 3, 4]
    monkeypatch.setenv("LABKIT_NO_PROGRESS", "1")
    items = [1, 2]
    assert progress(items) is items  # switched off: the iterable itself
