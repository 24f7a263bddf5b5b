"""The collectives ZeRO uses, each counted as it is sent, so a test can check the paper's communication volumes.

Accounting (Rajbhandari et al. 2019, "ZeRO", arXiv 1910.02054, section 7: 7.1 for data parallelism, 7.2 for
ZeRO), for a buffer of Ψ values, per rank:

    all-gather      Ψ     (each rank receives the N-1 slices it lacks; a ring sends (N-1)/N·Ψ per rank)
    reduce-scatter  Ψ     (a ring sends (N-1)/N·Ψ per rank)
    all-reduce      2Ψ    (= reduce-scatter + all-gather, as ring all-reduce does it)
    reduce          s     (a reduce of s values to the rank that owns them; ZeRO-2 reduces each gradient bucket's
                           pieces to their owners, and these pieces, over all owners, make one reduce-scatter)

so per training step plain data parallelism moves 2Ψ (one all-reduce of the gradients), ZeRO-1 and ZeRO-2 also
2Ψ (reduce-scatter the gradients, all-gather the updated parameters), and ZeRO-3 3Ψ (all-gather the parameters in
the forward, again in the backward, reduce-scatter the gradients): 1.5x, the paper's figure. ``volume`` counts the
paper's Ψ units in bytes; ``ring_bytes`` multiplies by (N-1)/N, what a ring implementation really sends per rank.
ZeRO pads the flat buffer to a multiple of N, so its Ψ is the padded length (at most N-1 values more than P).
The one-off broadcast when a model is wrapped and the gathers of ``state_dict()`` are not part of a step and are
not counted.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._compat import moved_names
from ..distops import all_gather_tensor, reduce_scatter_tensor

__all__ = ["Traffic", "TRAFFIC_FACTORS"]

#: Each collective's traffic in the paper's units, as a multiple of the buffer it is given (the table above).
TRAFFIC_FACTORS = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2, "reduce": 1}


class Traffic:
    """Counts the collectives one rank runs: ``calls[op]``, ``volume`` (bytes, paper units) and ``ring_bytes``."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.reset()

    def reset(self) -> None:
        self.calls = {op: 0 for op in TRAFFIC_FACTORS}
        self.volume_by_op = {op: 0 for op in TRAFFIC_FACTORS}
        self.volume_by_label: dict[str, int] = {}  # e.g. ZeRO-3's "backward" all-gathers

    @property
    def volume(self) -> int:
        return sum(self.volume_by_op.values())

    @property
    def ring_bytes(self) -> float:
        return self.volume * (self.world_size - 1) / self.world_size

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "volume_by_op": dict(self.volume_by_op), "volume": self.volume,
                "volume_by_label": dict(self.volume_by_label), "ring_bytes": self.ring_bytes}

    def _count(self, op: str, t: torch.Tensor, label: str | None = None) -> None:
        v = TRAFFIC_FACTORS[op] * t.numel() * t.element_size()
        self.calls[op] += 1
        self.volume_by_op[op] += v
        if label is not None:
            self.volume_by_label[label] = self.volume_by_label.get(label, 0) + v

    # the collectives, counted: ``full`` is always the whole (padded) buffer, ``shard`` one rank's 1/N of it
    def all_gather(self, full: torch.Tensor, shard: torch.Tensor, async_op: bool = False, label: str | None = None):
        self._count("all_gather", full, label)
        return all_gather_tensor(full, shard, group=self.group, async_op=async_op)

    def reduce_scatter(self, shard: torch.Tensor, full: torch.Tensor, async_op: bool = False):
        self._count("reduce_scatter", full)
        return reduce_scatter_tensor(shard, full, group=self.group, async_op=async_op)

    def all_reduce(self, t: torch.Tensor, async_op: bool = False):
        self._count("all_reduce", t)
        return dist.all_reduce(t, group=self.group, async_op=async_op)

    def reduce(self, t: torch.Tensor, dst: int, async_op: bool = False):
        """Reduce ``t`` onto group rank ``dst``."""
        self._count("reduce", t)
        to = dist.get_global_rank(self.group, dst) if self.group is not None else dst
        return dist.reduce(t, dst=to, group=self.group, async_op=async_op)


# old name (issue 30): labkit.ablation.FACTORS are an experiment's factors, another idea
__getattr__ = moved_names(__name__, {"FACTORS": "labkit.zero.comm:TRAFFIC_FACTORS"})
