"""``python -m labkit stress``: run a notebook's cells in a real Jupyter kernel, then re-run the cells that start
processes or show widgets many times, under busy processes, and report every stall.

A *stall* is a cell whose ``execute_reply`` has not come back after ``--timeout`` seconds. For each one the
command says where the time went, so that the cause can be told apart:

- ``never started``: the kernel never published ``busy`` for the request. The kernel did not read it (the kernel's
  own message loop is stuck); the command then nudges the kernel with a ``kernel_info_request`` and reports whether
  the stranded cell ran after it (the signature of a request stuck in the kernel's socket).
- ``running``: the kernel is executing the cell; the command makes the kernel and its rank processes dump every
  thread's stack (``faulthandler`` on SIGUSR1) into the report, so a wait in labkit's pool shows up by name.
- ``finished, reply lost``: the kernel published ``idle`` for the request but the reply never came: the client side.

:func:`run_notebook` runs a notebook top to bottom with the same watch (the student-version test and
``python -m labkit classroom measure`` use it), and goes on past a lost reply once the kernel is idle. That case was
seen on 2026-12-02 in a CI-like run: nbclient (0.11.0) ran a widget cell (an ``Output`` with ``clear_output``) of
notebook 05 on ipykernel 7.4.0; the kernel was idle and answered a second client, while nbclient waited for the
cell's ``execute_reply`` until the test's 10-minute limit (nbclient#312 reports the same with widgets).

Exit status 0 when every run finished, 1 otherwise. Use it on a classroom server before a class
(``python -m labkit stress --repeat 20 --busy 2``); ``tests/test_stress.py`` runs a short version in CI.
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .busy import BusyLoad, parse_spec

# Cells worth repeating: the ones that start rank processes or draw widgets.
PROCESS_CELL = re.compile(r"launch\(|Pool\(|widgets|Button|interact|_rank\b|\.tour\(")
DEFAULT_NOTEBOOKS = ("notebooks/00_start_here.ipynb", "notebooks/04_pipeline.ipynb")

_SETUP = """
import faulthandler as _fh, signal as _sig
_fh.register(_sig.SIGUSR1, file=open({path!r}, "a"), all_threads=True)
"""


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("ipykernel", "jupyter_client", "pyzmq", "tornado", "ipywidgets"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} absent")
    return ", ".join(out)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc), for stack dumps of rank processes."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        found += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return found


class Session:
    """One kernel, started in the notebook's folder, that runs cells and watches each run's messages."""

    def __init__(self, cwd: Path, dump: Path, env: dict | None = None):
        from jupyter_client.manager import start_new_kernel

        self.dump = dump
        extra = {"env": env} if env is not None else {}
        self.km, self.kc = start_new_kernel(kernel_name="python3", cwd=str(cwd), startup_timeout=300, **extra)
        self.pid = self.km.provisioner.pid if getattr(self.km, "provisioner", None) else None
        self.run(_SETUP.format(path=str(dump)), timeout=60)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)

    def run(self, source: str, timeout: float, lost_reply_grace: float | None = None) -> dict:
        """Execute ``source``; return {"seconds", "state": ok | error | stall, "detail", "text"}.

        ``text`` is what the cell showed (streams, the plain text of displays and results, errors). With
        ``lost_reply_grace``, a cell whose ``idle`` came but whose ``execute_reply`` did not within that many seconds
        counts as finished (its errors are known from IOPub), with ``detail`` saying the reply was lost: the runner
        goes on instead of waiting out ``timeout`` (``run_notebook`` uses it; the stress report never does).
        """
        t0 = time.monotonic()
        msg_id = self.kc.execute(source, allow_stdin=False, stop_on_error=False)
        started = idle = replied = False
        error, text, idle_at = "", [], None
        deadline = t0 + timeout
        while not (replied and idle):
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                break
            if idle and lost_reply_grace is not None and now - idle_at > lost_reply_grace:
                return {"seconds": now - t0, "state": "error" if error else "ok", "text": "".join(text),
                        "detail": (error + "; " if error else "") + "finished, reply lost: the kernel went idle but "
                        f"its execute_reply had not come {lost_reply_grace:g} s later; went on"}
            for getter, channel in ((self.kc.get_shell_msg, "shell"), (self.kc.get_iopub_msg, "iopub")):
                try:
                    msg = getter(timeout=min(0.05, max(left, 0.001)))
                except queue.Empty:
                    continue
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if channel == "shell" and kind == "execute_reply":
                    replied = True
                    if content.get("status") == "error":
                        error = error or f"{content.get('ename')}: {content.get('evalue')}"
                elif kind == "status":
                    started = started or content["execution_state"] == "busy"
                    if content["execution_state"] == "idle" and not idle:
                        idle, idle_at = True, time.monotonic()
                elif kind == "stream":
                    text.append(content.get("text", ""))
                elif kind in ("display_data", "execute_result"):
                    text.append(content.get("data", {}).get("text/plain", "") + "\n")
                elif kind == "error":
                    error = f"{content.get('ename')}: {content.get('evalue')}"
                    text.append(error + "\n")
        seconds = time.monotonic() - t0
        if replied and idle:
            return {"seconds": seconds, "state": "error" if error else "ok", "detail": error, "text": "".join(text)}
        return {"seconds": seconds, "state": "stall", "detail": self._diagnose(msg_id, started, idle),
                "text": "".join(text)}

    def _diagnose(self, msg_id: str, started: bool, idle: bool) -> str:
        if not started:
            self.kc.kernel_info()                      # a nudge on the shell socket
            t_end = time.monotonic() + 15
            while time.monotonic() < t_end:
                try:
                    msg = self.kc.get_shell_msg(timeout=0.5)
                except queue.Empty:
                    continue
                if msg["parent_header"].get("msg_id") == msg_id:
                    return ("never started: the kernel did not read the request until a kernel_info_request "
                            "nudged it (a request stranded in the kernel's shell socket)")
            return "never started: the kernel did not read the request, and a nudge did not help"
        if idle:
            return "finished, reply lost: the kernel went idle but its execute_reply never arrived"
        stacks = ""
        if self.pid:
            before = self.dump.stat().st_size if self.dump.exists() else 0
            for pid in [self.pid] + _children(self.pid):
                try:
                    os.kill(pid, signal.SIGUSR1)
                except OSError:
                    pass
            t_end = time.monotonic() + 20  # a loaded machine may take a while to write the dump
            while time.monotonic() < t_end and (not self.dump.exists() or self.dump.stat().st_size == before):
                time.sleep(0.5)
            time.sleep(1)
            if self.dump.exists():
                stacks = self.dump.read_text(errors="replace")[before:][-6000:]
        self.km.interrupt_kernel()
        return "running: the cell was still executing; kernel thread stacks:\n" + (stacks or "(no dump)")


def _code_cells(path: Path) -> list[tuple[int, str]]:
    import json

    cells = json.loads(path.read_text())["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"]


def run_notebook(path: Path, timeout: float = 600, lost_reply_grace: float = 20, env: dict | None = None,
                 on_start=None) -> list[dict]:
    """Run a notebook's code cells top to bottom in a fresh kernel in its folder; one result per cell (see
    :meth:`Session.run`), stopping at the first error or stall. A stall's result says where the time went (stacks of
    the kernel and its ranks when the cell was still running); a lost reply after the kernel went idle does not stop
    the run (``lost_reply_grace``), since the cell is known to have finished. ``on_start(session)`` is called once
    the kernel is up (``labkit.classroom.measure`` watches its process tree)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="labkit-run-") as tmp:
        session = Session(path.parent, Path(tmp) / "stacks.txt", env=env)
        try:
            if on_start is not None:
                on_start(session)
            for i, s in _code_cells(path):
                r = session.run(s, timeout, lost_reply_grace=lost_reply_grace)
                out.append({"cell": i, **r})
                if r["state"] != "ok":
                    break
        finally:
            session.close()
    return out


def stress_notebook(path: Path, repeat: int, timeout: float, log=print) -> list[dict]:
    """Run ``path`` top to bottom once, then its process/widget cells ``repeat`` times; one row per cell."""
    cells = _code_cells(path)
    hot = [(i, s) for i, s in cells if PROCESS_CELL.search(s)]
    runs: dict[int, list[dict]] = {i: [] for i, _ in cells}
    with tempfile.TemporaryDirectory(prefix="labkit-stress-") as tmp:
        session = Session(path.parent, Path(tmp) / "stacks.txt")
        try:
            for i, s in cells:
                runs[i].append(session.run(s, timeout))
                if runs[i][-1]["state"] != "ok":
                    log(f"  cell {i}: {runs[i][-1]['state']}: {runs[i][-1]['detail']}")
            for r in range(repeat):
                for i, s in hot:
                    runs[i].append(session.run(s, timeout))
                    if runs[i][-1]["state"] != "ok":
                        log(f"  repeat {r + 1}, cell {i}: {runs[i][-1]['state']}: {runs[i][-1]['detail']}")
                log(f"  {path.name}: repeat {r + 1}/{repeat} done")
        finally:
            session.close()
    rows = []
    for i, s in cells:
        if not runs[i] or (i, s) not in hot and runs[i][0]["state"] == "ok":
            continue  # report the hot cells, and any other cell that failed
        times = [x["seconds"] for x in runs[i]]
        rows.append({"notebook": path.name, "cell": i, "runs": len(times),
                     "median s": statistics.median(times), "max s": max(times),
                     "errors": sum(x["state"] == "error" for x in runs[i]),
                     "stalls": sum(x["state"] == "stall" for x in runs[i])})
    return rows


def main(argv: list[str] | None = None) -> int:
    from ..viz import format_table

    ap = argparse.ArgumentParser(prog="python -m labkit stress", description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", default=list(DEFAULT_NOTEBOOKS), help="notebooks (default: 00 and 04)")
    ap.add_argument("--repeat", type=int, default=10, help="re-runs of the process/widget cells (default 10)")
    ap.add_argument("--busy", default="2", help="busy processes while it runs: N or N:matmul (default 2)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds before a cell counts as stalled")
    args = ap.parse_args(argv)
    n_busy, kind = parse_spec(args.busy)
    if args.repeat < 0:
        ap.error(f"--repeat must be >= 0, got {args.repeat}")
    paths = [Path(p) for p in args.notebooks]
    for p in paths:
        if not p.is_file():
            ap.error(f"notebook {str(p)!r} not found; pass a path such as notebooks/00_start_here.ipynb")
    print(f"stress: {len(paths)} notebook(s), repeat {args.repeat}, {n_busy} busy {kind} process(es); {_versions()}")
    rows: list[dict] = []
    t0 = time.monotonic()
    with BusyLoad(n_busy, kind):
        for p in paths:
            rows += stress_notebook(p.resolve(), args.repeat, args.timeout)
    print(format_table(rows, floatfmt="{:.2f}"))
    stalls, errors = sum(r["stalls"] for r in rows), sum(r["errors"] for r in rows)
    print(f"stress: {sum(r['runs'] for r in rows)} runs of {len(rows)} cells in {time.monotonic() - t0:.0f} s: "
          f"{stalls} stall(s), {errors} error(s)")
    return 1 if stalls or errors else 0


if __name__ == "__main__":
    sys.exit(main())
