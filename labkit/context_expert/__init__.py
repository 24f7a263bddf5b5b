"""Lab 12 (work in progress): context parallelism (ring attention) and expert parallelism (mixture of experts).

- ``moe``: :class:`MoE`, a top-k mixture-of-experts MLP with capacity and Switch's load-balancing loss, and
  :class:`ExpertParallelMoE`, its experts sharded over ranks with all-to-all dispatch and combine.
"""
from .moe import ExpertParallelMoE, MoE, Routing, all_to_all_bytes, balance_loss, capacity, route

__all__ = ["MoE", "ExpertParallelMoE", "Routing", "route", "capacity", "balance_loss", "all_to_all_bytes"]
