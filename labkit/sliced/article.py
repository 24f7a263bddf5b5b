"""The source article's ``SplitConvBlock``, reproduced as published (its section 4.1, "ResNet50
模型并行": a convolution split into two branches by a ratio), and why it fails.

The working channel-split block is :class:`labkit.sliced.TensorParallelConvBlock`; this one is kept so
the notebook can run the article's code and show its error.
"""
from __future__ import annotations

import torch
from torch import nn


class ArticleSplitConvBlock(nn.Module):
    """Verbatim from the source article (only ``super()`` shortened). It does not run: see
    :func:`article_block_error`."""

    def __init__(self, inplanes, planes, split_ratio):
        super().__init__()
        assert isinstance(split_ratio, float), 'Split ratio must be float.'
        mid_planes = int(inplanes * split_ratio)
        self.left_branch = nn.Sequential(
            nn.Conv2d(inplanes, mid_planes, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_planes),
            nn.ReLU(),
            nn.Conv2d(mid_planes, planes, kernel_size=3, padding=1, groups=mid_planes),
            nn.BatchNorm2d(planes),
            nn.ReLU()
        )
        self.right_branch = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=3, padding=1),
            nn.BatchNorm2d(planes),
            nn.ReLU()
        )

    def forward(self, x):
        left = self.left_branch(x[:, :self.left_branch[-2].out_channels])
        right = self.right_branch(x[:, self.left_branch[-2].out_channels:])
        return torch.cat([left, right], dim=1)


def article_block_error(inplanes: int = 64, planes: int = 64, patched: bool = False) -> str:
    """Run the article's block on a small input and return the error it raises, as text.

    ``patched=True`` first repairs the obvious typo (``[-2]`` is a BatchNorm, which has no
    ``out_channels``; ``[-3]`` is the conv) to show the second, deeper error: the branches are
    given channel slices of ``x`` but their first convolutions were built for all of ``x``.
    Returns ``"no error"`` if it runs (it does not).
    """
    blk = ArticleSplitConvBlock(inplanes, planes, 0.5)
    x = torch.randn(2, inplanes, 8, 8)
    try:
        if patched:
            k = blk.left_branch[-3].out_channels
            left = blk.left_branch(x[:, :k])
            right = blk.right_branch(x[:, k:])
            torch.cat([left, right], dim=1)
        else:
            blk(x)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return "no error"
