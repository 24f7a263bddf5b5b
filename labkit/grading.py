"""The classroom's hand-out, grading and feedback, done by nbgrader itself (https://nbgrader.readthedocs.io).

The notebooks in ``notebooks/`` are the instructor versions. Each exercise is an nbgrader *solution cell* (the answer
between ``### BEGIN SOLUTION`` and ``### END SOLUTION``) followed by a locked, autograded *test cell* that calls the
lab's check through :func:`labkit.checks.graded`, worth the points in its metadata. The checks stay the one source of
truth: nbgrader only decides where a cell's points go (a test cell that raises scores zero).

- :func:`handout` lays out an nbgrader course directory (``source/``, ``release/``, ``gradebook.db`` and the course's
  ``nbgrader_config.py``) and writes the student versions with ``nbgrader generate_assignment``: nbgrader's
  ``ClearSolutions`` turns each answer into ``raise NotImplementedError()``, and ``ComputeChecksums`` records the
  cells so that ``autograde`` restores the locked test cells a student may have edited.
- :func:`autograde` runs ``nbgrader autograde`` for each submission in ``submitted/<student>/<lab>/`` and reads the
  points per exercise back from the gradebook; a submission nbgrader cannot grade (a corrupt file, say) is reported
  for that student and the others are still graded.
- :class:`ExerciseCsvExport` is an nbgrader export plugin: one row per student and exercise (nbgrader's own CSV has
  one total per assignment). ``nbgrader export --exporter=labkit.grading.ExerciseCsvExport``.
- :func:`feedback` runs ``nbgrader generate_feedback``: the student's HTML shows each test cell's output, that is
  what the check said (the failing cases and the hint).

Command line: ``python -m labkit handout DIR`` and ``python -m labkit grade DIR LAB``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# The course's nbgrader configuration, written into a course directory by handout() unless one is there already
# (a teacher's edits are kept). Every option below is nbgrader's own; see its "Configuration options" page.
COURSE_CONFIG = '''\
"""nbgrader configuration for a labkit course (written by `python -m labkit handout`; edit freely, it is kept)."""
import os

c = get_config()  # noqa: F821  (nbgrader provides it)

# The course directory is the folder this file is in: source/ (instructor notebooks), release/ (student versions),
# submitted/<student>/<lab>/ (what `nbgrader collect` gathers), autograded/, feedback/, gradebook.db.
c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.course_id = "labkit"

# The exchange through which `nbgrader release_assignment`, students' Fetch/Submit and `nbgrader collect` pass
# notebooks on a shared server. It must exist and be writable by everyone (chmod 777) before the first release.
c.Exchange.root = os.environ.get("LABKIT_NBGRADER_EXCHANGE", "/srv/nbgrader/exchange")

# A check launches real processes and, on a busy classroom server, can take minutes: nbgrader's default of 30 s per
# cell would mark correct answers wrong. A cell still running after this long is interrupted and scores zero.
c.Execute.timeout = 900
c.Execute.interrupt_on_timeout = True

# nbgrader runs notebooks with nbclient, which can leave a widget cell's reply unread until that timeout (labkit issue
# 32: labkit/runtime/zmq_rearm.py says why); labkit's fix, for `nbgrader autograde` run by hand too.
try:
    from labkit.runtime import zmq_rearm
    zmq_rearm.install()
except ImportError:
    pass

# The stub the student sees in place of each answer: the course's convention (a check says "not attempted yet").
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\\nraise NotImplementedError()"}
'''


@dataclass
class Exercise:
    grade_id: str
    points: float
    score: float | None = None       # after grading


@dataclass
class Lab:
    name: str                        # the nbgrader assignment id: the notebook's stem, e.g. 00_start_here
    source: Path
    release: Path | None = None
    exercises: list[Exercise] = field(default_factory=list)

    @property
    def points(self) -> float:
        return sum(e.points for e in self.exercises)


@dataclass
class Graded:
    student: str
    lab: str
    ok: bool                          # nbgrader graded the submission
    exercises: list[Exercise] = field(default_factory=list)
    error: str = ""                   # why not, when not ok

    @property
    def score(self) -> float:
        return sum(e.score or 0.0 for e in self.exercises)

    @property
    def max_score(self) -> float:
        return sum(e.points for e in self.exercises)


def _nbgrader():
    try:
        import nbgrader  # noqa: F401
    except ImportError as e:
        raise ImportError("the classroom needs nbgrader: pip install -r requirements.txt "
                          "(or pip install nbgrader)") from e


def exercises_of(notebook: str | Path) -> list[Exercise]:
    """The autograded test cells of a notebook (``nbgrader.grade`` true), in order, with their points."""
    nb = json.loads(Path(notebook).read_text())
    out = []
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade") and not meta.get("solution"):
            out.append(Exercise(meta["grade_id"], float(meta["points"])))
    return out


def _config(course: Path):
    from traitlets.config.loader import PyFileConfigLoader

    path = course / "nbgrader_config.py"
    if not path.is_file():
        raise FileNotFoundError(f"{course} is not a course directory: no nbgrader_config.py in it; "
                                f"make one with `python -m labkit handout {course}`")
    cfg = PyFileConfigLoader(path.name, str(course)).load_config()
    cfg.CourseDirectory.root = str(course.resolve())
    return cfg


def _convert(course: Path, converter: str, lab: str, student: str | None = None, update=None, **settings) -> dict:
    """Run one of nbgrader's converters (what ``nbgrader generate_assignment|autograde|generate_feedback`` run) on the
    course; returns nbgrader's ``{"success", "error", "log"}`` (``nbgrader.utils.capture_log``)."""
    _nbgrader()
    from nbgrader import converters

    from .runtime import zmq_rearm

    zmq_rearm.install()        # nbgrader executes with nbclient: a widget cell's reply must not strand
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.utils import capture_log

    cfg = _config(course)
    coursedir = CourseDirectory(config=cfg)
    coursedir.assignment_id = lab
    if student is not None:
        coursedir.student_id = student
    app = getattr(converters, converter)(coursedir=coursedir, config=cfg)
    if update is not None:
        app.update_config(update)
    for k, v in settings.items():
        setattr(app, k, v)
    with _tools_on_path():
        return capture_log(app)


@contextlib.contextmanager
def _tools_on_path():
    """nbgrader runs the ``alembic`` command (its database migrations) from PATH: make it this Python's own, also
    when the environment was not activated (``.venv/bin/python -m labkit ...``)."""
    bindir = str(Path(sys.executable).parent)
    old = os.environ.get("PATH", "")
    if bindir in old.split(os.pathsep):
        yield
        return
    os.environ["PATH"] = bindir + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _labs(notebooks: Path, labs: list[str] | None) -> list[Path]:
    found = sorted(p for p in notebooks.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no lab notebooks (NN_name.ipynb) in {notebooks}; pass source= the notebooks folder")
    if not labs:
        return found
    chosen = [p for p in found if any(p.stem == w or p.stem.startswith(w) for w in labs)]
    unknown = [w for w in labs if not any(p.stem == w or p.stem.startswith(w) for p in found)]
    if unknown:
        raise ValueError(f"labs={unknown!r}: no such notebook in {notebooks}; pass numbers or names such as "
                         f"{', '.join(p.stem[:2] for p in found)} or {found[0].stem}")
    return chosen


def handout(dest: str | Path, labs: list[str] | None = None, source: str | Path | None = None) -> list[Lab]:
    """Make (or update) the nbgrader course directory ``dest`` and write the student versions of ``labs``.

    ``labs``: notebook numbers or names (``["00", "01"]``); all by default. ``source``: the instructor notebooks
    (default: the course's ``notebooks/``). Returns each lab with its released notebook and exercises.
    """
    dest = Path(dest).resolve()
    source = Path(source) if source is not None else REPO_NOTEBOOKS
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"dest={str(dest)!r} is a file; pass a folder for the course directory")
    chosen = _labs(source, labs)
    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / "nbgrader_config.py").exists():
        (dest / "nbgrader_config.py").write_text(COURSE_CONFIG)
    out = []
    for nb in chosen:
        lab = Lab(nb.stem, dest / "source" / nb.stem / nb.name, exercises=exercises_of(nb))
        if not lab.exercises:
            raise ValueError(f"{nb.name} has no autograded test cell (nbgrader metadata grade: true); "
                             "every lab notebook ends its exercises with one")
        lab.source.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(nb, lab.source)
        res = _convert(dest, "GenerateAssignment", lab.name, force=True, create_assignment=True)
        if not res["success"]:
            raise RuntimeError(f"nbgrader generate_assignment {lab.name} failed:\n{res.get('error', '')}\n"
                               f"{res.get('log', '')}")
        lab.release = dest / "release" / lab.name / nb.name
        if not lab.release.is_file():
            raise RuntimeError(f"nbgrader reported success but wrote no {lab.release}:\n{res.get('log', '')}")
        out.append(lab)
    return out


def autograde(course: str | Path, lab: str, students: list[str] | None = None) -> list[Graded]:
    """``nbgrader autograde`` each submission of ``lab`` in ``course/submitted/``; the points per exercise.

    A student whose submission nbgrader cannot grade gets ``ok=False`` and the reason; the others are graded.
    """
    course = Path(course).resolve()
    _config(course)  # a clear error when it is not a course directory
    submitted = sorted(p.parent.name for p in (course / "submitted").glob(f"*/{lab}") if p.is_dir())
    if students:
        missing = sorted(set(students) - set(submitted))
        if missing:
            raise ValueError(f"students={missing!r} have no submission of {lab} in {course / 'submitted'}; "
                             f"submitted: {submitted}")
        submitted = [s for s in submitted if s in students]
    if not submitted:
        raise FileNotFoundError(f"no submissions of {lab!r} in {course / 'submitted'} "
                                f"(expected submitted/<student>/{lab}/<notebook>.ipynb, as `nbgrader collect` makes)")
    out = []
    for student in submitted:
        res = _convert(course, "Autograde", lab, student, force=True, create_student=True)
        if not res["success"]:
            out.append(Graded(student, lab, False, error=_last_error(res)))
            continue
        out.append(Graded(student, lab, True, exercises=scores(course, lab, student)))
    return out


def _last_error(res: dict) -> str:
    text = (res.get("error") or "") + "\n" + (res.get("log") or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors[-1] if errors else lines[-1] if lines else "nbgrader gave no reason")[:400]


def scores(course: str | Path, lab: str, student: str) -> list[Exercise]:
    """The gradebook's points per autograded test cell of one submission (after :func:`autograde`), in the
    notebook's order."""
    from nbgrader.api import Gradebook

    course = Path(course).resolve()
    order = {e.grade_id: i for nb in sorted((course / "source" / lab).glob("*.ipynb")) for i, e in
             enumerate(exercises_of(nb))}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        sub = gb.find_submission(lab, student)
        found = [Exercise(g.name, float(g.max_score), float(g.score))
                 for nb in sub.notebooks for g in nb.grades if g.cell.cell_type == "code"]
    return sorted(found, key=lambda e: (order.get(e.grade_id, len(order)), e.grade_id))


def feedback(course: str | Path, lab: str) -> list[Path]:
    """``nbgrader generate_feedback``: the HTML each graded student gets back (``feedback/<student>/<lab>/``)."""
    course = Path(course).resolve()
    from traitlets.config import Config

    template = Config()
    template.HTMLExporter.template_name = "feedback"  # as nbgrader's own API does
    res = _convert(course, "GenerateFeedback", lab, update=template, force=True)
    if not res["success"]:
        raise RuntimeError(f"nbgrader generate_feedback {lab} failed:\n{res.get('error', '')}\n{res.get('log', '')}")
    return sorted((course / "feedback").glob(f"*/{lab}/*.html"))


def _export_plugin():
    from nbgrader.plugins import ExportPlugin

    class ExerciseCsvExport(ExportPlugin):
        """One CSV row per student and exercise: assignment, student_id, grade_id, score, max_score.

        ``nbgrader export --exporter=labkit.grading.ExerciseCsvExport --to=exercises.csv``
        """

        def export(self, gradebook) -> None:
            from nbgrader.api import MissingEntry

            dest = self.to or "exercises.csv"
            with open(dest, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["assignment", "student_id", "notebook", "grade_id", "score", "max_score"])
                for assignment in gradebook.assignments:
                    if self.assignment and assignment.name not in self.assignment:
                        continue
                    for student in gradebook.students:
                        if self.student and student.id not in self.student:
                            continue
                        try:
                            sub = gradebook.find_submission(assignment.name, student.id)
                        except MissingEntry:
                            continue  # nothing submitted (or not gradable): no rows, the totals CSV says 0
                        for nb in sub.notebooks:
                            for g in sorted(nb.grades, key=lambda g: g.name):
                                w.writerow([assignment.name, student.id, nb.name, g.name, g.score, g.max_score])
            self.log.info("Exported points per exercise to %s", dest)

    return ExerciseCsvExport


def __getattr__(name):  # nbgrader's --exporter imports the class by name; build it only when nbgrader is there
    if name == "ExerciseCsvExport":
        return _export_plugin()
    raise AttributeError(name)


def export_csv(course: str | Path, to: str | Path, per_exercise: bool = True) -> Path:
    """``nbgrader export``: one row per student and exercise (default), or nbgrader's own totals CSV."""
    import subprocess

    course = Path(course).resolve()
    cmd = [sys.executable, "-m", "nbgrader", "export", f"--to={Path(to).resolve()}"]
    if per_exercise:
        cmd.append("--exporter=labkit.grading.ExerciseCsvExport")
    with _tools_on_path():
        proc = subprocess.run(cmd, cwd=course, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"nbgrader export failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return Path(to)


def _report(graded: list[Graded]) -> str:
    lines = []
    for g in graded:
        if not g.ok:
            lines.append(f"{g.student:>16}  NOT GRADED: {g.error}")
            continue
        parts = ", ".join(f"{e.grade_id.removesuffix('-check')} {e.score:g}/{e.points:g}" for e in g.exercises)
        lines.append(f"{g.student:>16}  {g.score:g}/{g.max_score:g}  ({parts})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit handout DIR [LAB ...]`` and ``python -m labkit grade DIR LAB``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m labkit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("handout", help="write the student versions through nbgrader into the course directory DIR")
    h.add_argument("dir")
    h.add_argument("labs", nargs="*", help="notebook numbers or names (default: all)")
    h.add_argument("--source", default=None, help="the instructor notebooks (default: the course's notebooks/)")
    g = sub.add_parser("grade", help="autograde every submission of LAB in DIR/submitted, export CSVs, write feedback")
    g.add_argument("dir")
    g.add_argument("lab", help="the assignment, e.g. 00_start_here")
    g.add_argument("--students", nargs="*", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "handout":
        labs = handout(args.dir, args.labs or None, args.source)
        for lab in labs:
            print(f"{lab.name}: {len(lab.exercises)} exercises, {lab.points:g} points -> {lab.release}")
        print(f"\nstudent versions in {Path(args.dir).resolve() / 'release'}; next: nbgrader release_assignment "
              f"{labs[0].name} (from {Path(args.dir).resolve()}), or let the hub copy release/ into each home")
        return 0
    graded = autograde(args.dir, args.lab, args.students)
    print(_report(graded))
    course = Path(args.dir)
    print("per exercise:", export_csv(course, course / f"{args.lab}-exercises.csv"))
    print("totals:      ", export_csv(course, course / "grades.csv", per_exercise=False))
    if any(g.ok for g in graded):
        print("feedback:    ", *feedback(course, args.lab), sep="\n  ")
    return 0 if all(g.ok for g in graded) else 1
