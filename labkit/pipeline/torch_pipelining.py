"""The same pipeline step with PyTorch's own ``torch.distributed.pipelining``, to compare with labkit's executor."""
from __future__ import annotations

import statistics
from typing import Callable

from ..devices import now
from .reference import _default_loss, _grads, split_batch


def torch_pipelining_rank(ctx, make_stage: Callable, batch, n_micro: int, schedule: str = "1f1b",
                          loss_fn=None, repeats: int = 1) -> dict:
    """One rank of ``torch.distributed.pipelining`` (``ScheduleGPipe`` / ``Schedule1F1B``) on the same stages.

    Returns this rank's gradients, the per-micro-batch losses (last rank) and per-repeat seconds.
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    classes = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
    if schedule not in classes:
        raise ValueError(f"torch.distributed.pipelining comparison supports schedule 'gpipe' or '1f1b', "
                         f"got {schedule!r}")
    x, y = batch
    if x.shape[0] % n_micro:
        raise ValueError(f"torch.distributed.pipelining needs equal micro-batches: {x.shape[0]} rows do not divide "
                         f"into {n_micro}; pass a batch of {n_micro * max(1, x.shape[0] // n_micro)} rows")
    module = make_stage(ctx.rank).to(ctx.device)
    stage = PipelineStage(module, ctx.rank, ctx.world_size, ctx.device)
    sched = classes[schedule](stage, n_microbatches=n_micro, loss_fn=loss_fn or _default_loss)
    times, losses = [], []
    for _ in range(repeats):
        module.zero_grad(set_to_none=True)
        losses = []
        dist.barrier()
        t0 = now(ctx.device)
        if ctx.rank == 0:
            sched.step(x.to(ctx.device))
        elif ctx.rank == ctx.world_size - 1:
            sched.step(target=y.to(ctx.device), losses=losses)
        else:
            sched.step()
        dist.barrier()
        times.append(now(ctx.device) - t0)
    return {"grads": _grads(module), "losses": [float(v.detach()) for v in losses], "times": times}


def run_torch_pipelining(make_stage: Callable, n_stages: int, batch, n_micro: int, schedule: str = "1f1b",
                         loss_fn=None, repeats: int = 1, timeout: float = 120, pool: bool = True) -> dict:
    """Run the step with ``torch.distributed.pipelining``; return ``{"grads", "loss", "seconds"}`` to compare."""
    import labkit

    split_batch(batch, n_micro)
    if batch[0].shape[0] % n_micro:
        raise ValueError(f"torch.distributed.pipelining needs equal micro-batches: {batch[0].shape[0]} rows do not "
                         f"divide into {n_micro}; pass a batch of "
                         f"{n_micro * max(1, batch[0].shape[0] // n_micro)} rows")
    res = labkit.launch(torch_pipelining_rank, world_size=n_stages,
                        kwargs=dict(make_stage=make_stage, batch=batch, n_micro=n_micro, schedule=schedule,
                                    loss_fn=loss_fn, repeats=repeats),
                        timeout=timeout, pool=pool, echo=True)
    losses = res[-1]["losses"]
    return {"grads": [r["grads"] for r in res], "loss": sum(losses) / len(losses),
            "seconds": statistics.median(max(r["times"][k] for r in res) for k in range(repeats))}
