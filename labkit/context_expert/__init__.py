"""Lab 12: context parallelism (ring attention) and expert parallelism (mixture of experts).

- ``ring``: :func:`ring_attention`, causal attention with the sequence split over ranks (contiguous or zigzag
  layout), keys and values passed around a ring and merged by the online-softmax rule; its backward by hand.
- ``moe``: :class:`MoE`, a top-k mixture-of-experts MLP with capacity and Switch's load-balancing loss, and
  :class:`ExpertParallelMoE`, its experts sharded over ranks with all-to-all dispatch and combine.
- ``gpt``: :func:`~labkit.context_expert.gpt.forward_cp`, lab 11's TinyGPT with its sequence split over ranks.
- ``measure``: activation memory per rank against the sequence length and cp.
- ``cp_grid``: context parallelism as the fourth dimension of lab 11's grid (:func:`run_cp_grid` on
  ``ctx.mesh(dp=, pp=, cp=, tp=)``; :class:`RingAttention`, the attention it hands to lab 11; :func:`predict_cp`).
- ``lab`` (rank functions, exercise checks, the tour) and ``bench`` (``python -m labkit bench context_expert``).
"""
from . import ring
from .cp_grid import RingAttention, predict_cp, run_cp_grid
from .moe import ExpertParallelMoE, MoE, Routing, all_to_all_bytes, balance_loss, capacity, route
from .ring import LAYOUTS, merge_partial, ring_attention

__all__ = ["MoE", "ExpertParallelMoE", "Routing", "route", "capacity", "balance_loss", "all_to_all_bytes",
           "ring", "ring_attention", "merge_partial", "LAYOUTS",
           "RingAttention", "run_cp_grid", "predict_cp"]
