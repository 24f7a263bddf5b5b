"""Loaded for every pytest run in this repository (tests/ and notebooks/ alike).

``--busy N`` (or ``LABKIT_BUSY=N``; ``N:matmul`` for torch matmul loops instead of pure-Python spinning) keeps N
busy processes running for the whole session, so the suite, notebooks included, runs as on a busy classroom server.
"""
import os

_busy = None


def pytest_addoption(parser):
    parser.addoption("--busy", action="store", default=os.environ.get("LABKIT_BUSY", ""), metavar="N[:KIND]",
                     help="run N busy processes (KIND spin or matmul) for the whole session; default $LABKIT_BUSY")


def pytest_configure(config):
    global _busy
    from labkit.runtime.busy import BusyLoad, parse_spec

    n, kind = parse_spec(config.getoption("--busy"))
    if n and _busy is None:
        _busy = BusyLoad(n, kind).start()


def pytest_report_header(config):
    return f"labkit: {_busy.n} busy {_busy.kind} processes for the whole run" if _busy else None


def pytest_unconfigure(config):
    global _busy
    if _busy is not None:
        _busy.stop()
        _busy = None
