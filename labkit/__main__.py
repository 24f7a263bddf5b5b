"""Command line: ``python -m labkit {doctor,tour,bench,slides,book,stress,run,handout,grade,classroom,ablate}``."""
from __future__ import annotations

import argparse
import importlib
import sys

from .tour import benches

BENCHES = benches()  # {name: module}, from the one list of labs in labkit.tour


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m labkit", description="labkit: the course's command line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("doctor", help="check versions, CPUs, GPUs and backends; exit 1 if the labs cannot run")
    d.add_argument("--no-backends", action="store_true", help="skip the real all-reduce on each backend")
    t = sub.add_parser("tour", help="run every lab's quick path and print a table")
    t.add_argument("labs", nargs="*", help="only labs whose name contains one of these")
    t.add_argument("-n", "--world-size", type=int, default=2)
    t.add_argument("--require-backend", choices=["nccl", "gloo"], default=None,
                   help="refuse to start unless backend='auto' (what the labs launch with) picks this backend for "
                        "N ranks here: --require-backend nccl -n 1 proves the 1-rank runs are NCCL on a GPU machine "
                        "(labs whose checks need a fixed number of ranks, such as the capstone's 8, launch those "
                        "on whatever 'auto' picks for them)")
    b = sub.add_parser("bench", help=f"run a benchmark: {', '.join(BENCHES)}")
    b.add_argument("name", choices=sorted(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark (try --help)")
    s = sub.add_parser("slides", help="build the lecture decks into reveal.js HTML (try slides --help)", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("book", help="execute every notebook and build the course as a static HTML book "
                   "(try book --help)", add_help=False)
    st = sub.add_parser("stress", help="re-run notebook cells that start processes, under busy processes; report "
                        "stalls (try stress --help)", add_help=False)
    st.add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("handout", help="write the student versions through nbgrader (try handout --help)", add_help=False)
    sub.add_parser("grade", help="autograde a lab's submissions with nbgrader, export CSVs, write feedback "
                   "(try grade --help)", add_help=False)
    sub.add_parser("classroom", help="classroom plan --students N: each student's share of this machine; "
                   "classroom measure: what each lab needs", add_help=False)
    sub.add_parser("ablate", help="run, resume and report an ablation study from a TOML file; ablate merge OUT IN.. "
                   "combines shards (try ablate --help)", add_help=False)
    r = sub.add_parser("run", help="run module:function on N ranks (or under torchrun)")
    r.add_argument("spec", help="module:function, e.g. labkit.runtime.lab:hello_rank")
    r.add_argument("-n", "--world-size", type=int, default=2, help="ranks to start (ignored under torchrun)")
    r.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    r.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    r.add_argument("--timeout", type=float, default=300)

    if argv and argv[0] == "slides":  # let the slide builder parse its own options (and --help)
        from .slides import main as slides_main

        return slides_main(argv[1:]) or 0
    if argv and argv[0] == "book":
        from .book.build import main as book_main

        return book_main(argv[1:])
    if argv and argv[0] in ("handout", "grade"):
        from .grading import main as grading_main

        return grading_main(argv)
    if argv and argv[0] == "classroom":
        from .classroom import main as classroom_main

        return classroom_main(argv[1:])
    if argv and argv[0] == "ablate":
        return importlib.import_module("labkit.ablation.cli").main(argv[1:])  # a lab's CLI: loaded by name
    if argv and argv[0] == "stress":
        from .runtime.stress import main as stress_main

        return stress_main(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "doctor":
        from .runtime.doctor import doctor

        return 0 if doctor(backends=not args.no_backends).ok else 1
    if args.cmd == "tour":
        from .runtime.launcher import choose_backend
        from .tour import run_tour

        if args.world_size < 1:
            parser.error(f"tour: -n/--world-size must be >= 1, got {args.world_size}")
        backend, reason = choose_backend(args.world_size)
        print(f"tour: {args.world_size} rank(s) per launch, backend='auto' picks {reason}", flush=True)
        if args.require_backend and backend != args.require_backend:
            print(f"tour: --require-backend {args.require_backend}, but backend='auto' picks {backend} for "
                  f"{args.world_size} rank(s) here; run with fewer ranks (-n) or on a machine with one GPU per rank",
                  file=sys.stderr)
            return 2
        rows = run_tour(args.labs or None, world_size=args.world_size)
        bad = [r for r in rows if r["result"] != "ok"]
        print(f"\n{len(rows) - len(bad)}/{len(rows)} checks ok")
        return 1 if bad else 0
    if args.cmd == "bench":
        mod = importlib.import_module(BENCHES[args.name])
        rest = [a for a in args.rest if a != "--"]
        return mod.main(rest) or 0
    if args.cmd == "run":
        from .runtime.torchrun import main as run_main

        return run_main(args.spec, args.world_size, args.kwargs, args.backend, args.timeout)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
