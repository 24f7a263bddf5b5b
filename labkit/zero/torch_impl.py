"""Torch's own sharding, behind small helpers, so lab 10 can check its from-scratch stages against them.

* ZeRO-1: ``torch.distributed.optim.ZeroRedundancyOptimizer`` shards the optimiser state by giving *whole
  parameters* to ranks (greedily, largest first, to the least loaded rank), so the shards are uneven: with a few
  big matrices one rank can hold most of the state. It does not average gradients itself; it runs under
  ``DistributedDataParallel`` (all-reduce, 2Ψ) and then broadcasts each rank's updated parameters.
* FSDP2: ``torch.distributed.fsdp.fully_shard`` on each unit and on the root, on a 1-D ``DeviceMesh``; every
  parameter becomes a ``DTensor`` sharded on dimension 0 (ZeRO-3, per parameter rather than per flat unit).
  Checked on gloo with torch 2.14.1: it trains on CPU and equals one process in float64.

:func:`labkit.zero.state_numel` measures the optimiser state each one really keeps on a rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .optim import validate_optimizer_class

__all__ = ["torch_zero1", "torch_fsdp2", "fsdp2_full_parameters"]


def torch_zero1(model: nn.Module, optimizer_class=torch.optim.Adam, *, group=None, **kwargs):
    """``(DistributedDataParallel(model), ZeroRedundancyOptimizer(model.parameters(), optimizer_class, ...))``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    validate_optimizer_class(optimizer_class)
    ddp = nn.parallel.DistributedDataParallel(model, process_group=group)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class, process_group=group,
                                  **kwargs)
    return ddp, opt


def torch_fsdp2(model: nn.Module, units=None, mixed_precision: bool = False) -> nn.Module:
    """Apply ``fully_shard`` to each unit (default: top-level children with parameters), then to the root.

    ``mixed_precision=True``: ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``:
    the sharded parameters and the optimiser stay fp32, the gathered copies the forward and backward compute with
    are bf16 (half the bytes gathered), and gradients are reduced in fp32 (checked on gloo with torch 2.14.1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    if units is None:
        units = [c for c in model.children() if any(True for _ in c.parameters())]
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} \
        if mixed_precision else {}
    for unit in units:
        fully_shard(unit, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


@torch.no_grad()
def fsdp2_full_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter of an FSDP2 model, full (an all-gather per parameter; all ranks must call it)."""
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]
