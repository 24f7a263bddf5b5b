"""``python -m labkit bench ddp``: steps per second of the three from-scratch DDPs and torch's DDP.

A small CNN on 8x8 digit images, a fixed local batch per rank (weak scaling), 1/2/4 ranks. Each
repeat runs every version in turn on the same ranks, so they share the machine's noise; the
table shows medians, each version's speed relative to torch's DDP measured in the same run, and
the gradient bytes each rank all-reduces per step (torch's DDP counted by a communication hook).
The ranks run where ``backend="auto"`` puts them (NCCL with one GPU each when there are enough GPUs,
else gloo processes with one thread each); data, models and the timing tensor live on ``ctx.device``,
and the table's ``backend`` column is read from each launch's results.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from ..devices import now
from ..models import digits_cnn
from .plan import validate_bucket_mb
from .training import digits_tensors, train_steps
from .wrappers import WRAPPERS, make_ddp

LABELS = {"naive": "naive (per tensor)", "bucketed": "bucketed", "overlapped": "overlapped (hooks)",
          "torch": "torch DDP"}


def throughput_rank(ctx, algorithms=WRAPPERS, steps: int = 20, warmup: int = 3, repeats: int = 3,
                   local_batch: int = 64, width: int = 32, bucket_mb: float = 0.1) -> dict:
    """Seconds per step of each algorithm, one entry per repeat (the slowest rank's time)."""
    for a in algorithms:
        if a not in WRAPPERS:
            raise ValueError(f"unknown algorithm {a!r}: pass some of {WRAPPERS}")
    x, y = _on_device(ctx)
    g = torch.Generator().manual_seed(ctx.rank)
    idx = torch.randint(0, len(x), (steps, local_batch), generator=g).to(x.device)
    batches = [[(x[i], y[i])] for i in idx]
    runs = {}
    for a in algorithms:
        model = digits_cnn(width, seed=0, device=ctx.device)
        ddp = make_ddp(a, model, bucket_mb)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        train_steps(ddp, opt, batches[:warmup])
        runs[a] = (ddp, opt)
    out = {a: [] for a in algorithms}
    sent = {a: -runs[a][0].stats["allreduce_bytes"] for a in algorithms}
    params = sum(p.numel() for p in digits_cnn(width, seed=0).parameters())
    for _ in range(repeats):
        for a in algorithms:
            ddp, opt = runs[a]
            dist.barrier()
            t0 = now(ctx.device)
            train_steps(ddp, opt, batches)
            dist.barrier()  # the step is only done when the slowest rank is done
            t = torch.tensor([now(ctx.device) - t0], dtype=torch.float64, device=ctx.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # on ctx.device: NCCL has no backend for CPU tensors
            out[a].append(t.item() / steps)
    for a in algorithms:  # bytes all-reduced per step on this rank (torch's DDP: counted by its comm hook)
        sent[a] = (sent[a] + runs[a][0].stats["allreduce_bytes"]) / (steps * repeats)
    return {"seconds_per_step": out, "parameters": params, "allreduce_bytes_per_step": sent,
            "buckets": {a: len(getattr(runs[a][0], "buckets", [])) for a in algorithms}}


def _on_device(ctx):
    """The digits as ``(x, y)`` on this rank's device (moved once, kept in ``ctx.cache`` between pooled jobs)."""
    key = ("ddp_bench_digits", str(ctx.device))
    if key not in ctx.cache:
        x, y = digits_tensors(torch.float32, ctx.cache)
        ctx.cache[key] = (x.to(ctx.device), y.to(ctx.device))
    return ctx.cache[key]


def single_process_rank(ctx, steps: int = 20, warmup: int = 3, repeats: int = 3, local_batch: int = 64,
                       width: int = 32) -> list[float] | None:
    """Seconds per step of plain training (no wrapper, no communication) on rank 0 while the others wait.

    A one-process baseline measured on an already running pool, so a notebook needs no extra start-up.
    """
    out = None
    if ctx.rank == 0:
        x, y = _on_device(ctx)
        idx = torch.randint(0, len(x), (steps, local_batch), generator=torch.Generator().manual_seed(0)).to(x.device)
        batches = [[(x[i], y[i])] for i in idx]
        model = digits_cnn(width, seed=0, device=ctx.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        train_steps(model, opt, batches[:warmup])
        out = []
        for _ in range(repeats):
            t0 = now(ctx.device)
            train_steps(model, opt, batches)
            out.append((now(ctx.device) - t0) / steps)
    dist.barrier()
    return out


def measure(world_sizes=(1, 2, 4), steps=20, repeats=5, local_batch=64, width=32, bucket_mb=0.1,
            algorithms=WRAPPERS, pool: bool = False, timeout: float = 300) -> list[dict]:
    """Run :func:`throughput_rank` for each world size; return table rows (medians, ratio to torch DDP)."""
    from ..runtime import launch

    validate_bucket_mb(bucket_mb)
    rows = []
    from ..viz import progress

    for n in progress(world_sizes, desc="ddp bench: world sizes"):
        got = launch(throughput_rank, world_size=n, kwargs=dict(
            algorithms=algorithms, steps=steps, repeats=repeats, local_batch=local_batch, width=width,
            bucket_mb=bucket_mb), pool=pool, echo=False, quiet=True, timeout=timeout)
        res = got[0]
        sps = res["seconds_per_step"]
        base = statistics.median(sps["torch"]) if "torch" in sps else None
        for a in algorithms:
            med = statistics.median(sps[a])
            rows.append({"ranks": n, "backend": got.backend, "version": LABELS[a], "ms/step": med * 1e3,
                         "steps/s": 1 / med,
                         "samples/s": n * local_batch / med,
                         "vs torch DDP": (base / med) if base else float("nan"),
                         "kB all-reduced/step": res["allreduce_bytes_per_step"][a] / 1e3,
                         "spread %": 100 * (max(sps[a]) - min(sps[a])) / med})
    return rows


def ratio(rows: list[dict], version: str = "overlapped", ranks: int = 2) -> float | None:
    for r in rows:
        if r["ranks"] == ranks and r["version"] == LABELS[version]:
            return r["vs torch DDP"]
    return None


def main(argv: list[str] | None = None) -> int:
    from ..viz import format_table

    ap = argparse.ArgumentParser(prog="python -m labkit bench ddp", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,4", help="comma-separated world sizes (default 1,2,4)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=5, help="repeats; the table shows medians")
    ap.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    ap.add_argument("--width", type=int, default=32, help="channels of the CNN's first convolution")
    ap.add_argument("--bucket-mb", type=float, default=0.1, help="bucket size in MiB for bucketed/overlapped/torch")
    ap.add_argument("--quick", action="store_true", help="a short run: 1 and 2 ranks, fewer steps")
    a = ap.parse_args(argv)
    try:
        ranks = [int(s) for s in a.ranks.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--ranks takes comma-separated integers such as 1,2,4, got {a.ranks!r}")
    if not ranks or min(ranks) < 1 or a.steps < 1 or a.repeats < 1 or a.batch < 1 or a.width < 1:
        ap.error("--ranks, --steps, --repeats, --batch and --width must be positive")
    if a.bucket_mb <= 0:
        ap.error("--bucket-mb must be > 0 (MiB per bucket)")
    if a.quick:
        ranks = [r for r in ranks if r <= 2] or [2]
        a.steps, a.repeats = min(a.steps, 15), min(a.repeats, 3)
    params = sum(p.numel() for p in digits_cnn(a.width, seed=0).parameters())
    print(f"DDP throughput: small CNN (width {a.width}, {params} parameters, {params * 4 / 1e3:.0f} kB of fp32 "
          f"gradients), {a.batch} samples per rank, bucket {a.bucket_mb} MiB, {a.steps} steps x {a.repeats} "
          f"repeats (medians), ranks {ranks}; the backend column says what ran (gloo: CPU processes with one "
          "thread each; nccl: one GPU per rank)", flush=True)
    t0 = time.perf_counter()
    rows = measure(ranks, a.steps, a.repeats, a.batch, a.width, a.bucket_mb)
    print(format_table(rows, floatfmt="{:.3g}"))
    r2 = ratio(rows)
    if r2 is not None:
        verdict = "meets" if r2 >= 0.9 else "misses"
        print(f"overlapped / torch DDP at 2 ranks: {r2:.2f}x ({verdict} the 0.9x target)")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
