"""Lab 10, sharded data parallelism: ZeRO stages 1, 2 and 3 from scratch, checked against one process and torch.

- ``flat`` (pure): many parameters laid end to end in one flat buffer padded to a multiple of N, each rank's
  equal shard of ⌈P/N⌉ values, views back into the parameters' shapes (tied parameters kept once).
- ``comm``: the collectives ZeRO uses, counted in the paper's units (:data:`TRAFFIC_FACTORS`: all-reduce 2Ψ,
  reduce-scatter and all-gather Ψ; Rajbhandari et al. 2019, section 7) so a test can check 2Ψ per step for
  ZeRO-1/2 and 3Ψ for ZeRO-3.
- ``optim``: :class:`Zero1` (reduce-scatter, step the shard, all-gather), :class:`NaiveZero1` (all-reduce, beside
  it) and :class:`Zero2` (gradients reduced to their owners bucket by bucket during backward), drop-in optimisers
  built from any element-wise ``torch.optim`` class; a consolidated ``state_dict`` that re-shards onto any N.
- ``stage3``: :class:`Zero3` shards a model's parameters per unit, all-gathers a unit before its forward and
  again in its backward, and reduce-scatters its gradient.
- ``torch_impl``: torch's own implementations, ``ZeroRedundancyOptimizer`` and FSDP2 (``fully_shard``), behind
  small helpers, which the lab's stages are checked against.
- ``measure``: one method on one rank behind one interface (:class:`~labkit.zero.measure.Method`), the bytes it
  holds after a step and its peak during one (MemTracker), beside the paper's formulas.
- ``lab``: the rank functions (train one small model with each method against one process; the memory
  measurement), the exercise checks, the tour; ``bench``: ``python -m labkit bench zero``; ``plots``: what each
  rank holds, the bytes and the optimiser state on each rank.
"""
from .._compat import moved_names
from .comm import TRAFFIC_FACTORS, Traffic
from .flat import FlatLayout, ceil_div, unique_params
from .optim import SUPPORTED, NaiveZero1, Zero1, Zero2, state_numel
from .stage3 import MixedPrecision, Zero3
from .torch_impl import fsdp2_full_parameters, torch_fsdp2, torch_zero1

__all__ = [
    "FlatLayout", "ceil_div", "unique_params", "TRAFFIC_FACTORS", "Traffic",
    "SUPPORTED", "NaiveZero1", "Zero1", "Zero2", "state_numel", "Zero3", "MixedPrecision",
    "torch_zero1", "torch_fsdp2", "fsdp2_full_parameters",
]

# old names (issue 30): zero's FACTORS collided with labkit.ablation.FACTORS; validators are not the package's API
# (labkit.zero.optim.validate_optimizer_class); torch_ref held torch's implementations, not a one-process reference
__getattr__ = moved_names(__name__, {
    "FACTORS": "labkit.zero.comm:TRAFFIC_FACTORS",
    "validate_optimizer_class": "labkit.zero.optim:validate_optimizer_class",
    "check_optimizer_class": "labkit.zero.optim:validate_optimizer_class",
    "torch_ref": "labkit.zero:torch_impl",
})
