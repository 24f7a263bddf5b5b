"""``python -m labkit book``: execute every notebook and deck in parallel, then render the book with Sphinx.

Steps (each prints a line; the whole build's time is printed at the end):

1. **execute**: every lab notebook (and its deck) runs in its own process and fresh kernel, several at once
   (``--jobs``), each cell under ``--timeout`` seconds and each notebook under ``--notebook-timeout``. A failure
   stops the build and names the notebook and cell; ``--keep-going`` builds the rest and lists the failures on
   the landing page.
2. **stage**: ``OUT/src`` gets the executed chapters (:func:`labkit.book.pages.stage_notebook`), one benchmark
   page per lab, the Chinese companion (``book/zh``), the landing page, MathJax and the decks.
3. **render**: ``sphinx-build`` writes ``OUT/html``; any Sphinx warning (a broken label, a missing page) fails.
4. ``--zip`` writes ``OUT/labkit-book.zip``, one folder to put on a web server or a USB stick.

This module is long because it holds the parallel runner, the staging and the command line together; the pages
themselves are made in :mod:`labkit.book.pages`.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..slides import copy_mathjax, fetch_mathjax, fetch_reveal
from .labels import notebook_number, section_labels
from .pages import landing_page, notebook_title, placeholder_chapter, split_benchmarks, stage_notebook

__all__ = ["BookError", "Job", "build", "machine_info", "main", "run_jobs", "write_zip"]

REPO = Path(__file__).resolve().parent.parent.parent
CSS = """.labkit-machine { font-size: 0.9em; }
.labkit-links { font-size: 0.95em; }
.labkit-widget { color: #555; }
"""


class BookError(RuntimeError):
    """The book could not be built: a notebook or deck failed (named, with its cell), or an input is missing."""


def machine_info() -> dict:
    """What this process runs on: CPU model, cores, GPU (or None), torch and Python versions, the date (UTC)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "gpu": None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    except Exception as e:  # the book still says what it could find
        info["torch"] = f"not importable ({type(e).__name__})"
    return info


# ----------------------------------------------------------------------------- running jobs
@dataclass
class Job:
    """One notebook or deck to execute in its own process: ``argv`` run from the repository, ``name`` for
    messages. ``seconds``, ``error`` (a dict from the child) and ``log`` are filled in when it ends."""
    name: str
    kind: str                # "notebook" or "deck"
    argv: list[str]
    log: Path
    error_file: Path | None = None
    seconds: float | None = None
    error: dict | None = None
    env: dict = field(default_factory=dict)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_jobs(jobs: list[Job], workers: int, job_timeout: float, keep_going: bool, say=print) -> list[Job]:
    """Run ``jobs`` (``workers`` at a time); return the failed ones.

    Each runs in a new session, so a timeout kills it with its kernel and ranks. Without ``keep_going`` the first
    failure kills the running jobs and skips the rest.
    """
    stop = threading.Event()
    running: dict[str, subprocess.Popen] = {}
    lock = threading.Lock()
    done = [0]

    def one(job: Job) -> Job:
        if stop.is_set():
            job.error = {"where": "not started", "what": "(an earlier failure stopped the build)", "detail": ""}
            return job
        t0 = time.perf_counter()
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "w") as log:
            proc = subprocess.Popen(job.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, **job.env})
            with lock:
                running[job.name] = proc
            try:
                rc = proc.wait(timeout=job_timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                rc = None
            finally:
                with lock:
                    running.pop(job.name, None)
        job.seconds = time.perf_counter() - t0
        if rc is None:
            job.error = {"where": "the whole run", "what": f"ran past the {job_timeout:g} s notebook timeout",
                         "detail": _tail(job.log)}
        elif rc != 0:
            if job.error_file is not None and job.error_file.is_file():
                job.error = json.loads(job.error_file.read_text())
            else:
                job.error = {"where": "", "what": f"exited with status {rc}", "detail": _tail(job.log)}
        with lock:
            done[0] += 1
            state = "failed: " + f"{job.error['where']} {job.error['what']}".strip() if job.error else "ok"
            say(f"book: [{done[0]}/{len(jobs)}] {job.kind} {job.name}: {state} ({job.seconds:.0f} s)")
        if job.error and not keep_going and not stop.is_set():
            stop.set()
            with lock:
                for other in running.values():
                    _kill_group(other)
        return job

    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        finished = list(pool.map(one, jobs))
    return [j for j in finished if j.error is not None]


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the build
def _notebooks(labs: list[str] | None) -> list[Path]:
    from ..tour import LABS, select

    try:
        chosen = select(labs)   # a lab's name starts with its number, so "04" and "pipeline" both match
    except ValueError:
        raise BookError(f"labs={labs}: no lab matches; pass lab numbers (00 .. {LABS[-1].number}) or words "
                        f"of their names: {[lab.name for lab in LABS]}") from None
    return [REPO / "notebooks" / lab.notebook for lab in chosen if lab.notebook]


def _decks(numbers: list[str]) -> dict[str, Path]:
    return {p.name[:2]: p for p in sorted((REPO / "slides").glob("*.ipynb")) if p.name[:2] in numbers}


_CACHE_ONLY = "/nonexistent/npm"   # an npm that is never there: fetch_npm then uses its cache or says it cannot


def _local(getter, fetch: bool) -> Path | None:
    """The folder ``getter`` (``slides.fetch_mathjax`` or ``slides.fetch_reveal``) gives, or None when it cannot;
    with ``fetch`` False only labkit's cache is looked at."""
    from ..slides import SlideBuildError

    try:
        return getter(npm=None if fetch else _CACHE_ONLY)
    except SlideBuildError:
        return None


def build(labs: list[str] | None = None, out: str | os.PathLike | None = None, jobs: int | None = None,
          timeout: float = 300, notebook_timeout: float = 900, keep_going: bool = False, decks: bool = True,
          zh: bool = True, reuse: bool = False, make_zip: bool = False, notebooks: list | None = None,
          fetch: bool = True, say=None) -> Path:
    """Build the book into ``out/html`` (default ``book/_build``) and return that folder; see the module's
    docstring. ``labs``: lab numbers or name words (default all); ``notebooks``: paths of notebooks named
    ``NN_*.ipynb`` to build instead of the labs (tests use it); ``reuse``: keep an executed notebook whose
    source has not changed since it was executed; ``fetch``: get MathJax and reveal.js with npm when they are
    not in labkit's cache (``False``: the cache only, as the tests build, which never download)."""
    say = say or (lambda line: print(line, flush=True))
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise BookError(f"timeout={timeout!r}: pass the most seconds one cell may run, a positive number")
    if not isinstance(notebook_timeout, (int, float)) or notebook_timeout <= 0:
        raise BookError(f"notebook_timeout={notebook_timeout!r}: pass the most seconds one notebook may run")
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise BookError(f"jobs={jobs!r}: pass how many notebooks to run at once, 1 or more")
    t_start = time.perf_counter()
    out = Path(out) if out is not None else REPO / "book" / "_build"
    if notebooks is None:
        notebooks = _notebooks(labs)
    else:
        notebooks = [Path(p) for p in notebooks]
        missing = [str(p) for p in notebooks if not p.is_file()]
        if missing:
            raise BookError(f"notebooks={missing}: no such file; pass paths of existing .ipynb files")
    numbers = [notebook_number(p) for p in notebooks]
    executed_dir, logs = out / "executed", out / "logs"
    executed_dir.mkdir(parents=True, exist_ok=True)
    src = out / "src"
    if src.exists():
        shutil.rmtree(src)
    (src / "_static").mkdir(parents=True)
    (src / "_extra").mkdir()

    reveal = _local(fetch_reveal, fetch) if decks else None
    mathjax = _local(fetch_mathjax, fetch)
    if decks and reveal is None:
        say("book: no local reveal.js (npm could not fetch it): the decks are left out; "
            "run `bash labkit.sh book` with npm on PATH to include them")
    deck_paths = _decks(numbers) if reveal is not None else {}
    work: list[Job] = []
    for path in notebooks:
        target = executed_dir / path.name
        if reuse and target.is_file():
            meta = json.loads(target.read_text()).get("metadata", {}).get("labkit_book", {})
            if meta.get("source_sha") == _sha(path) and not meta.get("error"):
                say(f"book: {path.stem}: reusing the executed copy from {meta.get('date')}")
                continue
        work.append(Job(path.stem, "notebook",
                        [sys.executable, "-m", "labkit.book.run_one", str(path), str(target), str(timeout)],
                        logs / f"{path.stem}.log", error_file=target.with_suffix(".error.json")))
    for deck in deck_paths.values():
        work.append(Job(deck.stem, "deck", [sys.executable, "-m", "labkit", "slides", str(deck), "--out",
                                            str(src / "_extra" / "slides"), "--reveal-dir", str(reveal),
                                            "--timeout", str(timeout)]
                        + (["--mathjax-dir", str(mathjax)] if mathjax is not None else []),
                        logs / f"deck-{deck.stem}.log"))
    previous = _previous_seconds(out)           # the longest first, as the last build timed them
    work.sort(key=lambda j: -previous.get(f"{j.kind}:{j.name}", 60.0 if j.kind == "notebook" else 10.0))
    workers = jobs or max(1, min(6, os.cpu_count() or 1))
    say(f"book: executing {sum(j.kind == 'notebook' for j in work)} notebook(s) and {len(deck_paths)} deck(s), "
        f"{workers} at a time (cell timeout {timeout:g} s, notebook timeout {notebook_timeout:g} s)")
    failed = run_jobs(work, workers, notebook_timeout, keep_going, say)
    _save_seconds(out, {**previous, **{f"{j.kind}:{j.name}": j.seconds for j in work if j.seconds is not None}})
    if failed and not keep_going:
        first = next((j for j in failed if j.error.get("where") != "not started"), failed[0])
        e = first.error
        raise BookError(f"{first.kind} {first.name}: {e['where']} {e['what']}\n{e.get('detail', '')}\n"
                        f"(log: {first.log}; --keep-going builds the rest and lists the failures)")

    say("book: staging the pages")
    from ..tour import LABS

    info = machine_info()
    bench_of = {lab.bench: lab.number for lab in LABS if lab.bench}
    bench = split_benchmarks((REPO / "benchmarks" / "README.md").read_text(encoding="utf-8"), bench_of)
    bench_labs = [lab.number for lab in LABS if lab.number in bench.labs]   # static text: every lab's, always
    (src / "bench").mkdir()
    (src / "bench" / "index.md").write_text(bench.overview, encoding="utf-8")
    titles = {lab.number: lab.name for lab in LABS}
    for n in bench_labs:
        (src / "bench" / f"lab{n}.md").write_text(
            f"# Benchmarks: lab {titles[n]}\n\n(lab{n}-bench)=\n\n{bench.labs[n]}\n", encoding="utf-8")
    zh_dir = REPO / "book" / "zh"
    has_zh = zh and zh_dir.is_dir()
    if has_zh:
        shutil.copytree(zh_dir, src / "zh")
    (src / "docs").mkdir()
    shutil.copy2(REPO / "docs" / "glossary.md", src / "docs" / "glossary.md")   # the chapters link to it
    chapters = []
    (src / "labs").mkdir()
    import nbformat

    for path in notebooks:
        number = notebook_number(path)
        nb = nbformat.read(str(executed_dir / path.name), as_version=4)
        meta = nb.metadata.get("labkit_book", {})
        links = {}
        if number in deck_paths:
            links["lecture deck"] = f"../slides/{deck_paths[number].stem}.slides.html"
        if number in bench_labs:
            links["benchmark tables"] = f"../bench/lab{number}.html"
        if has_zh and (zh_dir / f"lab{number}.md").is_file():
            links["中文摘要"] = f"../zh/lab{number}.html"
        nbformat.write(stage_notebook(nb, number, meta.get("machine", info), links), str(src / "labs" / path.name))
        chapters.append({"number": number, "title": notebook_title(nb),
                         "doc": f"labs/{path.name}",
                         "deck": f"slides/{deck_paths[number].stem}.slides.html" if number in deck_paths else None})
    if has_zh:   # the companion links into every lab: a partial build stands the others in by their sections
        for lab in LABS:
            if lab.notebook and lab.number not in numbers:
                source = REPO / "notebooks" / lab.notebook
                title = notebook_title(nbformat.read(str(source), as_version=4))
                (src / "labs" / f"{source.stem}.md").write_text(
                    placeholder_chapter(lab.number, title, section_labels(source)), encoding="utf-8")
                chapters.append({"number": lab.number, "title": title, "doc": f"labs/{source.stem}.md",
                                 "deck": None, "built": False})
        chapters.sort(key=lambda ch: ch["number"])
    if deck_paths:
        from ..slides import copy_reveal, write_index

        copy_reveal(reveal, src / "_extra" / "slides")
        write_index(src / "_extra" / "slides")
    failures = [{"notebook": j.name, "where": j.error.get("where", ""), "what": j.error.get("what", ""),
                 "detail": j.error.get("detail", "")} for j in failed]
    (src / "index.md").write_text(landing_page(chapters, info, failures, has_zh, bench_labs,
                                               time.perf_counter() - t_start), encoding="utf-8")
    shutil.copy2(REPO / "book" / "conf.py", src / "conf.py")
    (src / "_static" / "labkit-book.css").write_text(CSS)
    (src / "_static" / "labkit-no-mathjax.js").write_text("/* no local MathJax: formulas show as TeX */\n")
    if mathjax is None:
        say("book: no local MathJax (npm could not fetch it): formulas show as their TeX source")
    else:
        copy_mathjax(mathjax, src / "_static" / "mathjax")

    html = out / "html"
    say("book: rendering with Sphinx")
    t0 = time.perf_counter()
    _sphinx(src, html, out / "sphinx.log")
    say(f"book: rendered in {time.perf_counter() - t0:.0f} s")
    if make_zip:
        archive = write_zip(html, out / "labkit-book.zip")
        say(f"book: {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
    size = sum(p.stat().st_size for p in html.rglob("*") if p.is_file())
    stand_ins = sum(not ch.get("built", True) for ch in chapters)
    say(f"book: {len(chapters) - stand_ins} chapter(s)" + (f" and {stand_ins} stand-in(s)" if stand_ins else "")
        + f" in {html} ({size / 2**20:.1f} MiB) in "
        f"{(time.perf_counter() - t_start) / 60:.1f} min; open {html / 'index.html'}"
        + (f"; {len(failed)} failed: {', '.join(j.name for j in failed)}" if failed else ""))
    return html


def _sphinx(src: Path, html: Path, log: Path) -> None:
    if html.exists():
        shutil.rmtree(html)
    argv = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-W", "--keep-going", "-d",
            str(src.parent / "doctrees"), str(src), str(html)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise BookError(f"Sphinx failed (exit {proc.returncode}); every warning counts as an error, so that a "
                        f"broken link or label fails the build:\n{proc.stderr.strip()[-3000:]}\n(log: {log})")


def write_zip(html: Path, archive: Path) -> Path:
    """Zip the built site ``html`` into ``archive``, under one folder ``labkit-book/``."""
    tmp = archive.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(html.rglob("*")):
            if p.is_file():
                z.write(p, Path("labkit-book") / p.relative_to(html))
    tmp.replace(archive)
    return archive


def _previous_seconds(out: Path) -> dict:
    try:
        return json.loads((out / "seconds.json").read_text())
    except (OSError, ValueError):
        return {}


def _save_seconds(out: Path, seconds: dict) -> None:
    (out / "seconds.json").write_text(json.dumps(seconds, indent=1, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit book [LAB ...] [--jobs N] [--keep-going] [--zip] ...``"""
    ap = argparse.ArgumentParser(prog="python -m labkit book", description=(
        "Execute every notebook (and deck) in parallel and build the course as a static HTML book in "
        "book/_build/html, with a Chinese companion. A failed cell stops the build and is named."))
    ap.add_argument("labs", nargs="*", help="only these labs (numbers like 00 04, or words of their names)")
    ap.add_argument("--out", default=None, help="build folder (default book/_build); the site is OUT/html")
    ap.add_argument("-j", "--jobs", type=int, default=None, help="notebooks run at once (default: CPUs, at most 6)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one cell may run (default 300, as nbval)")
    ap.add_argument("--notebook-timeout", type=float, default=900, help="seconds one notebook may run (default 900)")
    ap.add_argument("--keep-going", action="store_true", help="build past failures; the landing page lists them")
    ap.add_argument("--no-decks", action="store_true", help="leave the lecture decks out")
    ap.add_argument("--no-zh", action="store_true", help="leave the Chinese companion out")
    ap.add_argument("--reuse", action="store_true",
                    help="keep executed notebooks whose source did not change (re-render only)")
    ap.add_argument("--zip", action="store_true", help="also write OUT/labkit-book.zip")
    args = ap.parse_args(argv)
    try:
        build(args.labs or None, out=args.out, jobs=args.jobs, timeout=args.timeout,
              notebook_timeout=args.notebook_timeout, keep_going=args.keep_going, decks=not args.no_decks,
              zh=not args.no_zh, reuse=args.reuse, make_zip=args.zip)
    except BookError as e:
        print(f"book: error: {e}", file=sys.stderr)
        return 1
    return 0
