"""Torch's implementation: the same block split by PyTorch's own tensor parallelism
(``torch.distributed.tensor.parallel``), for comparison.

``parallelize_module`` with ``ColwiseParallel`` on ``qkv`` and ``fc1`` and ``RowwiseParallel`` on ``proj`` and
``fc2`` is Megatron's plan written as a table: torch turns the weights into DTensors sharded over the mesh's tp
dimension and inserts the collectives. :func:`compare_block_rank` runs it beside labkit's
:class:`~labkit.capstone.tp.TPBlock` and the unsplit block on the same input, and reports the largest
differences of the outputs and of the input's gradient. If torch's version cannot run on this backend, the error
is returned as text with the reason, instead of failing the caller.
"""
from __future__ import annotations

import copy

import torch

from .model import Config, build


def compare_block_rank(ctx, tp: int | None = None, cfg: Config = Config(), seed: int = 0, rows: int = 2) -> dict:
    """On ``tp`` ranks (the whole world by default): one block three ways. Returns ``{"labkit", "torch"}``, each the
    largest absolute difference from the unsplit block (output and input gradient), or ``{"torch_error"}``."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from .tp import TPBlock

    tp = tp or ctx.world_size
    mesh = ctx.mesh(dp=ctx.world_size // tp, pp=1, tp=tp)
    ref = build(cfg, seed).blocks[0].to(ctx.device)
    g = torch.Generator().manual_seed(seed + 1)  # drawn on the CPU (the same numbers everywhere), then moved
    x = torch.randn(rows, cfg.seq, cfg.width, generator=g, dtype=torch.float64).to(ctx.device)

    def run(block):
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        y.pow(2).sum().backward()
        return y.detach(), xi.grad

    y_ref, gx_ref = run(ref)
    out = {}
    y, gx = run(TPBlock(ref, mesh.group("tp"), mesh.coords["tp"], tp))
    out["labkit"] = max(float((y - y_ref).abs().max()), float((gx - gx_ref).abs().max()))
    try:
        theirs = copy.deepcopy(ref)
        parallelize_module(theirs, mesh.device_mesh["tp"], {"qkv": ColwiseParallel(), "proj": RowwiseParallel(),
                                                            "fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        theirs.heads = ref.heads // tp  # the block's reshape must see this rank's heads
        y, gx = run(theirs)
        out["torch"] = max(float((y - y_ref).abs().max()), float((gx - gx_ref).abs().max()))
        out["torch_weight"] = type(theirs.qkv.weight).__name__
    except Exception as e:  # say why, in the notebook, rather than stop it
        out["torch_error"] = f"{type(e).__name__}: {e}"
    return out
