"""The report of a study: per configuration, its mean metric and its paired difference to the baseline.

For each configuration the seeds it shares with the baseline (both finished) are paired; the difference
``variant - baseline`` per seed gives the mean difference, its 95 % confidence interval (t distribution over the
seeds, or a percentile bootstrap), the paired t-test's p-value, and how many seeds the variant won, tied and lost.
The p-values are adjusted for the number of comparisons by Holm's step-down method: with ten variants, one of them
clears an unadjusted p < 0.05 by luck alone far more often than one time in twenty. For a metric where lower is
better (``lower_is_better``), differences are reported as they are but wins are counted the other way.

:class:`Report` holds the rows and turns them into a text table, HTML (in a notebook), CSV and a pandas DataFrame;
:mod:`labkit.ablation.plots` draws the differences with their intervals (``plots.differences(report.rows)``) and the
learning curves (``plots.curves(report.curves)``).
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field

from .._validate import validate_choice, validate_number
from .stats import MIN_SEEDS, TOO_FEW, ZERO_VARIANCE, holm, paired_difference
from .store import Store
from .study import spec_keys

__all__ = ["Report", "report", "selection_bias", "display_rows", "COLUMNS", "MISSING"]

COLUMNS = ("label", "n", "mean", "diff", "lo", "hi", "p", "p_holm", "wins", "ties", "losses", "verdict")


def _verdict(row: dict, alpha: float, lower_is_better: bool) -> str:
    if row["label"] == "baseline":
        return ""
    if row.get("status"):  # no test was possible: "too few seeds" or "zero variance"
        return row["status"]
    p = row.get("p_holm")
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return TOO_FEW
    if p >= alpha:
        return "no evidence"
    better = row["diff"] < 0 if lower_is_better else row["diff"] > 0
    return "helps" if better else "hurts"


MISSING = "\u2014"  # what a table prints where a statistic was not computed (an em dash)


def _cell(value):
    """A table cell: a number that was not computed (nan, None) prints as an em dash, never as "nan" or 0."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return value


def display_rows(rows, columns=COLUMNS) -> list[dict]:
    """``rows`` (a report's, or a subset of them) reduced to ``columns``, ready for a table: a statistic that was
    not computed (the baseline's difference, an interval from too few seeds) reads "\u2014"."""
    return [{c: (_cell(r[c]) if c in r else "") for c in columns} for r in rows]


@dataclass
class Report:
    study: str
    metric: str
    rows: list
    baseline_seeds: list
    method: str = "t"
    confidence: float = 0.95
    missing: dict = field(default_factory=dict)      # {label: seeds without a finished trial}
    failed: dict = field(default_factory=dict)       # {"label seed=s": error}
    interrupted: int = 0                             # trials that a stopped study interrupted (then run again)
    curves: dict = field(default_factory=dict)       # {label: [curve of seed, ...]} when trials recorded curves
    lower_is_better: bool = False

    # ------------------------------------------------------------------ views
    def table(self, floatfmt: str = "{:.4g}") -> str:
        from ..viz import format_table

        return format_table(display_rows(self.rows), floatfmt) + self._notes()

    def _notes(self) -> str:
        out = [f"\n{self.metric}: paired difference to the baseline over seeds, "
               f"{self.confidence:.0%} {'t' if self.method == 't' else 'bootstrap'} interval [lo, hi]; "
               "p: paired t-test; p_holm: adjusted for the number of comparisons (Holm); verdict from p_holm"]
        why = {TOO_FEW: f"fewer than {MIN_SEEDS} paired seeds",
               ZERO_VARIANCE: "every seed gave the same difference, so the noise cannot be estimated"}
        for verdict, reason in why.items():
            untested = [r["label"] for r in self.rows if r.get("verdict") == verdict]
            if untested:
                out.append(f"no interval or p-value ({MISSING}) for {', '.join(untested)}: {reason} ({verdict})")
        if self.interrupted:
            out.append(f"{self.interrupted} trial(s) were interrupted by a stopped study and were run again from their "
                       "start")
        for label, seeds in self.missing.items():
            out.append(f"{label}: no finished result for seed(s) {seeds}")
        for what, err in self.failed.items():
            out.append(f"failed: {what}: {err}")
        return "\n".join(out)

    def _repr_html_(self) -> str:
        notes = self._notes().strip().replace("\n", "<br>")
        return self.html(notes=notes)

    def html(self, labels=None, columns=COLUMNS, notes: str = "") -> str:
        """The table as HTML: only the rows of ``labels`` (all by default) and the ``columns`` given; a statistic
        that was not computed reads "\u2014"."""
        from ..viz import table_html

        rows = self.rows if labels is None else [self.row(lab) for lab in labels]
        return table_html(display_rows(rows, columns)) + (f"<p><small>{notes}</small></p>" if notes else "")

    def __str__(self) -> str:
        return self.table()

    def row(self, label: str) -> dict:
        for r in self.rows:
            if r["label"] == label:
                return r
        raise KeyError(f"no configuration {label!r} in the report; labels are: {[r['label'] for r in self.rows]}")

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """The table as CSV (one row per configuration, the per-seed values in ``values``); written to ``path``
        when given; returns the text."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(COLUMNS + ("values",))
        for r in self.rows:
            w.writerow([r.get(c, "") for c in COLUMNS] + [" ".join(f"{v:.6g}" for v in r["values"])])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", newline="") as f:
                f.write(text)
        return text

    def to_pandas(self):
        """The table as a pandas DataFrame (pandas is optional: a clear error says how to install it)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install pandas (or use to_csv() / .rows)") from None
        return pd.DataFrame([{c: r.get(c) for c in COLUMNS + ("values",)} for r in self.rows])


def report(db: str | os.PathLike | Store, study: str | None = None, *, metric: str | None = None,
           lower_is_better: bool | None = None, method: str = "t", confidence: float = 0.95, alpha: float = 0.05,
           n_boot: int = 10000, seed: int = 0) -> Report:
    """The :class:`Report` of ``study`` (the only one in the file, by default) from its results file.

    ``metric``: another number the trials returned (e.g. ``"loss"``, the test cross-entropy) instead of the
    study's metric; ``lower_is_better`` then says which way is better (default: the study's setting)."""
    method = validate_choice("method", method, ("t", "bootstrap"))
    confidence = validate_number("confidence", confidence, minimum=0, maximum=1, open_low=True, open_high=True)
    if not isinstance(db, Store) and not os.path.exists(db):
        raise ValueError(f"results file {os.fspath(db)} does not exist; run the study first (run_study or python -m "
                         "labkit ablate STUDY.toml)")
    store = db if isinstance(db, Store) else Store(db)
    try:
        specs = store.studies()
        if not specs:
            raise ValueError(f"results file {store.path} holds no study yet; run one first")
        if study is None:
            if len(specs) > 1:
                raise ValueError(f"results file {store.path} holds several studies ({', '.join(specs)}); pass study=")
            study = next(iter(specs))
        if study not in specs:
            raise ValueError(f"results file {store.path} has no study {study!r}; it has: {', '.join(specs)}")
        spec = specs[study]
        keys = spec_keys(spec)
        rows = [dict(r, label=keys[r["key"]][0]) for r in store.rows() if r["key"] in keys]
    finally:
        if not isinstance(db, Store):
            store.close()
    seeds, labels, low = spec["seeds"], spec["labels"], spec.get("lower_is_better", False)
    if lower_is_better is not None:
        low = bool(lower_is_better)
    own = metric is None or metric == spec["metric"]
    metric = spec["metric"] if metric is None else metric
    if not own and not any(r["result"] and metric in r["result"] for r in rows if r["status"] == "done"):
        raise ValueError(f"no finished trial of {study!r} returned {metric!r}; the study's metric is "
                         f"{spec['metric']!r}")
    done: dict[str, dict[int, float]] = {lab: {} for lab in labels}
    curves: dict[str, list] = {}
    failed, interrupted = {}, 0
    for r in rows:
        interrupted += r["interrupted"]
        if r["label"] not in done:  # a configuration no longer in the study (its spec changed): not reported
            continue
        if r["status"] == "done":
            done[r["label"]][r["seed"]] = r["value"] if own else float(r["result"][metric])
            if r["result"] and "curve" in r["result"]:
                curves.setdefault(r["label"], []).append(r["result"]["curve"])
        elif r["status"] == "failed":
            failed[f"{r['label']} seed={r['seed']}"] = r["error"]
    base = done["baseline"]
    out, missing = [], {}
    for lab in labels:
        got = done[lab]
        miss = [s for s in seeds if s not in got]
        if miss:
            missing[lab] = miss
        vals = [got[s] for s in seeds if s in got]
        row = {"label": lab, "n": len(vals), "mean": sum(vals) / len(vals) if vals else math.nan, "values": vals}
        if lab != "baseline":
            common = [s for s in seeds if s in got and s in base]
            if common:
                d = paired_difference([got[s] for s in common], [base[s] for s in common],
                                            confidence=confidence, method=method, n_boot=n_boot, seed=seed)
                row.update(n=len(common), diff=d["diff"], lo=d["lo"], hi=d["hi"], p=d["p"], wins=d["wins"],
                           ties=d["ties"], losses=d["losses"], status=d["status"])
                if low:
                    row["wins"], row["losses"] = d["losses"], d["wins"]
                if d.get("note"):
                    row["note"] = d["note"]
            else:
                row.update(n=0, diff=math.nan, lo=math.nan, hi=math.nan, p=math.nan, wins=0, ties=0, losses=0,
                           status=TOO_FEW)
        out.append(row)
    ps = [r["p"] for r in out if r["label"] != "baseline"]
    for r, ph in zip([r for r in out if r["label"] != "baseline"], holm(ps) if ps else []):
        r["p_holm"] = ph
    for r in out:
        r["verdict"] = _verdict(r, alpha, low)
    return Report(study=study, metric=metric, rows=out, baseline_seeds=sorted(base), method=method,
                  confidence=confidence, missing=missing, failed=failed, interrupted=interrupted, curves=curves,
                  lower_is_better=low)


def selection_bias(db: str | os.PathLike | Store, study: str | None = None) -> dict:
    """What "train several models and keep the best" overstates, measured on a finished study's own trials.

    For each seed ``s``: pick the configuration with the best metric on seed ``s`` alone (the article's "best of
    N"), note that winning score, then score the same pick on the *other* seeds (fresh seeds it was not chosen
    on). ``bias`` is the mean of (winning score - the pick's mean on fresh seeds): how much the choice flatters
    the winner. It is positive whenever the configurations differ little compared with the seed noise, because
    the maximum of N noisy numbers sits above their means. Needs at least two seeds with every configuration
    finished."""
    rep = report(db, study)
    labels = [r["label"] for r in rep.rows]
    store = db if isinstance(db, Store) else Store(db)
    try:
        keys = spec_keys(store.studies()[rep.study])
        rows = [dict(r, label=keys[r["key"]][0]) for r in store.rows(status="done") if r["key"] in keys]
    finally:
        if not isinstance(db, Store):
            store.close()
    table: dict[int, dict[str, float]] = {}
    for r in rows:
        table.setdefault(r["seed"], {})[r["label"]] = r["value"]
    seeds = sorted(s for s, got in table.items() if all(lab in got for lab in labels))
    if len(seeds) < 2:
        raise ValueError(f"selection_bias needs at least two seeds on which every configuration finished; "
                         f"{len(seeds)} have ({seeds}). Run more seeds (or wait for the study to finish)")
    sign = -1.0 if rep.lower_is_better else 1.0
    picks = []
    for s in seeds:
        best = max(labels, key=lambda lab: sign * table[s][lab])
        fresh = [table[t][best] for t in seeds if t != s]
        picks.append({"seed": s, "pick": best, "score when picked": table[s][best],
                      "score on fresh seeds": sum(fresh) / len(fresh)})
    bias = sum(p["score when picked"] - p["score on fresh seeds"] for p in picks) / len(picks)
    return {"configurations": len(labels), "seeds": seeds, "picks": picks, "bias": bias,
            "picked_mean": sum(p["score when picked"] for p in picks) / len(picks),
            "fresh_mean": sum(p["score on fresh seeds"] for p in picks) / len(picks)}
