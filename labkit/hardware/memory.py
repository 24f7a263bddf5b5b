"""Lab 09's memory calculator: the bytes of one training step predicted for a model and a setup
(:func:`estimate`), and the largest batch that fits a budget (:func:`largest_batch`).

The calculator counts, in bytes: parameters, gradients and optimiser state (bytes per parameter from
:func:`labkit.memory_model.bytes_per_parameter`, ZeRO, Rajbhandari et al. 2019), the optimiser step's
temporaries (measured for torch 2.14 on CPU: the default for-loop Adam/AdamW makes ``sqrt(v)`` and its
quotient for one parameter at a time, 2 x the largest parameter; ``foreach=True`` makes one for every
parameter at once, 1 x all parameters; SGD, with or without momentum, updates in place, 0), and the activations
autograd saves for backward. For an ``nn.Module`` the activations come from walking the model on the ``meta``
device (:mod:`labkit.hardware.walk`); for a :class:`~labkit.hardware.transformer.TransformerShape` they are
Korthikanti et al. 2022's formulas (:func:`labkit.memory_model.transformer_activations`). Per rank, the ZeRO
stage over ``dp`` (:func:`labkit.memory_model.zero_bytes_each_rank`), ``tp`` and ``pp`` divide the model states,
and a pipeline stage holds :func:`labkit.memory_model.pipeline_in_flight` micro-batches.

Where the peak occurs: at the optimiser step (parameters + gradients + state + step temporaries), during
backward (parameters + state + the activations not yet freed + the gradients made so far + the gradient
flowing), or, where little is saved (a frozen backbone), in the forward (what is saved so far + one layer's input
and output), whichever is largest; the end of the forward is the start of the backward. The predicted peak is that
of the second and later steps: the first step's backward runs before any optimiser state exists, so its peak
can be lower by the state's size. :mod:`labkit.hardware.measure` checks every figure against a real run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from .._compat import renamed_kwargs
from .._validate import ArgumentError, validate_choice, validate_int
from ..memory_model import (
    OPTIMIZERS,
    PRECISIONS,
    bytes_per_parameter,
    pipeline_in_flight,
    transformer_activations,
    transformer_params,
    zero_bytes_each_rank,
)
from .transformer import TransformerShape
from .walk import backward_peak, checkpointed, meta_call, nbytes

__all__ = ["Setup", "Estimate", "estimate", "largest_batch"]



@renamed_kwargs(micro_batches="n_micro")
@dataclass(frozen=True)
class Setup:
    """How a model is trained: precision, optimiser, gradient accumulation, checkpointed segments and the
    parallel degrees (data parallel ``dp`` with ZeRO ``zero`` stage, tensor ``tp``, sequence ``sp``, pipeline
    ``pp`` with ``schedule`` over ``n_micro`` micro-batches). ``foreach`` picks torch's multi-tensor optimiser
    (``False`` is torch's default on CPU); ``flash`` says a fused attention kernel keeps no s x s scores (for a
    :class:`~labkit.hardware.transformer.TransformerShape`; a real model's walk sees what it calls)."""

    precision: str = "fp32"
    optimizer: str = "adam"
    grad_accum: int = 1
    checkpoint: int = 0
    dp: int = 1
    zero: int = 0
    tp: int = 1
    sp: bool = False
    pp: int = 1
    schedule: str = "1f1b"
    n_micro: int = 1
    foreach: bool = False
    flash: bool = False

    def __post_init__(self):
        validate_choice("precision", self.precision, PRECISIONS)
        validate_choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("grad_accum", "dp", "tp", "pp", "n_micro"):
            validate_int(name, getattr(self, name), minimum=1)
        validate_int("checkpoint", self.checkpoint, minimum=0,
                     hint="pass the number of checkpointed segments (0: none)")
        validate_int("zero", self.zero, minimum=0, maximum=3, hint="ZeRO stages are 0 (none), 1, 2 and 3")
        validate_choice("schedule", self.schedule, ("gpipe", "1f1b"))
        for name in ("sp", "foreach", "flash"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.sp and self.tp == 1:
            raise ArgumentError("sp must be False when tp=1: sequence parallelism splits along the tensor group")


@dataclass
class Estimate:
    """Predicted bytes of one training step (whole model), and per rank after the parallel degrees."""

    params: int
    grads: int
    optimizer: int
    intermediates: int
    activations: int
    peak: int
    rank_params: int = 0
    rank_grads: int = 0
    rank_optimizer: int = 0
    rank_activations: int = 0
    rank_peak: int = 0
    buffers: int = 0
    peak_at: str = ""
    formulas: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _intermediates(setup: Setup, sizes: Sequence[int], state_bytes: int) -> int:
    if setup.optimizer in ("sgd", "momentum") or not sizes:
        return 0
    return state_bytes * (sum(sizes) if setup.foreach else 2 * max(sizes))


def _state_bytes(setup):
    return 2 if setup.precision == "bf16" else 4


def estimate(model, setup: Setup = Setup(), sample=None) -> Estimate:
    """Predict the memory of one training step of ``model`` (an ``nn.Module`` with ``sample``, an input tensor or
    its shape, or a :class:`TransformerShape`) under ``setup``. The peak is at the first optimiser step (state
    created, plus its temporaries), during backward or in the forward, whichever is largest (``peak_at`` says
    which)."""
    if not isinstance(setup, Setup):
        raise ArgumentError(f"setup must be a Setup, got {type(setup).__name__}")
    if isinstance(model, TransformerShape):
        return _estimate_shape(model, setup)
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be an nn.Module or a TransformerShape, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ArgumentError(f"model must have parameters, got a {type(model).__name__} without any")
    x = _as_sample(model, sample)
    _check_degrees(model, setup)
    per = bytes_per_parameter(setup.precision, setup.optimizer)
    n = sum(p.numel() for p in params)
    sizes = [p.numel() for p in params if p.requires_grad]
    steps = 4 * len(sizes) if setup.optimizer in ("adam", "adamw") else 0  # one fp32 step counter per tensor
    est = Estimate(params=per["weights"] * n, grads=per["grads"] * sum(sizes),
                   optimizer=per["optimizer"] * sum(sizes) + steps,
                   intermediates=_intermediates(setup, sizes, _state_bytes(setup)), activations=0, peak=0,
                   buffers=sum(nbytes(b) for b in model.buffers()))
    est.formulas = {"params": f"{per['weights']} B x {n} parameters -- bytes_per_parameter (ZeRO 2019 sec. 3.1)",
                    "grads": f"{per['grads']} B x trainable parameters",
                    "optimizer": f"{per['optimizer']} B x trainable parameters (+ 4 B step counter per tensor for "
                                 "Adam) -- bytes_per_parameter",
                    "intermediates": ("all parameters at once (foreach)" if setup.foreach else
                                      "2 x the largest parameter (for-loop sqrt(v) and its quotient)")
                    + " -- measured, torch 2.14 CPU",
                    "activations": "saved tensors, per-function rules on the meta device -- this module"}
    if setup.precision.startswith("autocast") or setup.precision.startswith("mixed"):
        est.notes.append(f"activations are walked in fp32: the rules do not model {setup.precision}'s casts "
                         "(16-bit copies of weights and inputs saved for backward)")
    mode = model.training
    model.train()
    try:
        if setup.checkpoint and isinstance(model, nn.Sequential):
            acts, walk = checkpointed(model, x, setup.checkpoint)
            est.notes.append(f"{setup.checkpoint} checkpointed segments: segment inputs + the largest segment, "
                             "recomputed in backward (Chen et al. 2016)")
        else:
            if setup.checkpoint:
                est.notes.append("checkpoint ignored: checkpointed segments need an nn.Sequential")
            dtype = torch.bfloat16 if setup.precision == "bf16" else None
            walk, _ = meta_call(model, x, dtype=dtype)
            acts = sum(walk.saved.values())
            est.notes += list(dict.fromkeys(walk.notes))
            if walk.unknown:
                acts, _ = meta_call(model, x, ledger=True, dtype=dtype)
                est.notes.append("no rule for " + ", ".join(sorted(set(walk.unknown))) +
                                 ": activations from a saved_tensors_hooks ledger on the meta device")
                walk = None
    except ArgumentError:
        raise
    except Exception as e:  # a forward that reads values, or a sample the model does not accept
        raise ArgumentError(
            f"model {type(model).__name__} could not be walked on the meta device with a sample of shape "
            f"{tuple(x.shape)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. The calculator runs "
            "the model without data, so a sample of the wrong shape, or a forward that reads values (.item(), "
            "branches on data), cannot be walked: pass a sample the model accepts, or measure it with "
            "labkit.hardware.measure(model, sample)") from e
    finally:
        model.train(mode)
    est.activations = acts
    grads_all = setup.grad_accum > 1
    backward = backward_peak(walk, params, per["grads"], est.grads, grads_all) if walk else acts + est.grads
    held = walk is not None and walk.input in walk.saved   # the input, saved by the first op: counted in backward
    fixed = est.params + est.buffers + est.optimizer + (0 if held else nbytes(x)) + 8 * x.shape[0]
    step = est.grads + est.intermediates
    forward = walk.forward_peak if walk else 0   # above the backward's only where little is saved (a frozen backbone)
    est.peak = int(fixed + max(backward, step, forward))
    est.peak_at = ("in the forward" if forward > max(backward, step) else "during backward" if backward > step
                   else "in the optimiser step (state created at the first)")
    _per_rank_figures(est, setup, acts)
    return est


def _per_rank_figures(est: Estimate, setup: Setup, acts_one: int, tp_acts: int | None = None):
    n_bytes = {"weights": est.params, "grads": est.grads, "optimizer": est.optimizer}
    shard = 1
    for k, stage in (("optimizer", 1), ("grads", 2), ("weights", 3)):
        if setup.zero >= stage:
            n_bytes[k] = n_bytes[k] / setup.dp
    shard = setup.tp * setup.pp
    est.rank_params = int(n_bytes["weights"] / shard)
    est.rank_grads = int(n_bytes["grads"] / shard)
    est.rank_optimizer = int(n_bytes["optimizer"] / shard)
    flight = pipeline_in_flight(setup.schedule, 0, setup.pp, setup.n_micro) if setup.pp > 1 else 1
    per_stage = (tp_acts if tp_acts is not None else acts_one / setup.tp) / setup.pp
    est.rank_activations = int(per_stage * flight)
    est.rank_peak = int(est.rank_params + est.rank_grads + est.rank_optimizer + est.intermediates / shard
                        + est.rank_activations + est.buffers)
    est.formulas["per rank"] = ("ZeRO stage over dp (zero_bytes_each_rank), / tp x pp for model states; "
                                f"activations / tp / pp x {flight} micro-batches in flight (pipeline_in_flight)")


def _tensor_sizes(shape: TransformerShape) -> list[int]:
    """Elements of each parameter tensor of :class:`~labkit.hardware.transformer.TinyTransformer` of ``shape``
    (the optimiser's step works tensor by tensor): per layer QKV, projection and the MLP's two weights with their
    biases and two LayerNorms; the (tied) embedding and the final LayerNorm."""
    h = shape.width
    layer = [3 * h * h, 3 * h, h * h, h, 4 * h * h, 4 * h, 4 * h * h, h, h, h, h, h]
    return layer * shape.layers + [h * shape.vocab, h, h]


def _estimate_shape(shape: TransformerShape, setup: Setup) -> Estimate:
    if shape.layers % setup.pp:
        raise ArgumentError(f"pp must divide layers, got pp={setup.pp}, layers={shape.layers}")
    for name, dim in (("heads", shape.heads), ("width", shape.width)):
        if dim % setup.tp:
            raise ArgumentError(f"tp must divide {name}, got tp={setup.tp}, {name}={dim}")
    n = transformer_params(shape.layers, shape.width, shape.vocab)
    per = bytes_per_parameter(setup.precision, setup.optimizer)
    bpv = 4 if setup.precision == "fp32" else 2
    recompute = "full" if setup.checkpoint else "none"
    kw = dict(seq=shape.seq, micro_batch=shape.micro_batch, width=shape.width, heads=shape.heads,
              layers=shape.layers, recompute=recompute, bytes_per_value=bpv,
              flash=setup.flash)
    acts = transformer_activations(**kw)
    tp_acts = transformer_activations(**kw, tp=setup.tp, sp=setup.sp)
    z = zero_bytes_each_rank(n, 1, 0, setup.precision, setup.optimizer)
    est = Estimate(params=int(z["weights"]), grads=int(z["grads"]), optimizer=int(z["optimizer"]),
                   intermediates=_intermediates(setup, _tensor_sizes(shape), _state_bytes(setup)),
                   activations=acts, peak=0)
    est.peak = est.params + est.optimizer + max(acts + est.grads, est.grads + est.intermediates)
    est.peak_at = "during backward" if acts > est.intermediates else "in the optimiser step"
    est.formulas = {"params": "h.v + L(12h^2 + 13h) + 2h -- Ultra-Scale Playbook",
                    "optimizer": f"{per['optimizer']} B/parameter -- ZeRO 2019 sec. 3.1",
                    "activations": "sbh(34 + 5as/h) per layer, tp/sp/recompute variants -- Korthikanti et al. 2022",
                    "intermediates": ("all parameters at once (foreach)" if setup.foreach else
                                      "2 x the largest parameter (embedding or MLP weight)")
                    + " -- measured, torch 2.14 CPU"}
    _per_rank_figures(est, setup, acts, tp_acts)
    return est


def _as_sample(model: nn.Module, sample) -> torch.Tensor:
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(sample, (tuple, list, torch.Size)) and sample and all(isinstance(d, int) and not isinstance(d, bool)
                                                                        for d in sample):
        for d in sample:
            validate_int("sample", d, minimum=1, hint="every dimension (the batch first) must be >= 1")
        first = next((m for m in model.modules() if not list(m.children())), None)
        if isinstance(first, nn.Embedding):  # token ids for a language model
            return torch.randint(0, first.num_embeddings, tuple(sample))
        return torch.randn(tuple(sample))
    raise ArgumentError(f"sample must be an input tensor or its shape (a tuple of ints, batch first), got "
                        f"{type(sample).__name__}: pass e.g. sample=(8, 3, 32, 32) for {type(model).__name__}")


def _check_degrees(model: nn.Module, setup: Setup):
    for name, m in model.named_modules():
        dim = m.out_features if isinstance(m, nn.Linear) else m.out_channels if isinstance(m, nn.Conv2d) else None
        if dim is not None and dim % setup.tp:
            raise ArgumentError(f"tp must divide every layer's output width, got tp={setup.tp} and {name} "
                                f"({type(m).__name__}) with {dim} outputs")
    children = max(1, len(list(model.children())))  # a single layer is one stage
    if setup.pp > children:
        raise ArgumentError(f"pp must be <= the model's {children} top-level layers, got pp={setup.pp}")


def largest_batch(model: nn.Module, sample_shape: Sequence[int], budget_bytes: int, setup: Setup = Setup()) -> int:
    """The largest batch whose predicted peak fits ``budget_bytes``.

    The peak never falls as the batch grows, but it is not affine in it: while the optimiser step's peak dominates
    (small batches), a larger batch barely moves it; once the backward's dominates, each image adds its activations.
    So the search doubles the batch until the peak passes the budget, then bisects: about 2 log2(b) estimates."""
    budget = validate_int("budget_bytes", budget_bytes, minimum=1)
    shape = _shape(sample_shape)
    peak = lambda b: estimate(model, setup, (b, *shape[1:])).peak
    p1 = peak(1)
    if p1 > budget:
        raise ArgumentError(f"budget_bytes must hold at least batch 1 ({p1} bytes predicted), got {budget}: pass a "
                            f"budget of at least {p1} bytes, or a smaller model")
    lo, hi = 1, 2
    while peak(hi) <= budget:  # lo fits, hi does not
        lo, hi = hi, 2 * hi
        if hi > 2 ** 40:
            raise ArgumentError(f"budget_bytes={budget} fits every batch up to {lo}: the peak does not grow with the "
                                "batch, so the budget does not limit it")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
    return lo


def _shape(sample_shape) -> tuple:
    if not isinstance(sample_shape, (tuple, list, torch.Size)) or not sample_shape:
        raise ArgumentError(f"sample_shape must be a tuple of ints (batch first), got {sample_shape!r}")
    for d in sample_shape:
        validate_int("sample_shape", d, minimum=1, hint="every dimension must be >= 1")
    return tuple(sample_shape)
