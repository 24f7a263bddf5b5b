"""Loaded for every pytest run in this repository (tests/ and notebooks/ alike).

GPUs are hidden and the device check is on for the whole run (see below); ``LABKIT_TEST_CUDA=1`` keeps the GPUs,
``LABKIT_DEVICE_CHECK=0`` turns the check off.

Every notebook cell nbval executes must survive a static render (labkit/runtime/static_render.py): a cell whose only
outputs are widgets, or that prints a Python warning on stderr, fails.

``--busy N`` (or ``LABKIT_BUSY=N``; ``N:matmul`` for torch matmul loops instead of pure-Python spinning) keeps N
busy processes running for the whole session, so the suite, notebooks included, runs as on a busy classroom server.
"""
import os

import pytest

# The suite runs on the CPU with gloo, whatever GPUs the machine has (a teacher's first `bash labkit.sh test` on a
# GPU server must pass as it does on a laptop): GPUs are hidden unless LABKIT_TEST_CUDA=1. And every rank runs under
# labkit's device check (labkit/runtime/placement.py): a GPU's placement rules emulated on the CPU, so a rank
# function that leaves a tensor or a model off ctx.device fails here as it would under NCCL. Set when this file is
# imported, before any test starts CUDA or a rank; kernels and ranks inherit both.
if os.environ.get("LABKIT_TEST_CUDA", "") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("LABKIT_DEVICE_CHECK", "1")

# Tests that execute notebooks with nbclient (nbgrader's autograde, the slide decks) get labkit's fix for the reply
# nbclient can leave unread after a widget cell (labkit/runtime/zmq_rearm.py; nbval's blocking client needs none).
from labkit.runtime import zmq_rearm  # noqa: E402

zmq_rearm.install()

_busy = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A notebook cell that passed under nbval fails when a static render would lose it (widgets only, or a
    warning on stderr): see labkit/runtime/static_render.py."""
    outcome = yield
    outputs = getattr(item, "test_outputs", None)   # set by nbval's cell items only
    if call.when != "call" or outputs is None:
        return
    report = outcome.get_result()
    if report.passed:
        from labkit.runtime.static_render import static_problem

        problem = static_problem(outputs)
        if problem:
            source = getattr(getattr(item, "cell", None), "source", "")
            report.outcome = "failed"
            report.longrepr = f"{item.nodeid}: {problem}\n--- the cell ---\n{source}"


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
