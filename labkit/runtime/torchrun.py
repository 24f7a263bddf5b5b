"""Run a lab function under ``torchrun`` (one node or many, Slurm included), unchanged.

    torchrun --standalone --nproc-per-node=2 -m labkit run labkit.runtime.lab:hello_rank
    torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m labkit run labkit.runtime.lab:hello_rank

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
this entry point joins the process group from them (``env://``), builds the same :class:`Context`
that :func:`labkit.launch` gives, calls the function, gathers every rank's result to rank 0 and
prints them there. Without torchrun's variables, ``python -m labkit run mod:fn -n 4`` starts the
ranks itself with :func:`labkit.launch`.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Callable


def resolve(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (a clear error when it is not there)."""
    if ":" not in spec:
        raise ValueError(f"expected 'module:function' (for example 'labkit.runtime.lab:hello_rank'), got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod_name!r} ({e}); is it on the Python path?") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"module {mod_name!r} has no function {fn_name!r}")
    return fn


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def run_under_torchrun(fn: Callable, kwargs: dict | None = None, backend: str = "auto") -> list[Any] | None:
    """Join torchrun's process group, run ``fn(ctx, **kwargs)``; rank 0 returns all results, others None."""
    import torch
    import torch.distributed as dist

    from .launcher import Context

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        backend = "nccl" if n_gpu >= local_world else "gloo"
    if backend == "nccl":
        if n_gpu < local_world:
            raise RuntimeError(f"nccl needs one GPU per local rank: {local_world} local ranks, {n_gpu} GPU(s). "
                               f"Use --backend gloo or fewer --nproc-per-node.")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    dist.init_process_group(backend)
    try:
        ctx = Context(rank=rank, world_size=world, backend=backend, device=device, local_rank=local_rank,
                      group=dist.group.WORLD)
        value = fn(ctx, **(kwargs or {}))
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, value)
        return gathered if rank == 0 else None
    finally:
        dist.destroy_process_group()


def main(spec: str, world_size: int = 2, kwargs_json: str = "{}", backend: str = "auto", timeout: float = 300) -> int:
    fn = resolve(spec)
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as e:
        raise ValueError(f"--kwargs must be a JSON object such as '{{\"n\": 4}}': {e}") from e
    if under_torchrun():
        results = run_under_torchrun(fn, kwargs, backend)
        if results is not None:
            for r, v in enumerate(results):
                print(f"rank {r}: {v!r}")
        return 0
    from .launcher import launch

    results = launch(fn, world_size, kwargs=kwargs, backend=backend, timeout=timeout)
    for r, v in enumerate(results):
        print(f"rank {r}: {v!r}")
    return 0
