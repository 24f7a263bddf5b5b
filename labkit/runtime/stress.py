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
``python -m labkit classroom measure`` use it), and goes on past a lost reply once the kernel is idle.

**The lost reply, found** (issue 32; :mod:`labkit.runtime.zmq_rearm` says the cause and the fix). It is nbclient's:
while it waits for a cell's reply it answers every output that lands in an ``Output`` widget with a plain send on the
same ``zmq.asyncio`` shell socket, and that send swallows the wake-up of a reply that has just arrived. Two more
modes measure it:

- ``--fresh N``: every notebook top to bottom ``N`` times, each in a fresh kernel, with nbclient (``--client
  nbclient``, as nbconvert, nbgrader and ``labkit.slides`` run notebooks) or jupyter_client's blocking client
  (``--client blocking``, as nbval runs them); a cell still running after ``--watch`` seconds is examined and, when
  its reply is stranded in the client's socket, released and counted;
- ``--repro N``: the smallest cell that stalls (one matplotlib figure drawn into an ``Output``), ``N`` times in one
  kernel with nbclient, alternating runs with and without the fix; prints both stall rates with 95% intervals.

``--unpatched`` runs nbclient without the fix (to see the stall). Use it on a classroom server before a class
(``python -m labkit stress --repeat 20 --busy 2``; ``--fresh 3 notebooks/*.ipynb``); ``tests/test_stress.py`` runs
short versions in CI. Exit status 0 when every run finished (``--repro``: when the fixed runs never stalled).

The module is long because the three ways of running notebooks the stall needs (re-runs in one kernel, fresh kernels
with either client, the A/B reproduction) share one diagnosis and one report; split, each would carry a copy.
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


def rate_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% interval for a rate of ``k`` events in ``n`` trials (for k = 0 its upper end is about 3.8/n)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _stranded(kc) -> dict:
    """What the client's shell socket holds while nbclient waits: is a reply sitting there with nobody woken?"""
    import select

    import zmq

    sock = kc.shell_channel.socket
    raw = zmq.Socket.get(sock, zmq.EVENTS)        # the plain getter: does not re-arm the asyncio socket
    return {"reply_waiting": bool(raw & zmq.POLLIN), "poll_pending": bool(getattr(sock, "_recv_futures", None)),
            "fd_readable": bool(select.select([sock.FD], [], [], 0)[0])}


async def _stranded_twice(kc) -> dict:
    """:func:`_stranded`, and again after the event loop has had half a second to act: a reply that has just come in
    (its handler scheduled, not yet run) is not counted."""
    import asyncio

    first = _stranded(kc)
    await asyncio.sleep(0.5)
    second = _stranded(kc)
    stuck = all(x["reply_waiting"] and x["poll_pending"] and not x["fd_readable"] for x in (first, second))
    return {**second, "stranded": stuck}


async def _execute_watched(client, cell, index: int, watch: float, timeout: float) -> dict:
    """Execute one cell with nbclient; every ``watch`` seconds, look for a reply stranded in the client's socket
    and, if there is one, count it and re-arm the socket (which frees it). {"state", "seconds", "detail"}."""
    import asyncio

    from .zmq_rearm import rearm

    t0 = time.monotonic()
    task = asyncio.ensure_future(client.async_execute_cell(cell, index))
    stranded = 0
    while True:
        done, _ = await asyncio.wait({task}, timeout=watch)
        if done:
            break
        if time.monotonic() - t0 > timeout:
            task.cancel()
            return {"state": "stall", "seconds": time.monotonic() - t0,
                    "detail": f"still running after {timeout:g} s (not a stranded reply)"}
        seen = await _stranded_twice(client.kc)
        if seen["stranded"]:
            stranded += 1
            rearm(client.kc.shell_channel.socket)   # frees the reply (what the fix does after each send)
    seconds = time.monotonic() - t0
    err = task.exception()
    if err is not None:
        return {"state": "error", "seconds": seconds, "detail": f"{type(err).__name__}: {str(err)[-300:]}"}
    if stranded:
        return {"state": "stall", "seconds": seconds,
                "detail": "finished, reply stranded in the client: the execute_reply sat unread in nbclient's shell "
                          "socket with its wake-up gone (see labkit.runtime.zmq_rearm); released"}
    return {"state": "ok", "seconds": seconds, "detail": ""}


async def _run_cells_nbclient(path: Path, watch: float, timeout: float) -> list[dict]:
    """Run the notebook at ``path`` top to bottom in one fresh kernel with nbclient; one result per code cell,
    stopping at the first error."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    out: list[dict] = []
    async with client.async_setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            out.append({"cell": index, **await _execute_watched(client, cell, index, watch, timeout)})
            if out[-1]["state"] == "error" or "still running" in out[-1]["detail"]:
                break
    return out


def run_fresh(path: Path, client: str = "nbclient", watch: float = 60.0, timeout: float = 600.0,
              patched: bool = True) -> list[dict]:
    """Run ``path`` top to bottom once in a fresh kernel, with ``client`` ("nbclient" or "blocking"); one result
    per cell (``state`` ok | error | stall, ``detail`` the diagnosis). With nbclient, ``patched`` says whether
    :mod:`labkit.runtime.zmq_rearm` is installed for the run."""
    import asyncio

    from . import zmq_rearm

    if client == "blocking":
        rows = run_notebook(path, timeout=timeout, lost_reply_grace=watch)
        for r in rows:
            if "reply lost" in r.get("detail", ""):
                r["state"] = "stall"
        return rows
    (zmq_rearm.install if patched else zmq_rearm.uninstall)()
    try:
        return asyncio.run(_run_cells_nbclient(path, watch, timeout))
    finally:
        zmq_rearm.install()


REPRO_CELL = """with out:
    out.clear_output(wait=True)
    fig, ax = plt.subplots(figsize=(7, 2.6)); ax.bar(range(3), [1, 2, 3]); plt.show()
"""


def repro(runs: int, watch: float = 5.0, log=print) -> dict:
    """The smallest stalling cell: a figure drawn into an ``Output`` (what the slider callbacks of notebooks 05 and
    09 do), run ``runs`` times in one kernel with nbclient, alternately without and with the fix. Returns
    {"unpatched": (stalls, runs), "patched": (stalls, runs), "seconds": [...], "kernel": "ipykernel X.Y.Z"}."""
    import asyncio

    import nbformat
    from nbclient import NotebookClient

    from . import zmq_rearm

    setup = nbformat.v4.new_code_cell("import ipywidgets as widgets, matplotlib.pyplot as plt, ipykernel\n"
                                      "%matplotlib inline\nout = widgets.Output(); display(out)\n"
                                      "print('kernel: ipykernel', ipykernel.__version__)")
    cell = nbformat.v4.new_code_cell(REPRO_CELL)
    nb = nbformat.v4.new_notebook(cells=[setup, cell])
    counts = {"unpatched": [0, 0], "patched": [0, 0]}
    seconds: list[float] = []
    kernel: list[str] = []

    async def go():
        client = NotebookClient(nb, timeout=120, kernel_name="python3")
        async with client.async_setup_kernel():
            await client.async_execute_cell(setup, 0)
            said = "".join(o.get("text", "") for o in setup.outputs if o.get("output_type") == "stream")
            kernel.append(said.strip().rpartition("kernel: ")[2])
            for k in range(runs):
                name = "patched" if k % 2 else "unpatched"
                (zmq_rearm.install if k % 2 else zmq_rearm.uninstall)()
                r = await _execute_watched(client, cell, 1, watch, 120)
                if r["state"] == "error" or "still running" in r["detail"]:
                    raise RuntimeError(f"the reproduction cell failed: {r['detail']}")
                counts[name][0] += r["state"] == "stall"
                counts[name][1] += 1
                seconds.append(r["seconds"])
                if (k + 1) % 20 == 0 or k + 1 == runs:
                    log(f"  repro: {k + 1}/{runs} runs; stalls without the fix {counts['unpatched'][0]}, "
                        f"with it {counts['patched'][0]}")

    try:
        asyncio.run(go())
    finally:
        zmq_rearm.install()
    return {"unpatched": tuple(counts["unpatched"]), "patched": tuple(counts["patched"]), "seconds": seconds,
            "kernel": kernel[0] if kernel else "unknown"}


def _rate_text(k: int, n: int) -> str:
    lo, hi = rate_interval(k, n)
    return f"{k}/{n} = {k / max(n, 1):.3f} (95% interval {lo:.3f} to {hi:.3f})"


def main(argv: list[str] | None = None) -> int:
    from ..viz import format_table

    ap = argparse.ArgumentParser(prog="python -m labkit stress", description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", default=list(DEFAULT_NOTEBOOKS), help="notebooks (default: 00 and 04)")
    ap.add_argument("--repeat", type=int, default=10, help="re-runs of the process/widget cells (default 10)")
    ap.add_argument("--busy", default="2", help="busy processes while it runs: N or N:matmul (default 2)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds before a cell counts as stalled")
    ap.add_argument("--fresh", type=int, default=0, metavar="N",
                    help="run each notebook top to bottom N times, each in a fresh kernel (no re-runs)")
    ap.add_argument("--client", choices=("nbclient", "blocking"), default="nbclient",
                    help="with --fresh: nbclient (nbconvert, nbgrader) or the blocking client (nbval)")
    ap.add_argument("--watch", type=float, default=60.0,
                    help="with --fresh/--repro: seconds after which a running cell is examined (default 60)")
    ap.add_argument("--unpatched", action="store_true", help="with --fresh: nbclient without labkit's zmq_rearm fix")
    ap.add_argument("--repro", type=int, default=0, metavar="N",
                    help="run the smallest stalling cell N times, alternately without and with the fix")
    args = ap.parse_args(argv)
    n_busy, kind = parse_spec(args.busy)
    if args.repeat < 0:
        ap.error(f"--repeat must be >= 0, got {args.repeat}")
    if args.fresh < 0 or args.repro < 0:
        ap.error(f"--fresh and --repro take a number of runs >= 0, got {args.fresh} and {args.repro}")
    if args.repro:
        print(f"stress --repro: {args.repro} runs, {n_busy} busy {kind} process(es); {_versions()}")
        with BusyLoad(n_busy, kind):
            r = repro(args.repro, watch=min(args.watch, 5.0))
        print(f"kernel side: {r['kernel']}; median run {statistics.median(r['seconds']):.2f} s")
        print(f"stalls without the fix: {_rate_text(*r['unpatched'])}")
        print(f"stalls with the fix:    {_rate_text(*r['patched'])}")
        return 1 if r["patched"][0] else 0
    paths = [Path(p) for p in args.notebooks]
    for p in paths:
        if not p.is_file():
            ap.error(f"notebook {str(p)!r} not found; pass a path such as notebooks/00_start_here.ipynb")
    if args.fresh:
        return _main_fresh(paths, args, n_busy, kind)
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


def _main_fresh(paths: list[Path], args, n_busy: int, kind: str) -> int:
    from ..viz import format_table

    how = args.client + ("" if args.client == "blocking" else " without the fix" if args.unpatched else " with the fix")
    print(f"stress --fresh: {len(paths)} notebook(s) x {args.fresh}, {how}, {n_busy} busy {kind} process(es); "
          f"{_versions()}")
    rows, t0 = [], time.monotonic()
    with BusyLoad(n_busy, kind):
        for k in range(args.fresh):
            for p in paths:
                t1 = time.monotonic()
                res = run_fresh(p.resolve(), args.client, watch=args.watch, timeout=max(args.timeout, args.watch + 60),
                                patched=not args.unpatched)
                bad = [r for r in res if r["state"] != "ok"]
                rows.append({"round": k + 1, "notebook": p.name, "cells": len(res), "s": time.monotonic() - t1,
                             "stalls": sum(r["state"] == "stall" for r in res),
                             "errors": sum(r["state"] == "error" for r in res)})
                for r in bad:
                    print(f"  round {k + 1}, {p.name} cell {r['cell']}: {r['state']}: {r['detail']}")
                print(f"  round {k + 1}/{args.fresh}: {p.name} {'ok' if not bad else 'NOT ok'} "
                      f"in {rows[-1]['s']:.0f} s", flush=True)
    print(format_table(rows, floatfmt="{:.0f}"))
    stalls, errors = sum(r["stalls"] for r in rows), sum(r["errors"] for r in rows)
    print(f"stress --fresh: {len(rows)} notebook runs in {time.monotonic() - t0:.0f} s: {stalls} stall(s) "
          f"({_rate_text(stalls, len(rows))} per notebook run), {errors} error(s)")
    return 1 if stalls or errors else 0


if __name__ == "__main__":
    sys.exit(main())
