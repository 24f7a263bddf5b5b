"""Context parallelism as a fourth dimension of lab 11's grid: the capstone trained on dp × pp × cp × tp ranks.

Lab 11's :func:`~labkit.capstone.grid.run_grid` takes ``cp`` and an attention that crosses the cp group; lab 12
brings that attention, :func:`~labkit.context_expert.ring.ring_attention`, and this module hands it over
(lab 11 comes first in the course and does not import lab 12):

- :class:`RingAttention`: ``positions(seq, cp, rank)``, the tokens a cp rank holds in the chosen layout
  (``"zigzag"`` or ``"contiguous"``), and ``attention(qkv, heads, group)``, the ring over the cp group on the fused
  qkv output of this tensor-parallel rank's heads (the capstone's head-major layout, as :func:`~labkit.capstone.
  model.attend` reads it).
- :func:`run_cp_grid`: the grid, ``ctx.mesh(dp=, pp=, tp=, cp=)`` on every rank (:mod:`labkit.runtime.mesh`; cp
  sits between pp and tp in the rank layout), each rank's loss the mean over its own tokens and the gradients
  averaged over the dp × cp group, as Megatron-LM does. ``GridRun.compare`` against one process: the same losses
  and weights, to 1e-9 in float64.
- :func:`predict_cp`: lab 11's byte formulas (:func:`~labkit.capstone.traffic.predict`) with the ring's sends
  (:func:`~labkit.context_expert.ring.ring_bytes`) as the cp group's term.

Every combination of the four runs: cp with tensor parallelism (each rank's ring carries its own heads), with
pipeline parallelism (a stage sends ``micro_batch × seq/cp × width`` activations) and with sequence parallelism
(the tp ranks split this cp rank's ``seq/cp`` tokens further between the attention and MLP layers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import validate_choice, validate_int
from ..capstone.grid import GridRun, run_grid
from ..capstone.model import Config
from ..capstone.traffic import predict
from .ring import LAYOUTS, positions, ring_attention, ring_bytes

__all__ = ["RingAttention", "run_cp_grid", "predict_cp"]


@dataclass(frozen=True)
class RingAttention:
    """Ring attention in the form lab 11's grid takes as ``cp_attention`` (see the module docstring)."""

    layout: str = "zigzag"

    def __post_init__(self):
        validate_choice("layout", self.layout, LAYOUTS)

    def positions(self, seq: int, cp: int, rank: int) -> torch.Tensor:
        """The global positions of cp rank ``rank``'s tokens, in its local order."""
        return positions(seq, cp, rank, self.layout)

    def __call__(self, qkv: torch.Tensor, heads: int, group=None, stats: dict | None = None) -> torch.Tensor:
        """Causal attention from the fused ``qkv`` output of this rank's tokens (``B × seq/cp × heads·3·head_dim``,
        head by head) to ``B × seq/cp × heads·head_dim``, over the whole sequence split over ``group``."""
        b, s, _ = qkv.shape
        q, k, v = qkv.view(b, s, heads, 3, -1).permute(3, 0, 2, 1, 4)   # each B × heads × seq/cp × head_dim
        return ring_attention(q, k, v, self.layout, group, stats).transpose(1, 2).reshape(b, s, -1)


def run_cp_grid(dp: int = 1, cp: int = 2, pp: int = 1, tp: int = 1, layout: str = "zigzag", sp: bool = False,
                steps: int = 3, batch: int = 16, n_micro: int | None = None, cfg: Config = Config(), seed: int = 0,
                lr: float = 3e-3, timeout: float = 300, pool: bool = True, backend: str = "auto") -> GridRun:
    """Train lab 11's model on ``dp·pp·cp·tp`` ranks, each sequence split over cp ranks in ``layout``, attention by
    the ring: lab 11's :func:`~labkit.capstone.grid.run_grid` with ``cp_attention=RingAttention(layout)``."""
    validate_choice("layout", layout, LAYOUTS)
    return run_grid(dp, pp, tp, sp=sp, steps=steps, batch=batch, n_micro=n_micro, cfg=cfg, seed=seed, lr=lr,
                    timeout=timeout, pool=pool, backend=backend, cp=validate_int("cp", cp, minimum=1),
                    cp_attention=RingAttention(layout))


def predict_cp(cfg: Config, dp: int, cp: int, pp: int, tp: int, sp: bool = False, batch: int = 16, n_micro: int = 4,
               e: int = 8) -> dict:
    """``{group: {op: payload bytes per step}}`` averaged over the ranks, as :class:`~labkit.capstone.grid.GridRun`
    measures them: lab 11's formulas on this rank's ``seq/cp`` tokens, the ring's sends under ``"cp"`` and the
    gradients' all-reduce under ``"dp_cp"``."""
    return predict(cfg, dp, pp, tp, sp, batch, n_micro, e, cp=validate_int("cp", cp, minimum=1), ring_bytes=ring_bytes)
