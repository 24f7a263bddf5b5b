"""Lab 02's rank functions and checks: equivalence runs, timelines, stragglers, exercises, tour.

Each ``*_rank(ctx, ...)`` is a module-level lab function for :func:`labkit.launch`; the others run
in the notebook's process.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from .plan import distributed_shards, local_shard
from .training import digits_tensors, flat_params, small_cnn, train_steps
from .wrappers import ALGORITHMS, Timeline, make_ddp

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _dtype(name):
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {name!r}")
    return _DTYPES[name]


def _global_batches(x, y, steps, accum, micro_global, seed=0):
    """``steps`` lists of ``accum`` micro-batches, each of ``micro_global`` samples, from a fixed shuffle."""
    need = steps * accum * micro_global
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)
    idx = idx.repeat(-(-need // len(x)))[:need]
    out = []
    for s in range(steps):
        micro = []
        for m in range(accum):
            j = idx[(s * accum + m) * micro_global:(s * accum + m + 1) * micro_global]
            micro.append((x[j], y[j]))
        out.append(micro)
    return out


def _shard(batches, rank, world_size):


    return [[(local_shard(x, rank, world_size), local_shard(y, rank, world_size)) for x, y in micro]
            for micro in batches]


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def equivalence_rank(ctx, algorithms=ALGORITHMS, steps: int = 3, local_batch: int = 8, accum: int = 1,
                    skip_sync: bool = True, bucket_mb: float = 0.01, width: int = 4, dtype: str = "float64",
                    seed: int = 0) -> dict:
    """Train k steps with each algorithm and single-process on the whole batch; return the differences.

    Every rank also trains the reference (the same model, whole global batch, no communication),
    so each rank can compare its own parameters. Returns ``{algo: {"vs_reference", "vs_torch",
    "stats", "params"}}`` (``params`` only on rank 0).
    """
    for a in algorithms:
        if a not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {a!r}: pass some of {ALGORITHMS}")
    dt = _dtype(dtype)
    x, y = digits_tensors(dt, ctx.cache)
    batches = _global_batches(x, y, steps, accum, local_batch * ctx.world_size, seed)
    mine = _shard(batches, ctx.rank, ctx.world_size)
    got = {}
    for algo in algorithms:
        # a different start on every rank: the wrapper's initial broadcast must copy rank 0's replica
        model = small_cnn(width, seed + 1 + ctx.rank, dt)
        got[algo] = (make_ddp(algo, model, bucket_mb), model)
    start = small_cnn(width, seed + 1, dt)  # rank 0's start, where the reference starts too
    ref = small_cnn(width, seed + 1, dt)
    train_steps(ref, _opt(ref), batches, accum=accum)
    ref_p = flat_params(ref)
    out, params = {}, {}
    for algo, (ddp, model) in got.items():
        train_steps(ddp, _opt(model), mine, accum=accum, skip_sync=skip_sync)
        params[algo] = flat_params(model)
        out[algo] = {"vs_reference": float((params[algo] - ref_p).abs().max()),
                     "stats": dict(ddp.stats),
                     "buckets": len(getattr(ddp, "buckets", [])) or None}
    for algo in out:
        if "torch" in params:
            out[algo]["vs_torch"] = float((params[algo] - params["torch"]).abs().max())
        if ctx.rank == 0:
            out[algo]["params"] = params[algo]
    # replicas must agree across ranks, too
    for algo in out:
        p = params[algo].to(ctx.device)
        hi, lo = p.clone(), p.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        out[algo]["across_ranks"] = float((hi - lo).abs().max())
    out["_reference_moved"] = float((ref_p - flat_params(start)).abs().max())
    return out


def timeline_rank(ctx, algorithm: str = "overlapped", bucket_mb: float = 0.05, steps: int = 3,
                 local_batch: int = 64, width: int = 16, accum: int = 1, skip_sync: bool = True,
                 slow_rank: int | None = None, delay_s: float = 0.0, shard_sizes=None, dtype="float32") -> dict:
    """Train a few steps recording compute and all-reduce events; optionally one slow rank or uneven shards.

    ``slow_rank``/``delay_s``: that rank sleeps ``delay_s`` extra per micro-step (a straggler).
    ``shard_sizes``: per-rank local batch sizes (a skewed shard) instead of ``local_batch``.
    Returns this rank's events, step times, time spent in ``sync_grads``/all-reduce, and stats.
    """
    dt = _dtype(dtype)
    if shard_sizes is not None:
        if len(shard_sizes) != ctx.world_size:
            raise ValueError(f"shard_sizes needs one size per rank ({ctx.world_size}), got {len(shard_sizes)}")
        local_batch = int(shard_sizes[ctx.rank])
    x, y = digits_tensors(dt, ctx.cache)
    torch.manual_seed(ctx.rank)
    model = small_cnn(width, 0, dt)
    tl = Timeline(ctx.rank)
    ddp = make_ddp(algorithm, model, bucket_mb, timeline=tl)
    opt = _opt(model)
    idx = torch.randint(0, len(x), (steps + 1, accum, local_batch))
    batches = [[(x[i], y[i]) for i in row] for row in idx]
    train_steps(ddp, opt, batches[:1], accum=accum, skip_sync=skip_sync)  # warm-up, not recorded
    ddp.stats.update(allreduce_calls=0, allreduce_bytes=0, sync_seconds=0.0)
    dist.barrier()
    tl.events.clear()  # drop what the wrapper recorded during the warm-up step
    times = train_steps(ddp, opt, batches[1:], accum=accum, skip_sync=skip_sync, timeline=tl,
                        delay_s=delay_s if ctx.rank == slow_rank else 0.0)
    dist.barrier()
    comm = sum(e["end"] - e["start"] for e in tl.events if e["kind"] in ("allreduce", "wait"))
    return {"events": tl.events, "step_seconds": times, "comm_seconds": comm, "stats": dict(ddp.stats),
            "buckets": len(getattr(ddp, "buckets", [])) or len(ddp._params)}


def split_lanes(events: list[dict]) -> list[dict]:
    """Put each rank's all-reduce bars on a lane of their own ("0 comm") under its compute lane ("0 compute").

    Asynchronous all-reduces run at the same time as backward; on one lane they would hide it.
    """
    out = []
    for e in events:
        e = dict(e)
        e["lane"] = f"{e['lane']} {'comm' if e.get('kind') == 'allreduce' else 'compute'}"
        out.append(e)
    return out


def feature_split_rank(ctx, n_samples: int = 16, n_features: int = 64, n_out: int = 10, seed: int = 0) -> dict:
    """"Data splitting" (数据拆分) along features: each rank holds some columns of every sample.

    A linear layer then needs an all-reduce of partial *outputs* in the forward pass (this is
    tensor parallelism, not data parallelism). Returns the error against the unsplit layer.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_features, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, n_features, generator=g, dtype=torch.float64)
    cols = torch.tensor_split(torch.arange(n_features), ctx.world_size)[ctx.rank]
    partial = x[:, cols] @ w[:, cols].T  # this rank's share of x @ w.T
    full = partial.clone()
    dist.all_reduce(full)
    return {"columns": (int(cols[0]), int(cols[-1]) + 1), "partial_error": float((partial - x @ w.T).abs().max()),
            "error": float((full - x @ w.T).abs().max()), "bytes_per_forward": full.numel() * full.element_size()}


def mismatched_rank(ctx) -> float:
    """A deliberate bug: only rank 0 calls all_reduce, so it waits forever (the launcher's timeout ends it)."""
    t = torch.ones(1)
    if ctx.rank == 0:
        dist.all_reduce(t)
    return float(t.item())


# ----------------------------------------------------------------------------- nn.DataParallel
def data_parallel_demo(width: int = 8, batch: int = 32) -> dict:
    """What the legacy single-process ``nn.DataParallel`` does here, measured.

    Each forward it scatters the batch over ``device_ids``, *replicates the module onto every GPU*,
    runs the replicas in threads of one Python process, and gathers outputs on GPU 0; backward
    sums gradients back onto GPU 0. With no GPU (``device_ids == []``) it just calls the module.
    """
    model = small_cnn(width, 0)
    dp = nn.DataParallel(model)
    x, _ = digits_tensors()
    xb = x[:batch]
    same = torch.equal(dp(xb), model(xb))
    out = {"gpus": torch.cuda.device_count(), "device_ids": list(dp.device_ids), "same_as_module": same}
    if torch.cuda.device_count() >= 2:  # compare its forward+backward time with one GPU
        dev = torch.device("cuda", 0)
        model = model.to(dev)
        dp = nn.DataParallel(model)
        xb = x[:batch * 8].to(dev)

        def timed(m):
            for _ in range(3):
                m(xb).sum().backward()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                m(xb).sum().backward()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / 20

        out.update(one_gpu_s=timed(model), data_parallel_s=timed(dp))
    return out


# ----------------------------------------------------------------------------- exercises
def _hook_trial_rank(ctx, hook, steps=2, width=4):
    """Train with the learner's gradient hook on every parameter; compare with the whole-batch reference."""
    x, y = digits_tensors(torch.float64, ctx.cache)
    batches = _global_batches(x, y, steps, 1, 8 * ctx.world_size)
    ref = small_cnn(width, 0, torch.float64)
    train_steps(ref, _opt(ref), batches)
    model = small_cnn(width, 0, torch.float64)
    handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]
    try:
        train_steps(model, _opt(model), _shard(batches, ctx.rank, ctx.world_size))
    except NotImplementedError:
        return {"not_implemented": True}
    finally:
        for h in handles:
            h.remove()
    return {"error": float((flat_params(model) - flat_params(ref)).abs().max())}


def check_average_hook(hook, world_size: int = 2, timeout: float = 60):
    """Exercise: ``hook(param)`` must replace ``param.grad`` by its average over the ranks."""
    from ..runtime import launch
    from ..checks import run_cases

    def case(n):
        def thunk():
            res = launch(_hook_trial_rank, world_size=n, kwargs=dict(hook=hook), pool=True, echo=False, timeout=timeout)
            if any(r.get("not_implemented") for r in res):
                raise NotImplementedError
            worst = max(r["error"] for r in res)
            assert worst < 1e-9, (f"after 2 steps the parameters differ from whole-batch training by {worst:.3g}: "
                                  f"all-reduce param.grad (a SUM) and divide by dist.get_world_size()")
        return thunk

    return run_cases("gradient-averaging hook", [(f"{world_size} ranks equal whole-batch training", case(world_size))],
                     hint="the hook runs on every rank: which collective makes all ranks hold the same gradient, and what turns a sum into a mean?")


def bucket_sizes_of(width: int = 16, dtype=torch.float32) -> list[int]:
    """Gradient sizes in bytes of :func:`small_cnn`, in the order backward produces them (last layer first)."""
    return [p.numel() * p.element_size() for p in reversed(list(small_cnn(width, 0, dtype).parameters()))]


def check_allreduce_prediction(predict, bucket_mbs=(0.001, 0.01, 0.05, 0.1, 1.0), width: int = 16):
    """Exercise: ``predict(sizes_bytes, bucket_mb)`` -> all-reduce calls per step; checked against a real run."""
    from ..runtime import launch
    from ..checks import run_cases

    sizes = bucket_sizes_of(width)
    cases = []
    for mb in bucket_mbs:
        def thunk(mb=mb):
            guess = predict(list(sizes), mb)
            res = launch(timeline_rank, world_size=2, kwargs=dict(algorithm="bucketed", bucket_mb=mb, steps=1,
                                                                  width=width, local_batch=8), pool=True, echo=False)
            measured = res[0]["stats"]["allreduce_calls"]
            assert guess == measured, (f"predicted {guess} all-reduces per step, measured {measured} "
                                       f"(a bucket closes when the next gradient would take it past {mb} MiB)")
        cases.append((f"bucket_mb={mb}", thunk))
    return run_cases("all-reduce calls per step", cases,
                     hint="walk the sizes in order; start a new bucket when adding the next one would exceed "
                          "bucket_mb * 2**20 bytes")


# ----------------------------------------------------------------------------- tour
def tour_rank(ctx):
    kw = dict(algorithms=("overlapped", "torch"), steps=2, accum=3)
    return {"plain": equivalence_rank(ctx, steps=3), "skip": equivalence_rank(ctx, skip_sync=True, **kw),
            "sync": equivalence_rank(ctx, skip_sync=False, **kw)}


def tour(world_size: int = 2) -> list[dict]:
    """Headless quick path: the sampler, then the three wrappers and torch DDP on ``world_size`` ranks
    against one process, with and without accumulation."""
    from torch.utils.data import DistributedSampler

    from ..runtime import launch
    from ..tour import check_row

    lab, n_ranks = "02 data parallel", world_size
    state = {}

    def sampler():
        ok = True
        for n in (7, 10):
            for drop in (False, True):
                for ep in (0, 1):
                    s = DistributedSampler(range(n), num_replicas=3, rank=1, shuffle=True, seed=3, drop_last=drop)
                    s.set_epoch(ep)
                    ok &= list(s) == distributed_shards(n, 3, ep, drop_last=drop, seed=3)[1]
        return ok, "n=7,10, 3 ranks"

    def ran():
        t0 = time.perf_counter()
        state["res"] = launch(tour_rank, world_size=n_ranks, echo=False, quiet=True, timeout=120)
        state["secs"] = time.perf_counter() - t0
        return True, f"{state['secs']:.1f} s incl. start-up"

    rows = [check_row(lab, "distributed_shards == DistributedSampler (pad/drop, 2 epochs)", sampler),
            check_row(lab, f"wrappers ran on {n_ranks} ranks", ran)]
    if not rows[-1]["ok"]:
        return rows
    res = state["res"]

    def same(algo):
        worst = max(r["plain"][algo]["vs_reference"] for r in res)
        vt = max(r["plain"][algo]["vs_torch"] for r in res)
        return worst < 1e-10 and vt < 1e-10, f"max diff {worst:.1e} / {vt:.1e}"

    def accumulation(skip):
        key = "skip" if skip else "sync"
        worst = max(x[key]["overlapped"]["vs_reference"] for x in res)
        return worst < 1e-10, (f"max diff {worst:.1e}; {res[0][key]['overlapped']['stats']['allreduce_bytes'] / 1e3:.0f}"
                               f" kB all-reduced in 2 steps")

    def fewer_bytes():
        sync, skip = (res[0][k]["overlapped"]["stats"]["allreduce_bytes"] for k in ("sync", "skip"))
        return skip > 0 and abs(sync / skip - 3) < 1e-9, f"ratio {sync / skip:.2f}" if skip else "nothing all-reduced"

    for algo in ALGORITHMS:
        rows.append(check_row(lab, f"{algo} after 3 steps == single process & torch DDP, {n_ranks} ranks (float64)",
                              lambda algo=algo: same(algo)))
    for skip in (True, False):
        rows.append(check_row(lab, f"accumulation x3 {'with' if skip else 'without'} no_sync == large batch",
                              lambda skip=skip: accumulation(skip)))
    rows.append(check_row(lab, "no_sync all-reduces 3x fewer bytes with 3 micro-steps", fewer_bytes))
    return rows
