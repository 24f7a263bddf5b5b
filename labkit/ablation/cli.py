"""``python -m labkit ablate``: run, resume, report and merge studies from the command line.

::

    python -m labkit ablate STUDY.toml                 # run what is missing (again: resume), then print the report
    python -m labkit ablate STUDY.toml --report        # only the report, from the results file
    python -m labkit ablate STUDY.toml --shard 2/8     # one slice of the trials into STUDY.shard2of8.db
    python -m labkit ablate merge OUT.db IN.db ...     # combine shard files (refuses conflicting results)
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "default_db"]


def default_db(study_file: str, shard: tuple[int, int] | None = None) -> str:
    """``some/where/study.toml`` -> ``study.db`` in the current folder (``study.shard2of8.db`` for shard 2/8): the
    study file may live where nothing can be written (the example ships inside the installed package)."""
    stem = os.path.splitext(os.path.basename(study_file))[0]
    return f"{stem}.shard{shard[0]}of{shard[1]}.db" if shard else f"{stem}.db"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return _merge(argv[1:])
    p = argparse.ArgumentParser(prog="python -m labkit ablate", description="Run (or resume) an ablation study "
                                "from a TOML file and print its report. `ablate merge OUT IN...` combines shards.")
    p.add_argument("study", help="the study file (.toml); see labkit/ablation/example_study.toml")
    p.add_argument("--db", help="the results file (default: the study file's name with .db, in the current folder)")
    p.add_argument("-j", "--workers", type=int, default=None, help="worker processes (default: up to 4 CPU "
                   "workers with one thread each; one per GPU for a trial with uses_gpu = True)")
    p.add_argument("--shard", help="I/N: run only slice I of N (0-based), into its own results file")
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    p.add_argument("--trial-timeout", type=float, default=None, help="seconds before a trial is stopped and failed")
    p.add_argument("--report", action="store_true", help="print the report from the results file; run nothing")
    p.add_argument("--bootstrap", action="store_true", help="bootstrap intervals instead of t intervals")
    p.add_argument("--csv", help="also write the report as CSV to this path")
    p.add_argument("--seeds", help="override the study's seeds, e.g. 0,1,2")
    args = p.parse_args(argv)

    from .._validate import ArgumentError
    from .reporting import report
    from .runner import parse_shard, run_study
    from .store import StoreError
    from .study import StudyFileError, load_study

    try:
        shard = parse_shard(args.shard)
        over = {}
        if args.seeds:
            try:
                over["seeds"] = [int(s) for s in args.seeds.split(",")]
            except ValueError:
                raise ArgumentError(f"--seeds must be integers separated by commas, got {args.seeds!r}") from None
        study = load_study(args.study, **over)
        db = args.db or default_db(args.study, shard)
        failed = 0
        if not args.report:
            summary = run_study(study, db, workers=args.workers, shard=shard, retry_failed=args.retry_failed,
                                trial_timeout=args.trial_timeout)
            failed = summary.failed
        if shard and not args.report:
            print(f"shard {shard[0]}/{shard[1]} is in {db}; combine the shards with: python -m labkit ablate merge "
                  f"{default_db(args.study)} {default_db(args.study, (0, shard[1]))} ...")
            return 1 if failed else 0
        if not os.path.exists(db):
            raise StoreError(f"results file {db} does not exist yet; run the study first (without --report)")
        rep = report(db, study.name, method="bootstrap" if args.bootstrap else "t")
        print(rep.table())
        if args.csv:
            rep.to_csv(args.csv)
            print(f"wrote {args.csv}")
        return 1 if failed else 0
    except (StudyFileError, StoreError, ArgumentError, ValueError) as e:
        print(f"labkit ablate: error: {e}", file=sys.stderr)
        return 2


def _merge(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit ablate merge", description="Combine shard results files into "
                                "one; trials with the same hash must have the same results.")
    p.add_argument("out", help="the combined results file (created if missing)")
    p.add_argument("inputs", nargs="+", help="the shard files")
    args = p.parse_args(argv)
    from .store import MergeConflict, StoreError, merge

    try:
        got = merge(args.out, args.inputs)
    except MergeConflict as e:
        print(f"labkit ablate merge: refused: {e}", file=sys.stderr)
        for k in e.keys[:20]:
            print(f"  conflicting trial {k}", file=sys.stderr)
        return 1
    except StoreError as e:
        print(f"labkit ablate merge: error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(args.inputs)} file(s) into {args.out}: {got['added']} trials added, {got['same']} already "
          f"there with the same result, {got['failed_added']} failed trials copied, {got['skipped_running']} "
          "unfinished skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
