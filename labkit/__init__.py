"""labkit: a lab kit on how large models are trained, with real multi-process runs.

The entry points most labs use:

    import labkit
    results = labkit.launch(fn, world_size=2)   # run fn(ctx) on 2 ranks, get their results
    labkit.doctor()                              # what this machine can run

One package per lab, each exporting its concept API from its ``__init__`` (rank functions and the notebook's
runners are in ``labkit.<lab>.lab``). The labs, as ``labkit.tour.LABS`` lists them (a test checks this list
against it):

- ``labkit.runtime`` (00 start here)
- ``labkit.collectives`` (01 collectives)
- ``labkit.ddp`` (02 data parallel)
- ``labkit.sliced`` (03 model parallel)
- ``labkit.pipeline`` (04 pipeline)
- ``labkit.balance`` (05 load balancing)
- ``labkit.kmeans`` (06 k-means)
- ``labkit.pseudo_label`` (07 pseudo-labels)
- ``labkit.ablation`` (08 ablation)
- ``labkit.hardware`` (09 hardware)
- ``labkit.zero`` (10 sharded data parallel)
- ``labkit.capstone`` (11 capstone)
- ``labkit.context_expert`` (12 context and expert parallel)

Shared modules: ``checks`` (exercise checks and the no-shortcut guard), ``viz`` (plots and tables), ``data``
(datasets and sharding), ``models`` (the small models labs share), ``partition`` (contiguous stage splits),
``memory_model`` (the formulas of training memory), ``devices``, ``slides`` (decks), ``grading`` and ``classroom``
(a class: nbgrader, the hub's shares and plan). The words they all use: ``docs/glossary.md``.
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
