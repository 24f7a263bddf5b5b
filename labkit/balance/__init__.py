"""Lab 05, load balancing: profile each layer, then cut the layers into pipeline stages so that the
slowest stage (which sets the pace) is as fast as it can be.

- ``solvers`` (pure): exact min-max contiguous partition (dynamic programming and binary search, both
  checked against brute force), the greedy split kept to show it losing, and a GPipe timeline predicted
  from stage times. Cuts and sizes are :mod:`labkit.partition`'s (re-exported here: ``cuts_to_sizes``,
  ``sizes_to_cuts``, ``even_cuts``, ``stage_sums``; its validator ``validate_cuts`` is not API).
- ``profile``: per-layer forward+backward time, parameter and activation bytes; balancing by time or by
  memory; layers that sleep (known cost) built on lab 04's ``Sleep``.
- ``run``: even vs balanced splits of a ResNet, predicted and measured on real pipelines; ``stage_profile_gap``
  says why a stage measured whole differs from the sum of its profiled layers.
- ``lab``: exercise checks and the tour.
"""
from .._compat import moved_names
from ..partition import cuts_to_sizes, even_cuts, sizes_to_cuts, stage_sums
from .profile import (
    LayerProfile,
    SleepLayer,
    as_layers,
    balance_by_memory,
    balance_by_time,
    memory_costs,
    profile_layers,
    sleep_layers,
)
from .run import (
    Comparison,
    compare_splits,
    lab_model,
    measure_stages,
    micro_sample,
    sleep_pipeline,
    stage_profile_gap,
)
from .solvers import Split, brute_force_partition, evaluate_split, fits, gpipe_timeline, greedy_split, min_max_partition

__all__ = [
    "cuts_to_sizes", "sizes_to_cuts", "even_cuts", "stage_sums",
    "Split", "evaluate_split", "fits", "min_max_partition", "brute_force_partition", "greedy_split", "gpipe_timeline",
    "LayerProfile", "as_layers", "profile_layers", "balance_by_time", "memory_costs", "balance_by_memory",
    "SleepLayer", "sleep_layers",
    "Comparison", "compare_splits", "lab_model", "micro_sample", "measure_stages", "stage_profile_gap",
    "sleep_pipeline",
]

# Old names, one release (issue 30): the cuts' validator is labkit.partition.validate_cuts (check_cuts before),
# not part of this package's API.
__getattr__ = moved_names(__name__, {
    "check_cuts": "labkit.partition:validate_cuts",
    "validate_cuts": "labkit.partition:validate_cuts",
})
