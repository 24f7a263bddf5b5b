"""Profiling layers for load balancing: forward+backward time, parameter and activation bytes per layer,
and the balancers that turn a profile into the best split (by time or by memory); layers that sleep,
whose cost is known, to test it all deterministically."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .._compat import renamed_kwargs
from .._validate import validate_int
from ..devices import now
from ..memory_model import bytes_per_parameter
from ..partition import as_costs as _as_costs
from ..pipeline import Sleep  # one sleeping autograd function for labs 04 and 05
from .solvers import Split, min_max_partition


# --------------------------------------------------------------------------- profiling
def as_layers(model) -> list:
    """The layers of an ``nn.Sequential`` (or a list/tuple of modules), as a list."""
    if isinstance(model, nn.Sequential):
        layers = list(model)
    elif isinstance(model, (list, tuple)) and all(isinstance(m, nn.Module) for m in model):
        layers = list(model)
    elif isinstance(model, nn.Module):
        raise TypeError(f"{type(model).__name__} is not a sequence of layers: pass an nn.Sequential or a list of "
                        f"modules (for a ResNet, labkit.sliced.flatten_resnet(model) gives one)")
    else:
        raise TypeError(f"pass an nn.Sequential or a list of nn.Module layers, got {type(model).__name__}")
    if not layers:
        raise ValueError("the model has no layers to profile")
    return layers


@dataclass
class LayerProfile:
    """What one layer costs: time per training step (median of repeats) and memory."""

    index: int
    name: str
    forward_ms: float
    backward_ms: float
    param_bytes: int
    activation_bytes: int  # tensors autograd saves for the backward pass (parameters excluded)
    output_bytes: int      # the tensor handed to the next layer (what a pipeline stage would send)

    @property
    def time_ms(self) -> float:
        return self.forward_ms + self.backward_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "time_ms": self.time_ms}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"a layer returned {type(out).__name__}; balancing needs layers that take and return one tensor")


def profile_layers(model, sample, repeats: int = 5, warmup: int = 1) -> list[LayerProfile]:
    """Time each layer's forward and backward (median of ``repeats``) and measure its memory.

    Each layer runs on the previous layer's output (detached, so its backward is timed alone),
    with a random output gradient. Parameter bytes are counted from the layer's parameters;
    activation bytes are the tensors autograd keeps for the layer's backward (found with
    ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded, each storage once).
    The layers run in their current mode (``train()`` for training costs) on the sample's device
    (synchronised on CUDA). The model's parameters, gradients and buffers (BatchNorm statistics)
    are left as they were.
    """
    layers = as_layers(model)
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be an input tensor (a batch), got {type(sample).__name__}")
    repeats = validate_int("repeats", repeats, minimum=1)
    params = [p for m in layers for p in m.parameters()]
    saved_grads = [p.grad for p in params]
    saved_buffers = [(b, b.detach().clone()) for m in layers for b in m.buffers()]
    fwd = [[] for _ in layers]
    bwd = [[] for _ in layers]
    act_bytes, out_bytes = [0] * len(layers), [0] * len(layers)
    _warm_autograd()
    try:
        for it in range(warmup + repeats):
            x = sample.detach()
            for i, layer in enumerate(layers):
                leaf = x.detach().requires_grad_(x.is_floating_point())
                inp = leaf.clone() if leaf.requires_grad else leaf  # a clone lets in-place layers (ReLU) run
                param_ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters()}
                storages: dict[int, int] = {}

                def pack(t, storages=storages, param_ptrs=param_ptrs):
                    try:
                        st = t.untyped_storage()
                        if st.data_ptr() not in param_ptrs:
                            storages[st.data_ptr()] = st.nbytes()
                    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, ...)
                        storages[id(t)] = _nbytes(t)
                    return t

                t0 = now(x)
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = _first_tensor(layer(inp))
                t1 = now(out)
                if out.requires_grad:
                    grad = torch.randn_like(out)
                    t2 = now(grad)
                    torch.autograd.backward(out, grad)
                    t3 = now(out)
                else:
                    t2 = t3 = 0.0
                if it >= warmup:
                    fwd[i].append(t1 - t0)
                    bwd[i].append(t3 - t2)
                    act_bytes[i] = sum(storages.values())
                    out_bytes[i] = _nbytes(out)
                x = out.detach()
    finally:
        with torch.no_grad():
            for p, g in zip(params, saved_grads):
                p.grad = g
            for b, v in saved_buffers:
                b.copy_(v)
    names = [type(m).__name__ for m in layers]
    return [LayerProfile(i, names[i], 1e3 * statistics.median(fwd[i]), 1e3 * statistics.median(bwd[i]),
                         sum(_nbytes(p) for p in layers[i].parameters()), act_bytes[i], out_bytes[i])
            for i in range(len(layers))]


def _warm_autograd() -> None:
    """The first ``backward(out, grad)`` in a process imports torch's symbolic-shape machinery
    (sympy): a one-off second or more. Pay it here, before anything is timed."""
    x = torch.ones(2, requires_grad=True)
    y = Sleep.apply(x * 1, torch.ones(()), 0.0, 0.0, False)
    torch.autograd.backward(y, torch.ones_like(y))


def _costs_from(profiles_or_costs, key: Callable[[LayerProfile], float]) -> list[float]:
    items = list(profiles_or_costs)
    if items and all(isinstance(p, LayerProfile) for p in items):
        return [key(p) for p in items]
    return _as_costs(items)


@renamed_kwargs(k="n_stages")
def balance_by_time(profiles_or_costs, n_stages: int, method: str = "dp") -> Split:
    """The split into ``n_stages`` minimising the slowest stage's forward+backward time (profiles, or a list of ms)."""
    return min_max_partition(_costs_from(profiles_or_costs, lambda p: p.time_ms), n_stages, method)


# copies of an fp32 parameter that training with Adam keeps: weights, gradients, two moments (16 bytes / 4)
ADAM_FP32_COPIES = bytes_per_parameter("fp32", "adam")["total"] / 4


@renamed_kwargs(micro_batches="n_micro")
def memory_costs(profiles: Sequence[LayerProfile], param_scale: float = ADAM_FP32_COPIES,
                 n_micro: int = 1) -> list[float]:
    """Bytes each layer needs on its stage: parameters x ``param_scale`` + saved activations x ``n_micro``.

    ``param_scale`` counts the copies kept per parameter; the default, 4 (weights, gradients and Adam's two
    moments), comes from :func:`labkit.memory_model.bytes_per_parameter` (``"fp32", "adam"``: 16 bytes per
    4-byte parameter), the same formulas lab 09's calculator uses. A GPipe stage keeps the activations of every
    micro-batch in flight until its backward (``n_micro`` of them).
    """
    if not isinstance(param_scale, (int, float)) or param_scale < 0:
        raise ValueError(f"param_scale must be a number >= 0 (copies per parameter), got {param_scale!r}")
    n_micro = validate_int("n_micro (micro-batches held)", n_micro, minimum=1)
    if not all(isinstance(p, LayerProfile) for p in profiles):
        raise TypeError("memory_costs needs the LayerProfile list that profile_layers returns")
    return [float(p.param_bytes * param_scale + p.activation_bytes * n_micro) for p in profiles]


@renamed_kwargs(k="n_stages", micro_batches="n_micro")
def balance_by_memory(profiles_or_costs, n_stages: int, param_scale: float = ADAM_FP32_COPIES, n_micro: int = 1,
                      method: str = "dp") -> Split:
    """The split into ``n_stages`` minimising the largest stage's memory (see :func:`memory_costs`), from profiles
    or a list of bytes."""
    items = list(profiles_or_costs)
    if items and all(isinstance(p, LayerProfile) for p in items):
        items = memory_costs(items, param_scale, n_micro)
    return min_max_partition(items, n_stages, method)


# --------------------------------------------------------------------------- layers that sleep
class SleepLayer(nn.Module):
    """A layer whose forward sleeps ``forward_ms`` and whose backward sleeps ``backward_ms``: its cost is known."""

    def __init__(self, forward_ms: float, backward_ms: float = 0.0):
        super().__init__()
        for name, v in (("forward_ms", forward_ms), ("backward_ms", backward_ms)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number of milliseconds >= 0, got {v!r}")
        self.forward_ms, self.backward_ms = float(forward_ms), float(backward_ms)
        self.gain = nn.Parameter(torch.ones(()))  # 1.0: a parameter, so a pipeline of these has gradients

    def forward(self, x):
        return Sleep.apply(x, self.gain, self.forward_ms / 1e3, self.backward_ms / 1e3, False)

    def extra_repr(self) -> str:
        return f"forward_ms={self.forward_ms:g}, backward_ms={self.backward_ms:g}"


def sleep_layers(forward_ms: Sequence[float], backward_ratio: float = 0.0) -> nn.Sequential:
    """An ``nn.Sequential`` of :class:`SleepLayer`; layer i sleeps forward_ms[i] (and backward_ratio times that)."""
    ms = _as_costs(forward_ms, "forward_ms")
    return nn.Sequential(*[SleepLayer(m, m * backward_ratio) for m in ms])
