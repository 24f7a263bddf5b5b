"""A small real transformer whose parameter count is exactly the Ultra-Scale Playbook's formula (lab 09).

:class:`TransformerShape` describes a decoder transformer by its shape (layers, width, heads, vocabulary,
sequence length, micro-batch): the calculator (:func:`labkit.hardware.estimate`) predicts its memory from the
formulas alone, and :func:`tiny_transformer` builds the real model of that shape, so the prediction can be
checked against a measured run. Pre-LN blocks, full attention (or PyTorch's fused
``scaled_dot_product_attention`` with ``flash=True``), the output head tied to the embedding, no position table:
:func:`labkit.memory_model.transformer_params` counts exactly this model's parameters. :func:`mlp` is the other
small model the lab measures (:func:`labkit.models.mlp` with lab 09's default widths).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._compat import renamed_kwargs
from .._validate import ArgumentError, validate_int, validate_number
from ..models import mlp as _mlp

__all__ = ["TransformerShape", "TinyTransformer", "tiny_transformer", "mlp"]


@renamed_kwargs(hidden="width")
@dataclass(frozen=True)
class TransformerShape:
    """A decoder transformer's shape: ``layers``, ``width``, ``heads``, ``vocab``, ``seq`` and ``micro_batch``."""

    layers: int
    width: int
    heads: int
    vocab: int
    seq: int
    micro_batch: int

    def __post_init__(self):
        for f in fields(self):
            validate_int(f.name, getattr(self, f.name), minimum=1)
        if self.width % self.heads:
            raise ArgumentError(f"width must be divisible by heads, got width={self.width}, heads={self.heads}")


class _Block(nn.Module):
    """Pre-LN transformer block: x + proj(attention(ln1(x))), then x + fc2(gelu(fc1(ln2(x))))."""

    def __init__(self, width: int, heads: int, dropout: float, flash: bool):
        super().__init__()
        self.heads, self.flash = heads, flash
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.act, self.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, s, h = x.shape
        d = h // self.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.drop.p if self.training else 0.0)
        else:
            att = self.drop(torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, dim=-1))
            y = att @ v
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, s, h)))
        return x + self.drop(self.fc2(self.act(self.fc1(self.ln2(x)))))


class TinyTransformer(nn.Module):
    """Embedding, pre-LN blocks, final LayerNorm, head tied to the embedding (no position table, full attention)."""

    def __init__(self, shape: TransformerShape, dropout: float = 0.0, flash: bool = False):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab, shape.width)
        self.blocks = nn.Sequential(*[_Block(shape.width, shape.heads, dropout, flash) for _ in range(shape.layers)])
        self.ln_f = nn.LayerNorm(shape.width)
        self.head = nn.Linear(shape.width, shape.vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(self.ln_f(self.blocks(self.embed(idx))))


def tiny_transformer(shape: TransformerShape, dropout: float = 0.0, flash: bool = False, seed: int = 0) -> nn.Module:
    """A small real transformer whose parameter count is exactly :func:`transformer_params` of ``shape``."""
    if not isinstance(shape, TransformerShape):
        raise ArgumentError(f"shape must be a TransformerShape, got {type(shape).__name__}")
    validate_number("dropout", dropout, minimum=0, maximum=1, open_high=True)
    torch.manual_seed(seed)
    return TinyTransformer(shape, dropout, flash)


def mlp(widths=(256, 512, 512, 10), seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    """:func:`labkit.models.mlp` with lab 09's defaults: Linear layers of ``widths`` with ReLU between them (and
    dropout before the last when ``dropout`` > 0), seeded with ``seed``."""
    return _mlp(widths, seed=seed, dropout=dropout)
