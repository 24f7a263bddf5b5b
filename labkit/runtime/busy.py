"""Busy processes that load the machine, to run the course as it runs on a busy classroom server.

``BusyLoad(n, kind)`` starts ``n`` processes that each keep one core busy until they are stopped (or their parent
dies): ``kind="spin"`` runs a pure-Python loop, ``kind="matmul"`` a single-threaded torch matmul loop (which also
loads the memory system). The test suite uses it through ``pytest --busy N`` (or ``LABKIT_BUSY=N``, optionally
``N:matmul``); ``python -m labkit stress`` uses it to re-run the notebook cells that start processes.

>>> with BusyLoad(1) as load:
...     load.alive()
1
"""
from __future__ import annotations

import os
import subprocess
import sys

from .._validate import ArgumentError, validate_choice, validate_int

KINDS = ("spin", "matmul")

# Each busy process checks every ~0.2 s that its parent is still there, so a killed test run leaves none behind.
_BUSY_CODE = r"""
import os, sys, time
parent, kind = int(sys.argv[1]), sys.argv[2]
if kind == "matmul":
    import torch
    torch.set_num_threads(1)
    a = torch.randn(192, 192)
    def work():
        for _ in range(20):
            a @ a
else:
    def work():
        x = 0
        for i in range(20000):
            x += i * i
while True:
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.2:
        work()
    if os.getppid() != parent:
        sys.exit(0)
"""


def parse_spec(spec: str | int | None) -> tuple[int, str]:
    """``"2"`` -> (2, "spin"); ``"2:matmul"`` -> (2, "matmul"); ``None`` or ``""`` -> (0, "spin")."""
    if spec is None or spec == "":
        return 0, "spin"
    text = str(spec).strip()
    count, _, kind = text.partition(":")
    try:
        n = int(count)
    except ValueError:
        raise ArgumentError(f"busy must be N or N:KIND (KIND one of {', '.join(KINDS)}), got {spec!r}; "
                            "hint: pass e.g. --busy 2 or LABKIT_BUSY=2:matmul") from None
    return validate_int("busy", n, minimum=0), validate_choice("busy kind", kind or "spin", KINDS)


class BusyLoad:
    """A context manager holding ``n`` busy processes of the given kind (see the module docstring)."""

    def __init__(self, n: int = 1, kind: str = "spin"):
        self.n = validate_int("n", n, minimum=0, hint="pass the number of busy processes, e.g. 2")
        self.kind = validate_choice("kind", kind, KINDS)
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "BusyLoad":
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for _ in range(self.n - len(self.procs)):
            self.procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_CODE, str(os.getpid()), self.kind],
                                               stdin=subprocess.DEVNULL, env=env))
        return self

    def alive(self) -> int:
        """How many busy processes are running now."""
        return sum(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def __enter__(self) -> "BusyLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"BusyLoad(n={self.n}, kind={self.kind!r}, alive={self.alive()})"
