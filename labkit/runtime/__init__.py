"""The runtime every lab runs on (lab 00).

- ``launcher``: :func:`launch` and :class:`Pool` start N real rank processes (gloo on CPU, NCCL with one
  GPU per rank), collect their results, echo their output, and turn a failing or hanging rank into a
  clear error; ``_worker`` is one rank.
- ``torchrun``: the same lab function under ``torchrun`` (``python -m labkit run module:function``).
- ``doctor``: what this machine can run (``labkit.doctor()``, ``python -m labkit doctor``).
- ``mesh``: ``ctx.mesh(dp=, pp=, tp=)``, one grid of process groups for several parallelisms (lab 11), and
  ``ctx.mesh(dp=, pp=, tp=, cp=)`` with context parallelism as a fourth dimension (lab 12).
- ``lab``: ``hello_rank``, the exercise check and the start-here tour; ``bench``: cold launch vs pooled re-run
  latency.
- ``busy``: busy processes that load the machine (``pytest --busy N``); ``stress``: re-runs a notebook's process
  and widget cells in a real kernel under load and diagnoses any stall (``python -m labkit stress``).
"""
from .launcher import (
    Context,
    LaunchError,
    LaunchTimeout,
    Pool,
    RankError,
    Results,
    choose_backend,
    launch,
    shutdown_pools,
)

__all__ = ["Context", "LaunchError", "LaunchTimeout", "Pool", "RankError", "Results", "choose_backend", "launch",
           "shutdown_pools"]
