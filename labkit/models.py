"""The small models the labs share, each built in one place with one signature.

- :func:`mlp`: Linear layers of ``widths`` (input first, classes last) with an activation between them; the model
  that lab 04 cuts into stages, lab 09 times and lab 10 shards.
- :func:`digits_cnn`: the small CNN for the 1x8x8 digit images, ``Sequential(body, head)``: two 3x3 convolutions
  (``width`` and ``2 * width`` channels) and a pooling, then two linear layers. Lab 02 trains it under its DDP
  wrappers (its parameters, in registration order, are what the buckets hold); lab 08 ablates it (``model[0]``, the
  body, is what the pre-trained weights replace).
- :func:`pooled_digits_cnn`: the CNN of lab 07's consistency training, deeper (three convolutions) and ending in a
  global average pooling instead of a flattening linear layer. It differs on purpose: FixMatch compares the
  predictions on a weak and a strong view (shifted by up to 2 pixels, a cut-out square), and a head that averages
  over positions is less sensitive to where the digit sits than one that reads every pixel's position.

The builders share their keywords: ``width`` (channels of the first convolution), ``classes``, ``seed`` (seeds
torch's global generator first; ``None`` leaves it as it is), ``dtype`` and ``device``. A model is built in
float32 on the CPU and then moved, so the same seed gives the same weights in every dtype and on every device.

Lab-specific models stay with their lab: lab 03's ResNets (``labkit.sliced.models``), lab 09's transformer of a
given shape (``labkit.hardware.transformer``) and lab 11's transformer for the sorting task
(``labkit.capstone.model``). The two transformers differ on purpose: lab 09's is a plain pre-LN GPT whose
memory is predicted from its shape; lab 11's is split by heads, MLP columns and vocabulary across tensor-parallel
ranks, so its layers are written to be sharded.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._validate import ArgumentError, validate_int

__all__ = ["mlp", "digits_cnn", "pooled_digits_cnn", "DTYPES"]

#: The dtypes the models are built in, by name (a notebook or the command line passes the name).
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _widths(widths) -> tuple[int, ...]:
    try:
        out = tuple(int(w) for w in widths)
        exact = all(int(w) == w and not isinstance(w, bool) for w in widths)
    except (TypeError, ValueError):
        out, exact = (), False
    if not exact or len(out) < 2 or min(out) < 1:
        raise ArgumentError(f"widths must list at least two positive layer widths (input, ..., outputs), got "
                            f"{widths!r}; pass e.g. (256, 1024, 1024, 10)")
    return out


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ArgumentError(f"dtype must be a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")


def mlp(widths: Sequence[int], *, activation: type[nn.Module] = nn.ReLU, dropout: float = 0.0,
        seed: int | None = None, dtype: torch.dtype | str = torch.float32, device="cpu") -> nn.Sequential:
    """``Linear(widths[0], widths[1])``, ``activation()``, ..., ``Linear(widths[-2], widths[-1])``.

    No activation after the last layer; ``dropout`` > 0 puts a ``Dropout`` just before it. ``seed`` seeds torch's
    global generator first, so every rank that passes the same seed builds the same model (``None``: the generator
    is left as it is, for a caller that seeds it itself)."""
    widths = _widths(widths)
    _dropout(dropout)
    _dtype(dtype)  # a bad dtype fails before the generator is touched
    _seeded(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        if i == len(widths) - 2 and dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return _built(nn.Sequential(*layers), dtype, device)


def _dropout(dropout) -> None:
    if not 0.0 <= float(dropout) < 1.0:
        raise ArgumentError(f"dropout must be in [0, 1), got {dropout!r}")


def _built(model: nn.Module, dtype, device) -> nn.Module:
    return model.to(device=device, dtype=_dtype(dtype))


def _seeded(seed) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def digits_cnn(width: int = 8, *, classes: int = 10, dropout: float = 0.0, seed: int | None = None,
               dtype: torch.dtype | str = torch.float32, device="cpu") -> nn.Sequential:
    """A small CNN for 1x8x8 digit images: ``Sequential(body, head)``.

    body: ``Conv2d(1, width, 3)``, ReLU, ``Conv2d(width, 2 * width, 3)``, ReLU, ``MaxPool2d(2)``, Flatten;
    head: ``Linear(2 * width * 16, 64)``, ReLU, ``Dropout(dropout)``, ``Linear(64, classes)``. ``seed`` seeds
    torch's global generator first (``None``: initialised from it as it is)."""
    width = validate_int("width", width, minimum=1, hint="the channels of the first convolution")
    classes = validate_int("classes", classes, minimum=1)
    _dropout(dropout)
    _dtype(dtype)  # a bad dtype fails before the generator is touched
    _seeded(seed)
    body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    head = nn.Sequential(nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, classes))
    return _built(nn.Sequential(body, head), dtype, device)


def pooled_digits_cnn(width: int = 32, *, classes: int = 10, seed: int | None = None,
                      dtype: torch.dtype | str = torch.float32, device="cpu") -> nn.Sequential:
    """Lab 07's CNN for 1x8x8 digit images, with a global average pooling: ``Sequential(body, head)``.

    body: ``Conv2d(1, width, 3)``, ReLU, ``Conv2d(width, 2 * width, 3)``, ReLU, ``MaxPool2d(2)``,
    ``Conv2d(2 * width, 2 * width, 3)``, ReLU, ``AdaptiveAvgPool2d(1)``, Flatten; head: ``Linear(2 * width,
    classes)``. Why it is not :func:`digits_cnn`: see the module docstring."""
    width = validate_int("width", width, minimum=1, hint="the channels of the first convolution")
    classes = validate_int("classes", classes, minimum=1)
    _dtype(dtype)
    _seeded(seed)
    body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return _built(nn.Sequential(body, nn.Sequential(nn.Linear(2 * width, classes))), dtype, device)
