"""labkit: a lab kit on how large models are trained, with real multi-process runs.

The entry points most labs use:

    import labkit
    results = labkit.launch(fn, world_size=2)   # run fn(ctx) on 2 ranks, get their results
    labkit.doctor()                              # what this machine can run

Each concept lives in its own module (``labkit.collectives``, ``labkit.ddp``, ...).
"""
from .launcher import (  # noqa: F401
    Context,
    LaunchError,
    LaunchTimeout,
    Pool,
    RankError,
    launch,
    shutdown_pools,
)

from . import checks, viz  # noqa: F401,E402  (labkit.checks.X in notebooks)

__version__ = "0.1.0"


def doctor(**kwargs):
    """Print what this machine can run (versions, CPUs, GPUs, backends) and return the report."""
    from .envcheck import doctor as _doctor

    return _doctor(**kwargs)
