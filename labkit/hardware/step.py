"""One real training step with each option lab 09 measures, and the result type its experiments share.

:func:`make_step` builds a :class:`Step`: forward, cross-entropy, backward and optimiser step on fixed random data,
for a ResNet flattened into an ``nn.Sequential`` (:func:`labkit.sliced.models.flatten_resnet`), with autocast to
bfloat16 or float16 (fp16 with ``torch.amp.GradScaler``, GPU only), the ``channels_last`` memory layout,
``torch.compile`` or activation checkpointing (``torch.utils.checkpoint.checkpoint_sequential``). The experiments
(:mod:`labkit.hardware.speed`, :mod:`labkit.hardware.loading`) time steps against each other and return a
:class:`Result`: a table, a one-line verdict, notes (skips, fallbacks) and the raw timing.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import ArgumentError, validate_choice, validate_int
from ..sliced.models import MODEL_NAMES, build_model, flatten_resnet, saved_bytes
from .cpu import cpu_info, gpu_info
from .timing import Timing

__all__ = ["Step", "Result", "make_step", "PRECISIONS", "OPTIMIZERS", "LOSS_RTOL"]


PRECISIONS = ("fp32", "autocast-bf16", "autocast-fp16")
OPTIMIZERS = ("sgd", "adam", "adamw")
LOSS_RTOL = 0.02  # bf16 keeps 8 significant bits (~0.4% per rounding): a loss within 2% of fp32's is "close"
_DTYPES = {"autocast-bf16": torch.bfloat16, "autocast-fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------
class Step:
    """One training step, callable: ``step()`` trains on the fixed batch, ``step(x, y)`` on another."""

    def __init__(self, layers: nn.Sequential, x, y, device, precision, channels_last, compiled, checkpoint,
                 optimizer):
        self.layers, self.x, self.y, self.device = layers, x, y, device
        self.precision, self.channels_last, self.compiled, self.checkpoint = (precision, channels_last, compiled,
                                                                              checkpoint)
        self.net = torch.compile(layers) if compiled else layers
        params = layers.parameters()
        self.optimizer = {"sgd": lambda: torch.optim.SGD(params, lr=0.01, momentum=0.9),
                          "adam": lambda: torch.optim.Adam(params, lr=1e-3),
                          "adamw": lambda: torch.optim.AdamW(params, lr=1e-3)}[optimizer]()
        self.scaler = torch.amp.GradScaler(device) if precision == "autocast-fp16" else None
        self._losses: list[torch.Tensor] = []

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def losses(self) -> list[float]:
        """The loss of every call so far (the first is at the initial weights)."""
        return [float(v) for v in self._losses]

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=_DTYPES[self.precision])

    def forward_loss(self, x=None, y=None):
        x = self.x if x is None else x
        y = self.y if y is None else y
        with self._autocast():
            if self.checkpoint:
                out = torch.utils.checkpoint.checkpoint_sequential(self.layers, self.checkpoint, x,
                                                                   use_reentrant=False)
            else:
                out = self.net(x)
        return F.cross_entropy(out.float(), y)

    def __call__(self, x=None, y=None) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_loss(x, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        loss = loss.detach()
        self._losses.append(loss)
        return loss

    def gradients(self) -> dict[str, torch.Tensor]:
        """Forward and backward on the fixed batch, no optimiser step: ``{parameter name: gradient}``."""
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_loss().backward()
        return {n: p.grad.detach().float().clone() for n, p in self.layers.named_parameters() if p.grad is not None}

    def activation_bytes(self) -> int:
        """Bytes autograd keeps across one forward for the backward (weights excluded; with checkpointing,
        the segment inputs and the last segment's tensors)."""
        _, got = saved_bytes(lambda: self.forward_loss(), exclude=self.layers)
        return got


def _resolve_device(device) -> tuple[str, list[str]]:
    name = str(device).split(":")[0]
    validate_choice("device", name, ("cpu", "cuda"))
    if name == "cuda" and not torch.cuda.is_available():
        return "cpu", ["device='cuda' was asked but no CUDA GPU is available here: the CPU case ran instead"]
    return name, []


def _num_classes(layers: nn.Module) -> int:
    last = [m for m in layers.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ArgumentError("model must end in an nn.Linear classifier (a ResNet), got one without nn.Linear")
    return last[-1].out_features


def make_step(model="small", batch: int = 16, device: str = "cpu", precision: str = "fp32",
              channels_last: bool = False, compiled: bool = False, checkpoint: int = 0, optimizer: str = "sgd",
              seed: int = 0, image_size: int | None = None) -> Step:
    """A :class:`Step` for ``model`` (a name of :func:`labkit.sliced.models.build_model` or a ResNet-like
    module, deep-copied) at ``batch`` images of ``image_size`` (32 for "small" and modules, 224 for
    torchvision names), weights and data drawn from ``seed``."""
    batch = validate_int("batch", batch, minimum=1)
    device = str(device).split(":")[0]
    validate_choice("device", device, ("cpu", "cuda"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device must be 'cpu' here: no CUDA GPU is available, got 'cuda'")
    validate_choice("precision", precision, PRECISIONS)
    if precision == "autocast-fp16" and device != "cuda":
        raise ArgumentError("precision 'autocast-fp16' (with torch.amp.GradScaler) is measured on a CUDA GPU only, "
                            "got it with device='cpu'; on the CPU pass 'fp32' or 'autocast-bf16'")
    validate_choice("optimizer", optimizer, OPTIMIZERS)
    checkpoint = validate_int("checkpoint", checkpoint, minimum=0, hint="0 for no checkpointing, k for k segments")
    if compiled and checkpoint:
        raise ArgumentError(f"checkpoint must be 0 with compiled=True (measure one at a time), got {checkpoint}")
    if isinstance(model, str):
        validate_choice("model", model, MODEL_NAMES, hint="or pass an nn.Module")
        side = image_size or (32 if model == "small" else 224)
        layers = flatten_resnet(build_model(model, seed=seed))
    elif isinstance(model, nn.Module):
        side = image_size or 32
        layers = flatten_resnet(copy.deepcopy(model))
    else:
        raise ArgumentError(f"model must be one of {MODEL_NAMES} or an nn.Module, got {model!r}")
    if checkpoint > len(layers):
        raise ArgumentError(f"checkpoint must be at most the {len(layers)} layers of the flattened model, "
                            f"got {checkpoint}")
    side = validate_int("image_size", side, minimum=8)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, side, side, generator=gen)
    y = torch.randint(0, _num_classes(layers), (batch,), generator=gen)
    layers = layers.to(device).train()
    x, y = x.to(device), y.to(device)
    if channels_last:
        layers = layers.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return Step(layers, x, y, device, precision, bool(channels_last), bool(compiled), checkpoint, optimizer)


# --------------------------------------------------------------------------------------------
# Results and shared helpers
# --------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One experiment: its table, a one-line verdict, notes (skips, fallbacks) and the raw timing."""

    name: str
    table: list[dict]
    verdict: str
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    timing: Timing | None = None

    def rows(self) -> list[dict]:
        return [dict(r) for r in self.table]

    def as_dict(self) -> dict:
        return {"name": self.name, "device": self.device, "verdict": self.verdict, "rows": self.rows(),
                "notes": list(self.notes), "extra": dict(self.extra),
                "timing": self.timing.as_dict() if self.timing else None}

    def __str__(self) -> str:
        return self.verdict


@contextlib.contextmanager
def _threads(n):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(validate_int("threads", n, minimum=1))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _setup(model, batch, device, trials, quick, cpu_batch=(16, 64), gpu_batch=(64, 256)):
    device, notes = _resolve_device(device)
    trials = validate_int("trials", trials, minimum=1)
    if model is None:
        model = "small" if device == "cpu" else "resnet50"
    if batch is None:
        batch = (cpu_batch if device == "cpu" else gpu_batch)[0 if quick else 1]
    return model, validate_int("batch", batch, minimum=1), device, trials, notes


def _model_name(model) -> str:
    return model if isinstance(model, str) else type(model).__name__


def _where(device) -> str:
    if device == "cuda":
        return (gpu_info() or {}).get("name", "GPU")
    return cpu_info().model


def _measured_class(speedup: float) -> str:
    return "faster" if speedup >= 1.1 else "slower" if speedup <= 0.9 else "about the same"


def _agreement(prediction: str, speedup: float) -> str:
    got = _measured_class(speedup)
    if prediction == "unknown":
        return f"no prediction; measured {got}"
    want = {"fast": "faster", "slow": "slower"}[prediction]
    return "agrees" if got == want else f"disagrees (measured {got})"


NOT_ON_CPU = "not on CPU"


def _skipped(variant: str, reason: str, status: str = "not measured", **more) -> dict:
    """A row for a variant that was not run: ``status`` ("not on CPU" for GPU-only options, "not measured" when a
    run failed) stands in the speed-up column, which every table shows, so no table prints "None"; the reason is
    in ``note``."""
    return {"variant": variant, "speed-up": status, **more, "note": "skipped: " + reason}


def _timed_row(timing: Timing, name: str, images: int, against: str | None = None, **more) -> dict:
    return {"variant": name, "median ms": timing.median(name) * 1e3, "speed-up": timing.speedup(name, against),
            "images/s": images / timing.median(name), **more}


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(b), 1e-8)
