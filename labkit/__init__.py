"""labkit: a lab kit on how large models are trained, with real multi-process runs.

The entry points most labs use:

    import labkit
    results = labkit.launch(fn, world_size=2)   # run fn(ctx) on 2 ranks, get their results
    labkit.doctor()                              # what this machine can run

One package per lab, each exposing its concept API from its ``__init__``: ``labkit.runtime`` (00),
``labkit.collectives`` (01), ``labkit.ddp`` (02), ``labkit.sliced`` (03), ``labkit.pipeline`` (04),
``labkit.balance`` (05). Shared modules: ``checks`` (exercise checks), ``viz`` (plots and tables),
``data`` (datasets and sharding), ``partition`` (contiguous stage splits), ``slides`` (decks), ``grading`` and
``classroom`` (a class: nbgrader, the hub's shares and plan).
``labkit.tour.LABS`` is the list of labs.
"""
from . import checks, viz  # noqa: F401,E402  (labkit.checks.X in notebooks)
from .runtime import *  # noqa: F401,F403  (launch, Pool, Results, ...: labkit.runtime's __all__, the one list)

try:  # one version, kept in pyproject.toml
    from importlib.metadata import version as _version

    __version__ = _version("labkit")
except Exception:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"


def doctor(**kwargs):
    """Print what this machine can run (versions, CPUs, GPUs, backends) and return the report."""
    from .runtime.doctor import doctor as _doctor

    return _doctor(**kwargs)
