"""The classroom's grading: ``labkit.checks.graded`` in a student's run and under nbgrader, the hand-out written by
nbgrader, every student version run top to bottom, and nbgrader's autograde, export and feedback on real
submissions (one correct, one wrong that also raises, one corrupt)."""
from __future__ import annotations

import csv
import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from labkit import checks
from labkit.checks import graded, run_cases

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _check(answer):
    """A check in the protocol: the answer must double its input."""
    return run_cases("doubles", [(f"x={x}", lambda x=x: checks.expect_equal(answer(x), 2 * x, what="answer"))
                                 for x in (1, 5)], hint="multiply by two")


def _stub(x):
    raise NotImplementedError()


def test_graded_in_a_students_own_run(monkeypatch, capsys):
    monkeypatch.delenv(checks.GRADING_VARIABLE, raising=False)
    assert graded(_check, lambda x: 2 * x) is None          # passed: nothing raised, no value for nbgrader to read
    assert "doubles: PASSED (2/2 cases)" in capsys.readouterr().out
    graded(_check, _stub)                                     # not attempted: says so, "Run all" goes on
    assert "not attempted yet" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=r"(?s)FAILED.*\[FAIL\] x=5: answer: got 6, expected 10.*hint: multiply"):
        graded(_check, lambda x: x + 1)                      # wrong: the cell fails with the failing case and hint


@pytest.mark.parametrize("mode", ["autograde", "validate"])
def test_graded_under_nbgrader_gives_an_unattempted_exercise_no_points(monkeypatch, mode):
    monkeypatch.setenv(checks.GRADING_VARIABLE, mode)
    assert checks.grading() == mode
    with pytest.raises(AssertionError, match=f"not attempted yet.*nbgrader \\({mode}\\)"):
        graded(_check, _stub)
    with pytest.raises(AssertionError, match="FAILED"):
        graded(_check, lambda x: 0)
    graded(_check, lambda x: 2 * x)


def test_graded_sends_the_checks_stderr_to_stdout(monkeypatch, capsys):
    """nbgrader scores a test cell that wrote to stderr zero: a warning in the check's run must not cost points."""
    monkeypatch.delenv(checks.GRADING_VARIABLE, raising=False)

    def noisy(answer):
        print("a warning from the check's own run", file=sys.stderr)
        return _check(answer)

    graded(noisy, lambda x: 2 * x)
    out = capsys.readouterr()
    assert "a warning from the check's own run" in out.out and out.err == ""


def test_graded_refuses_a_result_in_place_of_the_check():
    with pytest.raises(TypeError, match=r"graded\(L.check_something, my_answer\)"):
        graded(_check(lambda x: 2 * x), lambda x: 2 * x)
    with pytest.raises(TypeError, match="not a labkit.checks.CheckResult"):
        graded(lambda answer: True, lambda x: 2 * x)


# --- through nbgrader -------------------------------------------------------------------------------------------------

nbgrader = pytest.importorskip("nbgrader", reason="nbgrader is not installed (pip install -r requirements.txt)")
from labkit import grading  # noqa: E402


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """Every lab handed out once, for the tests below (nbgrader generate_assignment, about 2 s a lab)."""
    root = tmp_path_factory.mktemp("course")
    return root, grading.handout(root)


def test_handout_writes_every_student_version_through_nbgrader(course):
    root, labs = course
    assert [lab.name for lab in labs] == [p.stem for p in NOTEBOOKS]
    assert (root / "nbgrader_config.py").is_file() and (root / "gradebook.db").is_file()
    for lab in labs:
        teacher = json.loads((REPO / "notebooks" / lab.source.name).read_text())["cells"]
        student = json.loads(lab.release.read_text())["cells"]
        assert len(student) == len(teacher)
        assert [e.grade_id for e in lab.exercises] == [
            c["metadata"]["nbgrader"]["grade_id"] for c in teacher if c["metadata"].get("nbgrader", {}).get("grade")]
        for t, s in zip(teacher, student):
            meta = t["metadata"].get("nbgrader", {})
            text = "".join(s["source"])
            if meta.get("solution"):   # the answer is gone, nbgrader's stub is in its place; the hints stay
                assert "### BEGIN SOLUTION" not in text and "raise NotImplementedError()" in text, text
                assert text.split("\n")[0] == "".join(t["source"]).split("\n")[0]
            else:                      # everything else is the teacher's cell, with nbgrader's checksum if graded
                assert text == "".join(t["source"])
            if meta:
                assert s["metadata"]["nbgrader"].get("checksum"), "nbgrader records the cell for autograde"
    assert sum(lab.points for lab in labs) == sum(e.points for lab in labs for e in lab.exercises) > 0


def test_handout_again_keeps_the_teachers_config_and_rejects_unknown_labs(course, tmp_path):
    root, _ = course
    cfg = root / "nbgrader_config.py"
    text = cfg.read_text()
    cfg.write_text(text + "\n# a teacher's edit\n")
    try:
        again = grading.handout(root, ["00"])
        assert [lab.name for lab in again] == ["00_start_here"] and "# a teacher's edit" in cfg.read_text()
    finally:
        cfg.write_text(text)
    with pytest.raises(ValueError, match=r"labs=\['99'\]: no such notebook.*00, 01"):
        grading.handout(tmp_path / "other", ["99"])
    with pytest.raises(FileNotFoundError, match="not a course directory"):
        grading.autograde(tmp_path / "nowhere", "00_start_here")


def _hub_runs_00() -> bool:
    """tests/test_classroom_hub.py runs the student version of 00 to the end in two servers (checking that every
    check says "not attempted yet"); here it runs only when that test cannot."""
    import importlib.util

    from labkit.classroom import proxy_command

    return importlib.util.find_spec("jupyterhub") is not None and proxy_command() is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.stem for p in NOTEBOOKS if not (p.stem == "00_start_here" and _hub_runs_00())])
def test_every_student_version_runs_to_the_end_saying_not_attempted(course, name):
    root, labs = course
    lab = next(lab for lab in labs if lab.name == name)
    work = root / "students-run" / name   # a copy: the release stays as nbgrader wrote it
    shutil.copytree(lab.release.parent, work)
    from labkit.runtime.stress import run_notebook

    cells = run_notebook(work / lab.release.name, timeout=480)  # a kernel of its own, shut down at the end
    bad = [c for c in cells if c["state"] != "ok"]
    assert not bad, f"cell {bad[0]['cell']}: {bad[0]['state']}: {bad[0]['detail'][:3000]}\n{bad[0]['text'][-2000:]}"
    lost = [c["cell"] for c in cells if "reply lost" in c["detail"]]
    if lost:
        print(f"{name}: the kernel's reply to cells {lost} was lost after it went idle; the run went on")
    nb = json.loads((work / lab.release.name).read_text())["cells"]
    graded_cells = [i for i, c in enumerate(nb) if c["metadata"].get("nbgrader", {}).get("grade")]
    said = {c["cell"]: c["text"] for c in cells}
    assert len(graded_cells) == len(lab.exercises) and set(graded_cells) <= set(said), "the run did not reach the end"
    assert all("not attempted yet" in said[i] for i in graded_cells), [said[i] for i in graded_cells]


# --- autograde: two students and a corrupt file -----------------------------------------------------------------------

LAB = "03_model_parallel"     # two exercises, one of the quicker notebooks to run twice


def _answer(student_nb: Path, teacher_nb: Path, wrong: dict[str, str] | None = None, raise_in: int | None = None,
            skip: tuple[str, ...] = ()):
    """A student's submission: the hand-out with the teacher's answers pasted in (or ``wrong`` ones, by grade_id;
    the ones in ``skip`` left as handed out), and optionally a cell of their own that raises."""
    import nbformat

    nb = nbformat.read(str(student_nb), as_version=4)
    answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in nbformat.read(str(teacher_nb), as_version=4).cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    for c in nb.cells:
        gid = c.metadata.get("nbgrader", {}).get("grade_id")
        if c.metadata.get("nbgrader", {}).get("solution") and gid not in skip:
            text = (wrong or {}).get(gid, answers[gid])
            c.source = "\n".join(ln for ln in text.split("\n") if "### BEGIN SOLUTION" not in ln
                                 and "### END SOLUTION" not in ln)
    if raise_in is not None:
        nb.cells.insert(raise_in, nbformat.v4.new_code_cell("raise RuntimeError('a student cell that raises')"))
    return nb


@pytest.mark.slow
def test_autograde_export_and_feedback_for_two_students_and_a_corrupt_submission(course, capsys):
    import nbformat

    root, labs = course
    lab = next(lab for lab in labs if lab.name == LAB)
    teacher = REPO / "notebooks" / lab.source.name
    first, second = (e.grade_id for e in lab.exercises)
    sub = root / "submitted"
    for student in ("alice", "bob", "carol"):
        (sub / student / LAB).mkdir(parents=True)
    nbformat.write(_answer(lab.release, teacher), str(sub / "alice" / LAB / lab.release.name))
    solution_id = first.removesuffix("-check")
    wrong = {solution_id: "def row_parallel_conv(x, conv, world):\n    return conv(x) * 0   # wrong on purpose\n"}
    skipped = second.removesuffix("-check")  # bob leaves the second exercise as handed out: not attempted
    nbformat.write(_answer(lab.release, teacher, wrong=wrong, raise_in=3, skip=(skipped,)),
                   str(sub / "bob" / LAB / lab.release.name))
    (sub / "carol" / LAB / lab.release.name).write_text('{"cells": [ this is not a notebook')
    t0 = time.perf_counter()
    results = {g.student: g for g in grading.autograde(root, LAB)}
    print(f"autograde of 3 submissions: {time.perf_counter() - t0:.0f} s")
    alice, bob, carol = results["alice"], results["bob"], results["carol"]
    assert alice.ok and bob.ok, (alice.error, bob.error)
    assert {e.grade_id: e.score for e in alice.exercises} == {e.grade_id: e.points for e in lab.exercises}
    assert {e.grade_id: e.score for e in bob.exercises} == {first: 0.0, second: 0.0}  # wrong; not attempted
    assert not carol.ok and carol.error, "a corrupt submission is reported for that student"
    # the gradebook, read through nbgrader's own API
    assert [(e.grade_id, e.score, e.points) for e in grading.scores(root, LAB, "alice")] == [
        (e.grade_id, e.points, e.points) for e in lab.exercises]
    # the CSVs: per exercise (labkit's exporter plugin) and nbgrader's totals
    rows = list(csv.DictReader(open(grading.export_csv(root, root / "exercises.csv"))))
    points = {(r["student_id"], r["grade_id"]): float(r["score"]) for r in rows if r["assignment"] == LAB}
    assert {k: v for k, v in points.items() if k[0] != "carol"} == {
        ("alice", first): lab.exercises[0].points, ("alice", second): lab.exercises[1].points,
        ("bob", first): 0.0, ("bob", second): 0.0}
    assert all(v == 0.0 for k, v in points.items() if k[0] == "carol")  # nbgrader enters the corrupt one with 0
    totals = {r["student_id"]: float(r["score"]) for r in
              csv.DictReader(open(grading.export_csv(root, root / "grades.csv", per_exercise=False)))
              if r["assignment"] == LAB}
    assert totals["alice"] == lab.points and totals["bob"] == 0.0
    assert totals.get("carol", 0.0) == 0.0
    # feedback says what the check said: the failing case and the hint
    html = {p.parts[-3]: p.read_text() for p in grading.feedback(root, LAB)}
    assert set(html) == {"alice", "bob"}
    assert "FAILED" in html["bob"] and "hint:" in html["bob"] and "a student cell that raises" in html["bob"]
    assert "an exercise not attempted scores no points" in html["bob"]
    assert len(re.findall(r"passed \((\d+)/\1\)", html["alice"])) == 2 and "FAILED" not in html["alice"]
    # the command line: the corrupt one again (instant), reported by name, and the exit code says so
    capsys.readouterr()
    assert grading.main(["grade", str(root), LAB, "--students", "carol"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"carol\s+NOT GRADED: \S", out) and (root / f"{LAB}-exercises.csv").is_file(), out
