"""Running a sliced model: stages on devices in one process, or one stage per rank over send/recv.

:class:`StagedModel` runs the stages in one process with each stage on its own device (as on a 2-GPU
box; on a CPU every device is the CPU). :func:`stage_rank` runs one stage per rank under
:func:`labkit.launch`, passing activations forward and gradients backward with ``send``/``recv``;
:func:`run_staged` drives it and compares with :func:`unsliced_step`, the unsliced model in one process.
:func:`replica_rank` and :func:`run_replicas` are the contrast, data parallelism. The rank functions and runners
are reached as ``labkit.sliced.lab.stage_rank`` and so on; the package exports the rest.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .._validate import validate_int
from ..devices import now
from ..distops import p2p, recv, wait_all
from ..partition import validate_cuts
from .models import build_model, flatten_resnet, input_shape_for, param_bytes, saved_bytes, split_stages


class StagedModel(nn.Module):
    """Stages placed on devices, run one after another in one process (naive model parallelism).

    ``StagedModel(split_stages(model, [7]), ["cuda:0", "cuda:1"])`` is the classic two-GPU
    split; with ``["cpu", "cpu"]`` it runs anywhere. The activation is copied to the next
    stage's device at each cut (``.to`` is differentiable: the gradient goes back the same
    way). Only one device works at a time; pipelining (``labkit.pipeline``) fixes that.
    """

    def __init__(self, stages: Sequence[nn.Module], devices: Sequence | None = None):
        super().__init__()
        stages = list(stages)
        devices = list(devices) if devices is not None else ["cpu"] * len(stages)
        if len(devices) != len(stages):
            raise ValueError(f"one device per stage: got {len(stages)} stages and {len(devices)} devices")
        self.devices = [torch.device(d) for d in devices]
        self.stages = nn.ModuleList(s.to(d) for s, d in zip(stages, self.devices))
        self.transfer_bytes: list[int] = []

    def forward(self, x):
        self.transfer_bytes = []
        for i, (stage, dev) in enumerate(zip(self.stages, self.devices)):
            if i > 0:
                self.transfer_bytes.append(x.numel() * x.element_size())
            x = stage(x.to(dev))
        return x


# --------------------------------------------------------------------------------------------
# One process per stage: send/recv between ranks
# --------------------------------------------------------------------------------------------
_MAX_DIMS = 8


def send_tensor(t: torch.Tensor, dst: int) -> int:
    """Send a float tensor of any shape to ``dst`` (a small header with the shape goes first).

    Returns the bytes of payload sent."""
    if t.dim() > _MAX_DIMS:
        raise ValueError(f"send_tensor handles up to {_MAX_DIMS} dimensions, got {t.dim()}")
    header = torch.tensor([t.dim(), *t.shape] + [0] * (_MAX_DIMS - t.dim()), dtype=torch.int64, device=t.device)
    wait_all(p2p([(header, dst, 0), (t.detach().contiguous(), dst, 1)])[0])  # one batch: the form NCCL needs
    return t.numel() * t.element_size()


def recv_tensor(src: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Receive a tensor sent by :func:`send_tensor` from ``src``."""
    header = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=device)
    recv(header, src, 0)
    shape = header[1:1 + int(header[0])].tolist()
    buf = torch.empty(shape, dtype=dtype, device=device)
    recv(buf, src, 1)
    return buf


def _grads_by_name(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().cpu().clone() for n, p in module.named_parameters() if p.grad is not None}


def stage_rank(ctx, model: str | nn.Module, cuts: Sequence[int], x: torch.Tensor, y: torch.Tensor,
                 seed: int = 0) -> dict:
    """Lab function: rank ``r`` holds stage ``r`` only, and runs one forward and backward step.

    Forward: rank 0 takes ``x``; each rank receives the previous stage's activation, runs its
    stage, sends the result on. The last rank computes the cross-entropy loss against ``y``.
    Backward: the last rank calls ``loss.backward()``; each rank sends the gradient of its input
    back to the previous rank, which calls ``out.backward(grad)``. Returns this rank's
    gradients by parameter name, the output and loss (last rank), the exact bytes it holds and
    sends, and its timeline (``events`` for :func:`labkit.viz.gantt`).
    ``model`` is a name for :func:`build_model` (built with ``seed`` on every rank) or
    a module.
    """
    net = build_model(model, seed) if isinstance(model, str) else copy.deepcopy(model)
    net.train()
    cuts = validate_cuts(cuts, len(flatten_resnet(net)))
    if ctx.world_size != len(cuts) + 1:
        raise ValueError(f"world size {ctx.world_size} != number of stages {len(cuts) + 1}: "
                         f"launch with world_size={len(cuts) + 1} or pass {ctx.world_size - 1} cuts")
    stage = split_stages(net, cuts)[ctx.rank].to(ctx.device)
    del net  # this rank keeps only its stage
    r, last = ctx.rank, ctx.world_size - 1
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # a common start, so the timeline shows who waits for whom
    t0 = now(ctx.device)  # every time below is read after a synchronise: a GPU span ends when its kernels have run
    if r == 0:
        inp = x.to(ctx.device)
    else:
        inp = recv_tensor(r - 1, ctx.device).requires_grad_()
    t_in = now(ctx.device)
    recv_bytes = inp.numel() * inp.element_size() if r > 0 else 0
    out, saved = saved_bytes(lambda: stage(inp), exclude=stage)
    sent = 0
    t_fwd = now(ctx.device)
    if r < last:
        sent += send_tensor(out, r + 1)
        grad_out = recv_tensor(r + 1, ctx.device)
        t_grad = now(ctx.device)
        out.backward(grad_out)
        loss = None
    else:
        t_grad = now(ctx.device)
        loss = nn.functional.cross_entropy(out, y.to(ctx.device))
        loss.backward()
    t_bwd = now(ctx.device)
    if r > 0:
        sent += send_tensor(inp.grad, r - 1)
    t_end = now(ctx.device)
    events = [{"lane": r, "kind": "wait", "start": t0, "end": t_in, "label": "wait x"},
              {"lane": r, "kind": "forward", "start": t_in, "end": t_fwd, "label": f"F{r}"},
              {"lane": r, "kind": "wait", "start": t_fwd, "end": t_grad, "label": "wait grad"},
              {"lane": r, "kind": "backward", "start": t_grad, "end": t_bwd, "label": f"B{r}"}]
    return {
        "rank": r, "layers": list(stage._modules), "grads": _grads_by_name(stage),
        "output": out.detach().cpu() if r == last else None,
        "loss": float(loss) if loss is not None else None,
        "param_bytes": param_bytes(stage), "saved_bytes": saved, "recv_bytes": recv_bytes, "sent_bytes": sent,
        "forward_s": t_fwd - t_in, "backward_s": t_bwd - t_grad, "step_s": t_end - t0,
        "events": [e for e in events if e["end"] > e["start"]],
    }


def unsliced_step(model: str | nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> dict:
    """The unsliced model's output, loss and gradients (by flattened parameter name) for one step.

    Runs on one CPU thread, like the ranks: with several threads the kernels sum in another
    order, and BatchNorm over a tiny batch amplifies those last-bit differences (up to ~1e-3
    relative on ResNet-18 with 2 images of 32x32), which would hide real mistakes."""
    net = build_model(model, seed) if isinstance(model, str) else copy.deepcopy(model)
    net.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = net(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    return {"output": out.detach(), "loss": loss.item(), "grads": _grads_by_name(flatten_resnet(net))}


def run_staged(model: str = "small", cuts: Sequence[int] = (5,), batch: int = 4, seed: int = 0,
               pool: bool = False, timeout: float = 120, compare: bool = True, image_size: int | None = None) -> dict:
    """Launch :func:`stage_rank` on ``len(cuts)+1`` ranks and compare with the unsliced model.

    Returns ``{"ranks": per-rank results, "max_output_err", "max_grad_err", "max_grad_rel", "n_grads",
    "loss", "ref_loss"}``: max absolute differences, and for gradients also the worst per-tensor
    error relative to that tensor's largest entry (``compare=False`` skips :func:`unsliced_step`, the reference).
    ``image_size`` overrides the input side (32 for small, 224 for torchvision models); ``model``
    may also be a ResNet module (it is pickled to every rank; its input defaults to 32x32).
    """
    import labkit

    batch = validate_int("batch", batch, minimum=1)
    n_layers = len(flatten_resnet(build_model(model, seed) if isinstance(model, str) else model))
    b = validate_cuts(cuts, n_layers)
    g = torch.Generator().manual_seed(seed + 1)
    shape = input_shape_for(model, batch) if isinstance(model, str) else (batch, 3, 32, 32)
    if image_size is not None:
        image_size = validate_int("image_size (pixels per side)", image_size, minimum=8)
        shape = (batch, 3, image_size, image_size)
    x = torch.randn(*shape, generator=g)
    if isinstance(model, str):
        n_cls = 10 if model == "small" else 1000
    else:  # ask the model how many classes it has (on a copy, so its BatchNorm statistics stay put)
        with torch.no_grad():
            n_cls = copy.deepcopy(model).eval()(x[:1]).shape[-1]
    y = torch.randint(0, n_cls, (batch,), generator=g)
    ranks = labkit.launch(stage_rank, world_size=len(b) + 1, kwargs=dict(model=model, cuts=b, x=x, y=y, seed=seed),
                          pool=pool, timeout=timeout, echo=False)
    out = {"ranks": list(ranks), "loss": ranks[-1]["loss"], "seconds": ranks.seconds}
    if compare:
        ref = unsliced_step(model, x, y, seed)
        grads = {k: v for rr in ranks for k, v in rr["grads"].items()}
        if set(grads) != set(ref["grads"]):
            raise AssertionError(f"parameter names differ: {sorted(set(grads) ^ set(ref['grads']))[:5]}")
        out["max_output_err"] = float((ranks[-1]["output"] - ref["output"]).abs().max())
        out["max_grad_err"] = max(float((grads[k] - ref["grads"][k]).abs().max()) for k in grads)
        out["max_grad_rel"] = max(float((grads[k] - ref["grads"][k]).abs().max()
                                        / ref["grads"][k].abs().max().clamp_min(1e-12))
                                  for k in grads)
        out["n_grads"] = len(grads)
        out["ref_loss"] = ref["loss"]
    return out


# --------------------------------------------------------------------------------------------
# The contrast: data parallelism (torch DDP) holds the whole model on every rank
# --------------------------------------------------------------------------------------------
def replica_rank(ctx, model: str = "resnet18", batch: int = 2, image_size: int = 32) -> dict:
    """One training step of ``model`` under ``torch.nn.parallel.DistributedDataParallel``.

    Each rank builds the model from its own seed (so the replicas start different), DDP broadcasts
    rank 0's parameters and buffers, and the step all-reduces the gradients. Returns this rank's
    parameter + buffer bytes (:func:`param_bytes` of the wrapped module) and the largest parameter
    difference to rank 0 after the step (0: every rank holds the same whole model)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    net = build_model(model, seed=100 + ctx.rank).train().to(ctx.device)
    ddp = DistributedDataParallel(net)
    g = torch.Generator().manual_seed(ctx.rank)  # drawn on the CPU (the same numbers on every machine), then moved
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(ctx.device)
    y = torch.randint(0, 10, (batch,), generator=g).to(ctx.device)
    nn.functional.cross_entropy(ddp(x), y).backward()
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    return {"rank": ctx.rank, "param_bytes": param_bytes(ddp.module),
            "n_params": sum(p.numel() for p in ddp.module.parameters()),
            "max_diff_to_rank0": float((flat - ref).abs().max())}


def run_replicas(model: str = "resnet18", world_size: int = 2, pool: bool = False, timeout: float = 120) -> list[dict]:
    """Launch :func:`replica_rank` on ``world_size`` gloo ranks; one dict per rank."""
    import labkit

    world_size = validate_int("world_size", world_size, minimum=1)
    return list(labkit.launch(replica_rank, world_size=world_size, kwargs=dict(model=model), pool=pool,
                              timeout=timeout, echo=False))
