"""BatchNorm under data parallelism: per-rank batch statistics, and a BatchNorm whose statistics are the
whole global batch's.

Under DDP each rank's ``BatchNorm`` normalises with the mean and variance of *its own shard*, and its
running statistics are those of its shard too; torch's DDP then broadcasts rank 0's buffers before each
forward (``broadcast_buffers=True``), so every rank carries rank 0's running statistics. Neither is
whole-batch training: "equal shards give whole-batch training" holds for models without BatchNorm.

``torch.nn.SyncBatchNorm`` fixes it by all-reducing the statistics, but in torch 2.14.1 it refuses CPU
tensors in training ("SyncBatchNorm expected input tensor to be on GPU ..."). :class:`GlobalBatchNorm1d`
is the same idea written out for any backend: two differentiable all-reduces
(``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the gradient) give the global
mean and variance, so forward, backward and the running statistics equal one process on the whole batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .._compat import renamed_kwargs


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` with the statistics of the global batch (all ranks), like ``SyncBatchNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable: backward sums the gradients

        n = torch.tensor([float(x.shape[0])], dtype=x.dtype, device=x.device)
        dist.all_reduce(n)
        mean = all_reduce(x.sum(0)) / n
        var = all_reduce(((x - mean) ** 2).sum(0)) / n  # biased, as BatchNorm normalises with
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))  # unbiased, as BatchNorm keeps
            self.num_batches_tracked.add_(1)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


@renamed_kwargs(hidden="width")
def bn_mlp(norm: str = "batchnorm", seed: int = 0, n_in: int = 8, width: int = 16, n_out: int = 4) -> nn.Module:
    """A small MLP with one normalisation layer after its hidden Linear (``width`` features): ``"batchnorm"``,
    ``"sync"`` (torch's ``SyncBatchNorm``) or ``"global"`` (:class:`GlobalBatchNorm1d`)."""
    layers = {"batchnorm": nn.BatchNorm1d, "sync": nn.SyncBatchNorm, "global": GlobalBatchNorm1d}
    if norm not in layers:
        raise ValueError(f"norm must be one of {sorted(layers)}, got {norm!r}")
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, width), layers[norm](width), nn.ReLU(), nn.Linear(width, n_out))
