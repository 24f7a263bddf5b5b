"""Contiguous splits of a layer list into stages: one vocabulary for labs 03, 04 and 05.

A model of ``n_layers`` layers is cut into ``n_stages`` stages of consecutive layers. Two equivalent ways
to write a split:

* **cuts**: the layer index where each stage after the first starts, strictly increasing, each in
  ``1 .. n_layers - 1``; ``n_stages - 1`` of them. ``[4, 8]`` on 11 layers is ``layers[0:4]``,
  ``layers[4:8]``, ``layers[8:11]``.
* **sizes**: layers per stage (torchgpipe's ``balance``), each ``>= 1``: ``[4, 4, 3]``.

The one "even" split (:func:`even_cuts`) gives every stage ``n_layers // n_stages`` layers and the first
``n_layers % n_stages`` stages one more: 11 layers in 3 stages are ``[4, 4, 3]``, cuts ``[4, 8]``. Every lab
that splits evenly (the sliced ResNet, the pipeline's ``ModelStages``, the balancer's baseline) uses it.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

from ._compat import renamed_kwargs

__all__ = ["validate_cuts", "validate_stages", "cuts_to_sizes", "sizes_to_cuts", "even_cuts", "stage_ranges",
           "stage_sums", "as_costs"]


@renamed_kwargs(k="n_stages")
def validate_stages(n_stages, n_layers: int) -> int:
    """``n_stages`` as a number of stages for ``n_layers`` layers: an int in ``1 .. n_layers``."""
    if isinstance(n_stages, bool) or not isinstance(n_stages, int):
        raise TypeError(f"the number of stages must be an int, got {n_stages!r}")
    if n_stages < 1:
        raise ValueError(f"the number of stages must be >= 1, got {n_stages}")
    if n_stages > n_layers:
        raise ValueError(f"cannot cut {n_layers} layer(s) into {n_stages} stages: every stage needs at least one "
                         f"layer; use at most {n_layers} stages (the model has only {n_layers} layers)")
    return n_stages


def validate_cuts(cuts, n_layers: int, n_stages: int | None = None) -> list[int]:
    """Validate cut points for ``n_layers`` layers (and ``n_stages`` stages if given); return them as a list."""
    if isinstance(cuts, (str, bytes, int)) or not isinstance(cuts, (list, tuple)) and not hasattr(cuts, "tolist"):
        raise TypeError(f"cuts must be a list of layer indices such as [4] or [3, 7] (the index where each stage "
                        f"after the first starts), got {cuts!r}")
    cuts = list(cuts.tolist() if hasattr(cuts, "tolist") else cuts)
    for c in cuts:
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"cut {c!r} is not an int; cuts are integers (layer indices) such as [4] or [3, 7]")
    if n_stages is not None and len(cuts) != n_stages - 1:
        raise ValueError(f"{n_stages} stages need {n_stages - 1} cut(s), got {len(cuts)}: {cuts}")
    if len(cuts) + 1 > n_layers:
        raise ValueError(f"{len(cuts) + 1} stages asked for but the model has only {n_layers} layers: "
                         f"pass at most {n_layers - 1} cuts")
    bad = [c for c in cuts if not 1 <= c <= n_layers - 1]
    if bad:
        raise ValueError(f"cuts {bad} are out of range: with {n_layers} layers a cut must be in 1..{n_layers - 1} "
                         f"(a cut c starts a new stage at layer c; 0 or {n_layers} would leave a stage empty)")
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cuts must be strictly increasing (each stage needs at least one layer), got {cuts}; "
                         f"try sorted(set(cuts))")
    return cuts


def stage_ranges(cuts, n_layers: int) -> list[range]:
    """``[4]`` with 6 layers -> ``[range(0, 4), range(4, 6)]``: the layers of each stage."""
    edges = [0, *validate_cuts(cuts, n_layers), n_layers]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def cuts_to_sizes(cuts, n_layers: int) -> list[int]:
    """``[4]`` with 6 layers -> ``[4, 2]`` (layers per stage)."""
    return [len(r) for r in stage_ranges(cuts, n_layers)]


def sizes_to_cuts(sizes) -> list[int]:
    """``[4, 2]`` -> ``[4]``; every size must be an int >= 1 (torchgpipe's ``balance``)."""
    sizes = list(sizes) if not isinstance(sizes, (int, str, bytes)) else sizes
    if not isinstance(sizes, list) or not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                                        for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive layer counts (ints >= 1) such as [3, 4, 5], "
                         f"got {sizes!r}")
    return list(itertools.accumulate(sizes))[:-1]


@renamed_kwargs(k="n_stages")
def even_cuts(n_layers: int, n_stages: int) -> list[int]:
    """The naive split: the same number of layers per stage, the first stages taking the remainder."""
    validate_stages(n_stages, n_layers)
    q, r = divmod(n_layers, n_stages)
    return sizes_to_cuts([q + (1 if stage < r else 0) for stage in range(n_stages)])


def as_costs(costs, what: str = "costs") -> list[float]:
    """``costs`` (one per layer) as a list of finite numbers >= 0, or a clear error."""
    if hasattr(costs, "tolist"):
        costs = costs.tolist()
    if isinstance(costs, (str, bytes)) or not isinstance(costs, Sequence):
        raise TypeError(f"{what} must be a list of non-negative numbers (one per layer), got {type(costs).__name__}")
    out = []
    for i, c in enumerate(costs):
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise TypeError(f"{what}[{i}] is {c!r}; pass plain numbers (milliseconds, bytes, ...)")
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"{what}[{i}] = {c!r}: every cost must be a finite number >= 0")
        out.append(c)
    if not out:
        raise ValueError(f"{what} is empty: pass one cost per layer")
    return out


def stage_sums(costs, cuts) -> list[float]:
    """The cost of each stage: the sum of its layers' costs."""
    costs = as_costs(costs)
    prefix = [0, *itertools.accumulate(costs)]
    return [prefix[r.stop] - prefix[r.start] for r in stage_ranges(cuts, len(costs))]
