"""Lab 08's rank function, the notebook's helpers, the exercise checks and the tour.

* :func:`study_rank`: each rank runs one shard of a study (``shard=rank/world_size``) into its own results file,
  then rank 0 merges the shards: what a Slurm job array does across machines, here across ranks.
* :func:`start_in_background` / :func:`wait_for`: the notebook runs a study as ``python -m labkit ablate`` in a
  separate process, so that a cell can kill it with SIGKILL in the middle and the next cell can resume it.
* :func:`check_verdict`: the learner's ``verdict(row) -> "helps" | "hurts" | "no evidence"`` on rows whose intervals
  and adjusted p-values the check knows (means that differ by more than the noise, a raw p below 0.05 that Holm's
  adjustment lifts, small effects that are consistent).
* :func:`check_factor`: the learner's own :class:`~labkit.ablation.factors.Factor`: new (not a shipped one renamed),
  it changes the recipe and the trained model, and a study in the given results file ran it.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time

from ..checks import CheckResult, calls_to, expect_equal, refuse, run_cases
from ..tour import lab_name
from . import stats as _stats
from .factors import FACTORS, Factor
from .reporting import _verdict, report
from .runner import run_study
from .store import Store, merge
from .study import Study

__all__ = ["study_rank", "start_in_background", "wait_for", "write_study_file", "verdict_rows", "check_verdict",
           "check_factor", "tour", "LAB"]

LAB = lab_name(__package__)


def study_rank(ctx, spec: dict, folder: str, workers: int = 1) -> dict:
    """Run shard ``rank/world_size`` of ``Study(**spec)`` into ``folder/shard{rank}.db``; rank 0 then merges every
    shard into ``folder/study.db``. Returns this rank's counts (and rank 0's merge counts)."""
    import torch.distributed as dist

    study = Study(**spec)
    mine = os.path.join(folder, f"shard{ctx.rank}.db")
    got = run_study(study, mine, workers=workers, shard=(ctx.rank, ctx.world_size), progress=False, echo=False)
    dist.barrier()
    out = {"rank": ctx.rank, "trials": got.total, "done": got.done, "failed": got.failed}
    if ctx.rank == 0:
        out["merged"] = merge(os.path.join(folder, "study.db"),
                              [os.path.join(folder, f"shard{r}.db") for r in range(ctx.world_size)])
    dist.barrier()
    return out


# ----------------------------------------------------------------------------- a study in another process
def write_study_file(path: str, study: dict) -> str:
    """Write ``study`` (``name``, ``seeds``, ``baseline``, ``factors``, optional ``design``) as a TOML study file."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"name = {value(study['name'])}", f"seeds = {value(list(study['seeds']))}"]
    for k in ("design", "grid", "metric"):
        if study.get(k) is not None:
            lines.append(f"{k} = {value(study[k])}")
    lines += ["", "[baseline]"] + [f"{k} = {value(v)}" for k, v in study["baseline"].items()]
    lines += ["", "[factors]"] + [f"{k} = {value(v)}" for k, v in study["factors"].items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def start_in_background(study_file: str, db: str, workers: int = 2) -> subprocess.Popen:
    """``python -m labkit ablate STUDY --db DB -j WORKERS`` in its own process (its output goes to ``DB.log``)."""
    from ..runtime.launcher import child_env

    log = open(db + ".log", "w")
    env = child_env(LABKIT_NO_PROGRESS="1")
    try:
        return subprocess.Popen([sys.executable, "-m", "labkit", "ablate", study_file, "--db", db, "-j", str(workers)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()


def wait_for(db: str, done: int, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> dict:
    """Wait until ``db`` holds ``done`` finished trials (or ``proc`` ends, or ``timeout`` seconds pass); return the
    counts. Never raises on a timeout: the counts say how far it got."""
    deadline = time.monotonic() + timeout
    counts = {"done": 0}
    while time.monotonic() < deadline:
        if os.path.exists(db):
            try:
                with Store(db) as st:
                    counts = st.counts()
            except Exception:  # the file is being created
                pass
        if counts.get("done", 0) >= done or (proc is not None and proc.poll() is not None):
            break
        time.sleep(0.1)
    return counts


# ----------------------------------------------------------------------------- exercise 1: read the table
def verdict_rows(seed: int = 0) -> list[tuple[str, dict, str]]:
    """Report rows with known answers, ``(what, row, expected verdict)``, built from paired samples drawn with
    ``seed``: each through the same statistics as the lab's report (t interval, Holm over the family)."""
    rng = random.Random(seed)
    n = 5
    specs = [  # (what, true mean difference, sd of the differences)
        ("a clear gain", 0.05, 0.01),
        ("a clear loss", -0.04, 0.01),
        ("a large mean difference with noise larger still", 0.03, 0.08),
        ("a small but very consistent gain", 0.006, 0.002),
        ("nothing", 0.0, 0.01),
    ]
    rows = []
    for what, mu, sd in specs:
        base = [0.9 + rng.gauss(0, 0.01) for _ in range(n)]
        var = [b + mu + rng.gauss(0, sd) for b in base]
        d = _stats.paired_difference(var, base)
        rows.append((what, {"label": what, "n": n, "mean": sum(var) / n, "diff": d["diff"], "lo": d["lo"],
                            "hi": d["hi"], "p": d["p"], "wins": d["wins"], "ties": d["ties"], "losses": d["losses"]}))
    # a raw p below 0.05 that the adjustment for 5 comparisons lifts above it
    base = [0.9 + rng.gauss(0, 0.01) for _ in range(n)]
    diffs = [0.012, 0.001, 0.016, 0.004, 0.010]
    d = _stats.paired_difference([b + x for b, x in zip(base, diffs)], base)
    rows.append(("p = {:.3f} before the adjustment".format(d["p"]),
                 {"label": "borderline", "n": n, "mean": sum(base) / n + d["diff"], "diff": d["diff"], "lo": d["lo"],
                  "hi": d["hi"], "p": d["p"], "wins": d["wins"], "ties": d["ties"], "losses": d["losses"]}))
    holm = _stats.holm([r["p"] for _, r in rows])
    out = []
    for (what, r), ph in zip(rows, holm):
        r["p_holm"] = ph
        expected = "no evidence" if ph >= 0.05 else ("helps" if r["diff"] > 0 else "hurts")
        out.append((what, r, expected))
    return out


def check_verdict(verdict, table=None) -> CheckResult:
    """``verdict(row) -> "helps" | "hurts" | "no evidence"`` for a report row (keys ``diff``, ``lo``, ``hi``, ``p``,
    ``p_holm``, ``wins``...), at a family-wise error rate of 5 %. Checked on rows with known answers drawn at check
    time and, when given, on the rows of ``table`` (a :class:`~labkit.ablation.reporting.Report`)."""
    seed = random.randrange(10**6)
    cases = []
    for what, row, expected in verdict_rows(seed):
        if "borderline" in row["label"] and row["p"] >= 0.05:
            continue  # the draw did not make a borderline case this time
        cases.append((what, row, expected))
    if table is not None:
        for r in table.rows:
            if r["label"] != "baseline" and r.get("p_holm") == r.get("p_holm"):  # not nan
                cases.append((f"your study's {r['label']}", dict(r), r["verdict"]))

    def one(row, expected):
        def case():
            with calls_to(_verdict, report) as seen:
                got = verdict({k: v for k, v in row.items() if k != "verdict"})
            refuse(seen, "read the row's columns yourself instead of asking labkit's report for its verdict")
            if got not in ("helps", "hurts", "no evidence"):
                raise AssertionError(f"verdict must return 'helps', 'hurts' or 'no evidence', got {got!r}")
            expect_equal(got, expected, what=f"the verdict for diff={row['diff']:+.4f}, interval "
                         f"[{row['lo']:+.4f}, {row['hi']:+.4f}], p={row['p']:.3g}, p_holm={row['p_holm']:.3g}")
        return case

    return run_cases("verdict(row)", [(what, one(row, exp)) for what, row, exp in cases],
                     hint="a difference counts only when the adjusted p-value (p_holm) is below 0.05; its sign says "
                          "helps or hurts. A large mean with a wide interval, or a raw p below 0.05, is not enough.")


# ----------------------------------------------------------------------------- exercise 2: your own factor
def check_factor(answer, db: str) -> CheckResult:
    """The learner's ``run_my_study(db) -> Factor``: it defines a factor of its own, runs a study of it into the
    results file ``db`` and returns the factor. Checked: the factor is new (not a shipped one renamed), its values
    change the recipe and the trained model, and ``db`` holds finished trials of it (two values, two seeds at least).
    A :class:`Factor` may be passed instead of the function (then ``db`` must already hold its study)."""
    from .training import BASELINE, Recipe, run_trial

    got = {}

    def runs():
        f = answer if isinstance(answer, Factor) else answer(db)
        if not isinstance(f, Factor):
            raise AssertionError(f"expected your function to return a labkit.ablation.Factor, got {type(f).__name__}; "
                                 "build one with Factor(name, values, apply=...)")
        got["f"] = f

    def is_new():
        f = got["f"]
        if f.name in FACTORS:
            raise AssertionError(f"{f.name!r} is one of the lab's factors; give yours a new name and behaviour")
        if any(f.apply is g.apply for g in FACTORS.values()):
            raise AssertionError("its apply is a shipped factor's apply under another name; write your own")
        if len(f.values) < 2:
            raise AssertionError("give at least two values: the baseline's and one to try")

    def changes_recipe():
        f, recipes = got["f"], []
        for v in f.values:
            r = Recipe.from_config(dict(BASELINE))
            f.apply(r, f.check(v))
            recipes.append(repr(r))
        if len(set(recipes)) < 2:
            raise AssertionError("every value of your factor gives the same recipe: apply(recipe, value) must change "
                                 "the recipe according to value")

    def changes_training():
        f, accs = got["f"], []
        for v in f.values[:2]:
            cfg = {**BASELINE, f.name: v, "steps": 20}
            accs.append(run_trial(cfg, 0, factors={f.name: f}, eval_every=20)["accuracy"])
        if accs[0] == accs[1]:
            raise AssertionError(f"20 steps with {f.name}={f.values[0]!r} and {f.values[1]!r} gave the same test "
                                 "accuracy bit for bit: the factor does not reach the training")

    def ran_in_study():
        f = got["f"]
        if not os.path.exists(db):
            raise AssertionError(f"{db} does not exist: run a study of your factor into it (run_study(study, db))")
        with Store(db) as st:
            rows = [r for r in st.rows(status="done") if f.name in r["config"]]
        values = {repr(r["config"][f.name]) for r in rows}
        seeds = {r["seed"] for r in rows}
        if len(values) < 2 or len(seeds) < 2:
            raise AssertionError(f"the results file holds {len(rows)} finished trial(s) with {f.name} "
                                 f"({len(values)} value(s), {len(seeds)} seed(s)); run a study with the baseline "
                                 "value and another, on at least two seeds")

    def needs(fn):
        def case():
            if "f" not in got:
                raise AssertionError("no factor to check (see the first case)")
            fn()
        return case

    return run_cases("your factor", [("your function returns a Factor", runs), ("it is a new factor", needs(is_new)),
                                     ("its values change the recipe", needs(changes_recipe)),
                                     ("its values change the trained model", needs(changes_training)),
                                     ("a study of it is in the results file", needs(ran_in_study))],
                     hint="Factor('dropout', [0.0, 0.3], apply=lambda r, v: setattr(r, 'dropout', v)) is the shape; "
                          "study it with Study(..., extra_factors=[f]) and a baseline value for it")


# ----------------------------------------------------------------------------- the tour
def tour(world_size: int = 2) -> list[dict]:
    """A tiny study (baseline and one change, 20 steps, on three seeds: the fewest the report gives an interval
    from) sharded over ``world_size`` ranks and merged; resumed, it runs nothing; its report has the change's paired
    interval."""
    from ..runtime.launcher import launch
    from ..tour import run_check
    from .training import BASELINE

    rows = []
    folder = tempfile.mkdtemp(prefix="labkit-ablation-")
    spec = {"name": "tour", "baseline": {**BASELINE, "steps": 20}, "factors": {"loss": ["smooth"]}, "seeds": [0, 1, 2]}
    state = {}

    def sharded():
        got = launch(study_rank, world_size, kwargs={"spec": spec, "folder": folder}, echo=False, quiet=True,
                     timeout=600)
        merged = got[0]["merged"]
        state["db"] = os.path.join(folder, "study.db")
        n = merged["added"]
        return n == 6, f"{world_size} shard(s) ran {sum(g['done'] for g in got)} trials; merged {n} of 6"

    def resumed():
        out = run_study(Study(**spec), state["db"], workers=1, progress=False, echo=False)
        return out.ran == 0 and out.already_done == 6, f"resuming ran {out.ran} trial(s), {out.already_done} kept"

    def reported():
        r = report(state["db"]).row("loss=smooth")
        return r["n"] == 3 and r["lo"] <= r["diff"] <= r["hi"], (f"loss=smooth - baseline = {r['diff']:+.3f} "
                                                                 f"[{r['lo']:+.3f}, {r['hi']:+.3f}] over 3 seeds")

    for name, fn in (("shards run and merge", sharded), ("resume runs nothing twice", resumed),
                     ("paired interval", reported)):
        rows.append(run_check(LAB, name, fn))
    return rows
