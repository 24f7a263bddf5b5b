"""Lab 01's ping-pong: the point-to-point timing that :func:`~labkit.collectives.cost.fit_alpha_beta` turns into
alpha and beta. A library module, so that lab 01's bench and the capstone's calibration
(:mod:`labkit.capstone.calibrate`) time the same way."""
from __future__ import annotations

import statistics

from ..devices import now
from ..distops import recv, send

__all__ = ["pingpong_rank"]


def pingpong_rank(ctx, sizes=(4, 1 << 12, 1 << 16, 1 << 20, 1 << 22), repeats: int = 9) -> list[dict] | None:
    """Ranks 0 and 1 bounce a message; one-way time = half the round trip (median of ``repeats``). Other ranks
    idle. The sizes take turns within each repeat (in alternating order), so a burst of load from other
    programs hits every size alike instead of bending the fit at one size.
    Rank 0 returns rows ``{"algorithm": "p2p", "bytes", "world_size": 2, "seconds", "samples"}``."""
    import torch
    import torch.distributed as dist

    if ctx.world_size < 2:
        raise ValueError("pingpong_rank needs world_size >= 2 (two ranks bounce a message)")
    bufs = [torch.zeros(max(1, int(nbytes) // 4), dtype=torch.float32, device=ctx.device) for nbytes in sizes]
    times: list[list[float]] = [[] for _ in sizes]
    for i in range(repeats + 1):  # round 0 warms every size up
        order = list(range(len(sizes))) if i % 2 == 0 else list(range(len(sizes)))[::-1]
        for k in order:
            buf = bufs[k]
            dist.barrier()
            t0 = now(ctx.device)
            if ctx.rank == 0:
                send(buf, 1)
                recv(buf, 1)
            elif ctx.rank == 1:
                recv(buf, 0)
                send(buf, 0)
            t1 = now(ctx.device)
            if i:
                times[k].append((t1 - t0) / 2)
    rows = [{"algorithm": "p2p", "bytes": buf.numel() * 4, "world_size": 2, "seconds": statistics.median(ts),
             "samples": ts} for buf, ts in zip(bufs, times)]
    return rows if ctx.rank == 0 else None
