"""Stages for :mod:`labkit.pipeline`: simulated (sleeping) stages and picklable model splitters.

* :class:`SleepStage` — forward sleeps ``forward_s`` and backward ``backward_s`` seconds per input row
  (a custom autograd function), times a learnable ``gain`` so it has a real gradient; ``weight_s`` of the
  backward is spent on the gain's gradient, so a zero-bubble schedule's W sleeps it and its B the rest. Sleeping uses
  no CPU, so schedule effects show exactly even with 4 ranks on 2 cores (torchgpipe tests its
  balancing the same way).
* :class:`SleepStages` — ``make_stage`` for a list of sleeping stages.
* :class:`ModelStages` — ``make_stage`` that builds a seeded model and keeps stage ``i``'s layers
  (uses :func:`labkit.sliced.flatten_resnet` and the cut rules of :mod:`labkit.partition`); ``"mlp"`` is
  :func:`labkit.models.mlp` of :data:`MLP_WIDTHS`, a Linear/ReLU stack to split when no ResNet is wanted.

All are re-exported by :mod:`labkit.pipeline`.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from ..models import mlp
from ..partition import even_cuts, stage_ranges, validate_cuts, validate_stages
from ..sliced import build_model, flatten_resnet

__all__ = ["Sleep", "SleepStage", "SleepStages", "ModelStages"]

#: ``ModelStages("mlp")``'s layer widths: 32 inputs, six hidden layers of 64, 10 outputs (13 layers with the ReLUs).
MLP_WIDTHS = (32, 64, 64, 64, 64, 64, 64, 10)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
class Sleep(torch.autograd.Function):
    """y = x * gain, sleeping ``forward_s`` in forward and ``backward_s`` in backward: a real gradient and
    a known cost. With ``per_row`` (the default) the times are per input row, so a micro-batch of k rows
    costs k times as much; without it they are per call (lab 05's sleeping layers)."""

    @staticmethod
    def forward(ctx, x, gain, forward_s, backward_s, per_row=True):
        rows = x.shape[0] if per_row else 1
        ctx.backward_s = backward_s * rows
        ctx.save_for_backward(x, gain)
        time.sleep(forward_s * rows)
        return x * gain

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        x, gain = ctx.saved_tensors
        grad_x = grad * gain if ctx.needs_input_grad[0] else None
        return grad_x, (grad * x).sum(), None, None, None


class SleepStage(nn.Module):
    """A simulated stage: forward sleeps ``forward_s`` and backward ``backward_s`` seconds per input row.

    It multiplies its input by a parameter ``gain`` (1.0), so it has a real gradient and a pipeline
    of sleeping stages can be checked against the unpipelined model like any other. The backward is two
    autograd nodes: the input's gradient sleeps ``backward_s - weight_s`` per row and the gain's ``weight_s``,
    so a zero-bubble schedule that computes them apart (its B and W) sleeps each part once.
    """

    def __init__(self, forward_s: float = 0.01, backward_s: float = 0.02, weight_s: float = 0.0):
        super().__init__()
        for name, v in (("forward_s", forward_s), ("backward_s", backward_s), ("weight_s", weight_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 60:
                raise ValueError(f"{name} must be a number of seconds per row in [0, 60), got {v!r}")
        if weight_s > backward_s:
            raise ValueError(f"weight_s is the weight-gradient part of the backward: pass weight_s <= backward_s "
                             f"({backward_s}), got {weight_s}")
        self.forward_s, self.backward_s, self.weight_s = float(forward_s), float(backward_s), float(weight_s)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        # The input's path sleeps backward_s - weight_s per row (a zero-bubble B). A throwaway leaf that needs a
        # gradient keeps that node in the graph on the first stage too, whose input needs none.
        one = torch.ones((), dtype=self.gain.dtype, device=x.device)
        h = Sleep.apply(x, one.clone().requires_grad_(), self.forward_s, self.backward_s - self.weight_s)
        # The gain's path sleeps weight_s per row (a W). Its gradient, sum(grad * x), flows through the second term,
        # zero in value, so y is exactly x * gain and autograd saves no more than x.
        g = Sleep.apply(self.gain, one, 0.0, self.weight_s * x.shape[0], False)
        g0 = g.detach()
        return h * g0 + x.detach() * (g - g0)

    def extra_repr(self):
        return f"forward_s={self.forward_s}, backward_s={self.backward_s}, weight_s={self.weight_s}"


class SleepStages:
    """``make_stage`` for sleeping stages: stage ``i`` sleeps ``forward_s[i]`` / ``backward_s[i]`` per row
    (``weight_s[i]`` of the backward on the weight's gradient)."""

    def __init__(self, forward_s, backward_s=None, n_stages: int | None = None, weight_s=0.0):
        fw = [forward_s] * (n_stages or 1) if isinstance(forward_s, (int, float)) else list(forward_s)
        if backward_s is None:
            bw = [2 * f for f in fw]
        else:
            bw = [backward_s] * len(fw) if isinstance(backward_s, (int, float)) else list(backward_s)
        wt = [weight_s] * len(fw) if isinstance(weight_s, (int, float)) else list(weight_s)
        if not len(bw) == len(wt) == len(fw):
            raise ValueError(f"forward_s, backward_s and weight_s need one value per stage; got {len(fw)}, {len(bw)} "
                             f"and {len(wt)}")
        self.forward_s, self.backward_s, self.weight_s, self.n_stages = fw, bw, wt, len(fw)
        if not fw:
            raise ValueError("SleepStages needs at least one stage time")
        for f, b, w in zip(fw, bw, wt):  # validate here, not on the ranks
            SleepStage(f, b, w)

    def __call__(self, i: int) -> SleepStage:
        return SleepStage(self.forward_s[i], self.backward_s[i], self.weight_s[i])


class ModelStages:
    """``make_stage`` that builds a whole model (seeded) and keeps only stage ``i``'s layers.

    ``build`` returns a model (an ``nn.Sequential``, or a ResNet that :func:`labkit.sliced.flatten_resnet`
    flattens), or is one of the names ``"mlp"`` (:func:`labkit.models.mlp` of :data:`MLP_WIDTHS`), ``"small"``,
    ``"resnet18"``, ``"resnet50"``.
    ``cuts`` are cut points (stage ``i`` starts at layer ``cuts[i-1]``, :mod:`labkit.partition`); or give
    ``n_stages`` for an even split by layer count. Every rank calls it and gets identical weights.
    """

    def __init__(self, build: Callable | str = "mlp", cuts=None, n_stages: int | None = None, seed: int = 0):
        if not (callable(build) or build in ("mlp", "small", "resnet18", "resnet50")):
            raise ValueError(f"build must be a function returning a model, or 'mlp', 'small', 'resnet18', "
                             f"'resnet50'; got {build!r}")
        self.build, self.seed = build, seed
        n_layers = len(self.full())
        if cuts is None:
            if n_stages is None:
                raise ValueError("pass cuts=[...] (where each stage after the first starts) or n_stages=K "
                                 "(even split by layers)")
            cuts = even_cuts(n_layers, validate_stages(n_stages, n_layers))
        self.cuts = validate_cuts(cuts, n_layers)
        if n_stages is not None and n_stages != len(self.cuts) + 1:
            raise ValueError(f"n_stages={n_stages} but {len(self.cuts)} cuts give "
                             f"{len(self.cuts) + 1} stages; pass one or the other")
        self.n_stages = len(self.cuts) + 1
        self.n_layers = n_layers

    def full(self) -> nn.Sequential:
        """The whole model as one flat ``nn.Sequential`` (the single-process reference)."""
        torch.manual_seed(self.seed)
        if self.build == "mlp":
            model = mlp(MLP_WIDTHS)  # no seed: the generator seeded above builds it
        elif isinstance(self.build, str):
            model = build_model(self.build, seed=self.seed)
        else:
            model = self.build()
        return flatten_resnet(model)

    def __call__(self, i: int) -> nn.Sequential:
        if not 0 <= i < self.n_stages:
            raise ValueError(f"stage index {i} out of range for {self.n_stages} stages")
        r = stage_ranges(self.cuts, self.n_layers)[i]
        return self.full()[r.start:r.stop]
