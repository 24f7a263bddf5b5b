"""Lab 01, collectives: all-reduce built from point-to-point messages, and what it costs.

- ``schedules`` (pure): every algorithm's messages as a schedule (:data:`SCHEDULE_NAMES`), a replay on contribution
  counters (:func:`simulate_messages`), message-log comparison.
- ``algorithms`` (on ranks): naive, tree, ring and halving-doubling all-reduce from send/recv; ring
  reduce-scatter and all-gather; each checked against ``torch.distributed``'s own.
- ``validation``: what the algorithms check before they communicate, and ``ranks_agree``.
- ``cost`` (pure): nccl-tests' algbw/busbw and the alpha-beta model, fitted to measurements.
- ``lab``: the rank functions of the notebook, the exercise checks, the tour; ``bench``: busbw against
  the library (``python -m labkit bench collectives``); ``plots``: schedules, animations, bandwidth curves.
"""
from .._compat import moved_names
from .algorithms import all_gather, all_reduce, reduce_scatter
from .cost import (
    DEFAULT_ALPHA_BETA,
    LIBRARY,
    MODELLED,
    PUBLISHED_LINKS,
    bandwidths,
    bus_factor,
    cost_terms,
    crossover_bytes,
    describe_alpha_beta,
    fit_alpha_beta,
    predict_time,
    total_traffic,
    usable_alpha_beta,
)
from .schedules import (
    ALGORITHMS,
    OPS,
    SCHEDULE_NAMES,
    Message,
    Schedule,
    chunk_bounds,
    final_owners,
    log_matches_schedule,
    merge_logs,
    ring_traffic_problems,
    schedule,
    schedule_from_logs,
    simulate_messages,
)
from .validation import ranks_agree

__all__ = ["ALGORITHMS", "OPS", "SCHEDULE_NAMES", "Message", "Schedule", "chunk_bounds", "schedule",
           "simulate_messages", "final_owners", "merge_logs", "log_matches_schedule", "schedule_from_logs",
           "ring_traffic_problems",
           "all_reduce", "reduce_scatter", "all_gather", "ranks_agree",
           "LIBRARY", "MODELLED", "bus_factor", "bandwidths", "cost_terms", "predict_time", "fit_alpha_beta",
           "DEFAULT_ALPHA_BETA", "PUBLISHED_LINKS", "total_traffic", "usable_alpha_beta", "crossover_bytes",
           "describe_alpha_beta"]

# old names (issue 30): SCHEDULES and simulate collided with labkit.pipeline's, which mean pipeline schedules
__getattr__ = moved_names(__name__, {"SCHEDULES": "labkit.collectives.schedules:SCHEDULE_NAMES",
                                     "simulate": "labkit.collectives.schedules:simulate_messages"})
