"""The small models the labs share, each built in one place with one signature.

- :func:`mlp`: Linear layers of ``widths`` (input first, classes last) with an activation between them; the model
  that lab 04 cuts into stages, lab 09 times and lab 10 shards.

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

from ._validate import ArgumentError

__all__ = ["mlp", "DTYPES"]

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
    if not 0.0 <= float(dropout) < 1.0:
        raise ArgumentError(f"dropout must be in [0, 1), got {dropout!r}")
    dtype = _dtype(dtype)
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        if i == len(widths) - 2 and dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).to(device=device, dtype=dtype)
