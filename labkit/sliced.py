"""Model parallelism by stages: cut a ResNet into K consecutive stages and run them.

Three layers of this module, from pure to distributed:

1. **Flattening and splitting** (no processes). :func:`flatten_resnet` turns a torchvision ResNet
   (or :func:`small_resnet`, a CIFAR-sized one) into one flat ``nn.Sequential`` of layers that
   computes exactly the model's ``forward``; :func:`split_stages` cuts that sequence at chosen
   boundaries into ``K`` stage modules. The pipeline (``labkit.pipeline``) and balancing
   (``labkit.balance``) labs reuse both.
2. **Costs** (:func:`split_costs`): per stage, the parameter bytes, the bytes of the activation
   that crosses each boundary (sent forward, and its gradient sent back) and the activation bytes
   autograd keeps for the backward pass, all counted exactly from tensors, not estimated.
3. **Execution**: :class:`StagedModel` runs the stages in one process with each stage on its own
   device (as on a 2-GPU box; on a CPU every device is the CPU), and :func:`stage_worker` runs one
   stage per rank under :func:`labkit.launch`, passing activations forward and gradients backward
   with ``send``/``recv``. :func:`run_staged` drives it and compares with the unsliced model.

A boundary ``b`` means "a new stage starts at layer ``b``": with ``L`` layers the legal boundaries
are ``1 .. L-1``, strictly increasing, and ``K`` boundaries give ``K+1`` stages.
"""
from __future__ import annotations

import copy
import time
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

__all__ = [
    "small_resnet", "build_model", "flatten_resnet", "candidate_boundaries", "check_boundaries",
    "split_stages", "boundaries_from_balance", "balance_from_boundaries", "even_boundaries",
    "param_bytes", "split_costs", "StagedModel", "send_tensor", "recv_tensor", "stage_worker",
    "reference_step", "run_staged", "check_stage_params", "tour",
]

MODEL_NAMES = ("small", "resnet18", "resnet50")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class SmallResNet(nn.Module):
    """A ResNet for 32x32 images with the attribute layout of torchvision's ResNet.

    Stem: 3x3 convolution, stride 1, no max-pool (``maxpool`` is an ``Identity`` so the layout
    matches torchvision's). Then one group of torchvision ``BasicBlock`` per width, the first of
    each group after the first halving the resolution.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 128),
                 blocks: Sequence[int] = (1, 1, 1, 1)):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        if len(widths) != len(blocks) or not 1 <= len(widths) <= 4:
            raise ValueError(f"widths and blocks must have the same length, 1 to 4; got {widths} and {blocks}")
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        inplanes = widths[0]
        for g, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if g == 0 else 2
            layers = []
            for i in range(n):
                s = stride if i == 0 else 1
                down = None
                if s != 1 or inplanes != w:
                    down = nn.Sequential(nn.Conv2d(inplanes, w, 1, stride=s, bias=False), nn.BatchNorm2d(w))
                layers.append(BasicBlock(inplanes, w, stride=s, downsample=down))
                inplanes = w
            setattr(self, f"layer{g + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for g in range(1, 5):
            layer = getattr(self, f"layer{g}", None)
            if layer is not None:
                x = layer(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_resnet(num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 128),
                 blocks: Sequence[int] = (1, 1, 1, 1)) -> SmallResNet:
    """A small ResNet for 32x32 inputs (about 0.31 M parameters with the defaults) that runs fast on a CPU.

    Same attribute layout as torchvision's ResNet, so :func:`flatten_resnet` works on it.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return SmallResNet(num_classes, widths, blocks)


def build_model(name: str = "small", seed: int = 0, num_classes: int | None = None) -> nn.Module:
    """Build ``"small"`` (32x32), ``"resnet18"`` or ``"resnet50"`` (torchvision, ``weights=None``)
    with weights drawn from ``torch.manual_seed(seed)``: the same name and seed give the same
    weights in every process, so ranks need not ship weights to each other."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model name must be one of {MODEL_NAMES}, got {name!r}")
    torch.manual_seed(seed)
    if name == "small":
        return small_resnet(num_classes or 10)
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes or 1000)


def input_shape_for(name: str, batch: int = 2) -> tuple[int, ...]:
    """A natural input shape for :func:`build_model`'s names (32x32 for small, 224x224 otherwise)."""
    side = 32 if name == "small" else 224
    return (batch, 3, side, side)


# --------------------------------------------------------------------------------------------
# Flattening and splitting
# --------------------------------------------------------------------------------------------
_STEM = ("conv1", "bn1", "relu", "maxpool")


def flatten_resnet(model: nn.Module) -> nn.Sequential:
    """The ResNet as one flat ``nn.Sequential`` computing exactly ``model.forward``.

    Layers, in order: ``conv1, bn1, relu, maxpool``, each residual block as one layer
    (``layer1_0, layer1_1, ...``), ``avgpool``, ``flatten``, ``fc``. ResNet-18 gives 15 layers,
    ResNet-50 23, :func:`small_resnet` 11. Residual blocks are kept whole because their skip
    connection needs the block's input: a cut inside a block would have to send two tensors.

    The layers are the model's own modules (parameters are shared, not copied), except that the
    stem ReLU becomes a non-in-place ``nn.ReLU()`` (it has no parameters): a stage starting with an
    in-place ReLU would overwrite the activation it received, which autograd forbids for a tensor
    that must give its gradient back to the previous stage.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"flatten_resnet expects a torchvision ResNet or small_resnet(), got {type(model).__name__}")
    if isinstance(model, nn.Sequential):
        return model  # already flat
    missing = [n for n in (*_STEM, "layer1", "avgpool", "fc") if not hasattr(model, n)]
    if missing:
        raise TypeError(f"flatten_resnet expects a ResNet with conv1, bn1, relu, maxpool, layer1..4, avgpool, fc; "
                        f"{type(model).__name__} lacks {missing}. Pass torchvision.models.resnet18(weights=None) "
                        f"or labkit.sliced.small_resnet()")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for n in _STEM:
        layers[n] = nn.ReLU() if n == "relu" else getattr(model, n)
    for g in range(1, 5):
        group = getattr(model, f"layer{g}", None)
        if group is None:
            continue
        for i, block in enumerate(group):
            layers[f"layer{g}_{i}"] = block
    layers["avgpool"] = model.avgpool
    layers["flatten"] = nn.Flatten(1)
    layers["fc"] = model.fc
    return nn.Sequential(layers)


def candidate_boundaries(layers: nn.Module) -> list[int]:
    """Every legal boundary of the flattened model: ``1 .. L-1`` (a new stage starts at that layer)."""
    return list(range(1, len(flatten_resnet(layers))))


def check_boundaries(boundaries: Sequence[int], n_layers: int) -> list[int]:
    """Validate split points and return them as a list of ints; raise a ValueError saying what to pass."""
    if isinstance(boundaries, (int, str)) or not hasattr(boundaries, "__iter__"):
        raise TypeError(f"boundaries must be a list of layer indices such as [4, 9], got {boundaries!r}")
    b = list(boundaries)
    for x in b:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"boundaries must be integers (layer indices), got {x!r} in {b}")
    if len(b) + 1 > n_layers:
        raise ValueError(f"{len(b) + 1} stages asked for but the model has only {n_layers} layers: "
                         f"pass at most {n_layers - 1} boundaries")
    bad = [x for x in b if not 1 <= x <= n_layers - 1]
    if bad:
        raise ValueError(f"split points {bad} are out of range: each must be between 1 and {n_layers - 1} "
                         f"(the model has {n_layers} layers; a boundary b starts a new stage at layer b)")
    if any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"split points must be strictly increasing with no repeats, got {b}; "
                         f"pass sorted(set({b}))")
    return b


def split_stages(model: nn.Module, boundaries: Sequence[int]) -> list[nn.Sequential]:
    """Cut a ResNet (or an already flat ``nn.Sequential``) into ``len(boundaries)+1`` stages.

    ``split_stages(resnet18, [5, 10])`` gives stages ``layers[0:5]``, ``layers[5:10]``,
    ``layers[10:]``. The stages share parameters with ``model`` (no copy); running them one
    after another equals ``model(x)``. Layer names are kept, so ``stage.named_parameters()``
    names match ``flatten_resnet(model).named_parameters()``.
    """
    layers = flatten_resnet(model)
    b = check_boundaries(boundaries, len(layers))
    edges = [0, *b, len(layers)]
    return [layers[lo:hi] for lo, hi in zip(edges, edges[1:])]


def boundaries_from_balance(balance: Sequence[int]) -> list[int]:
    """torchgpipe-style layer counts per stage, e.g. ``[3, 4, 5]``, to boundaries ``[3, 7]``."""
    if not balance or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in balance):
        raise ValueError(f"balance must be a non-empty list of positive layer counts such as [3, 4, 5], got {balance!r}")
    out, acc = [], 0
    for n in balance[:-1]:
        acc += n
        out.append(acc)
    return out


def balance_from_boundaries(boundaries: Sequence[int], n_layers: int) -> list[int]:
    """Inverse of :func:`boundaries_from_balance`: layers per stage."""
    b = check_boundaries(boundaries, n_layers)
    edges = [0, *b, n_layers]
    return [hi - lo for lo, hi in zip(edges, edges[1:])]


def even_boundaries(n_layers: int, n_stages: int) -> list[int]:
    """Boundaries giving each stage the same number of layers (+-1): naive, ignores cost."""
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or not 1 <= n_stages <= n_layers:
        raise ValueError(f"n_stages must be an integer between 1 and the number of layers ({n_layers}), got {n_stages!r}")
    return [round(i * n_layers / n_stages) for i in range(1, n_stages)]


# --------------------------------------------------------------------------------------------
# Costs, counted from tensors
# --------------------------------------------------------------------------------------------
def param_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (BatchNorm running stats included)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _saved_bytes(fn, exclude: nn.Module | None = None):
    """Run ``fn()`` and count the distinct tensor storages autograd saved for backward.

    Storages of ``exclude``'s parameters and buffers (weights that convolutions save) are not
    counted: they are already counted as parameters, and what is left is activation memory."""
    seen: dict[tuple, int] = {}
    skip = set()
    if exclude is not None:
        skip = {(t.untyped_storage().data_ptr(), t.device.type) for t in (*exclude.parameters(), *exclude.buffers())}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            if key in skip:
                return t
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except Exception:  # tensors without storage (e.g. sparse): count their elements
            seen[(id(t), "x")] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def split_costs(model: nn.Module, boundaries: Sequence[int], input_shape: Sequence[int] = (8, 3, 32, 32)) -> list[dict]:
    """What each stage costs for one training step on an input of ``input_shape``.

    Per stage: layer names, parameter count, ``param_MB`` (parameters + buffers), ``send_MB``
    (the activation it sends to the next stage; its gradient of the same size comes back),
    ``saved_MB`` (activation bytes autograd keeps for this stage's backward, counted from the
    saved tensors' storages with ``saved_tensors_hooks``, weights excluded) and ``device_MB`` = param + grads +
    saved + received input. All counted exactly from tensors on a real forward pass.
    """
    layers = flatten_resnet(model)
    stages = split_stages(layers, boundaries)
    x = torch.randn(*input_shape)
    rows = []
    was_training = layers.training
    layers.train()
    try:
        for i, st in enumerate(stages):
            x_in = x.detach().requires_grad_(i > 0)
            out, saved = _saved_bytes(lambda: st(x_in), exclude=st)
            pb = param_bytes(st)
            gb = sum(p.numel() * p.element_size() for p in st.parameters())
            send = out.numel() * out.element_size() if i < len(stages) - 1 else 0
            recv = x_in.numel() * x_in.element_size()
            rows.append({
                "stage": i, "layers": f"{next(iter(st._modules))}..{list(st._modules)[-1]}",
                "n_layers": len(st), "params": sum(p.numel() for p in st.parameters()),
                "param_MB": pb / 1e6, "send_shape": "x".join(map(str, out.shape)) if send else "-",
                "send_MB": send / 1e6, "saved_MB": saved / 1e6,
                "device_MB": (pb + gb + saved + recv) / 1e6,
            })
            x = out.detach()
    finally:
        layers.train(was_training)
    return rows


# --------------------------------------------------------------------------------------------
# One process, one device per stage
# --------------------------------------------------------------------------------------------
class StagedModel(nn.Module):
    """Stages placed on devices, run one after another in one process (naive model parallelism).

    ``StagedModel(split_stages(model, [7]), ["cuda:0", "cuda:1"])`` is the classic two-GPU
    split; with ``["cpu", "cpu"]`` it runs anywhere. The activation is copied to the next
    stage's device at each boundary (``.to`` is differentiable: the gradient goes back the same
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
    import torch.distributed as dist

    if t.dim() > _MAX_DIMS:
        raise ValueError(f"send_tensor handles up to {_MAX_DIMS} dimensions, got {t.dim()}")
    header = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64)
    header[0] = t.dim()
    header[1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.send(header.to(t.device), dst)
    dist.send(t.detach().contiguous(), dst)
    return t.numel() * t.element_size()


def recv_tensor(src: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Receive a tensor sent by :func:`send_tensor` from ``src``."""
    import torch.distributed as dist

    header = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=device)
    dist.recv(header, src)
    shape = header[1:1 + int(header[0])].tolist()
    buf = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buf, src)
    return buf


def _grads_by_name(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().cpu().clone() for n, p in module.named_parameters() if p.grad is not None}


def stage_worker(ctx, model: str | nn.Module, boundaries: Sequence[int], x: torch.Tensor, y: torch.Tensor,
                 seed: int = 0) -> dict:
    """Lab function: rank ``r`` holds stage ``r`` only, and runs one forward and backward step.

    Forward: rank 0 takes ``x``; each rank receives the previous stage's activation, runs its
    stage, sends the result on. The last rank computes the cross-entropy loss against ``y``.
    Backward: the last rank calls ``loss.backward()``; each rank sends the gradient of its input
    back to the previous rank, which calls ``out.backward(grad)``. Returns this rank's
    gradients by parameter name, the output and loss (last rank), the exact bytes it holds and
    sends, and its timeline (``events`` for :func:`labkit.viz.gantt`). ``model`` is a name for :func:`build_model` (built with ``seed`` on every rank) or
    a module.
    """
    net = build_model(model, seed) if isinstance(model, str) else copy.deepcopy(model)
    net.train()
    boundaries = check_boundaries(boundaries, len(flatten_resnet(net)))
    if ctx.world_size != len(boundaries) + 1:
        raise ValueError(f"world size {ctx.world_size} != number of stages {len(boundaries) + 1}: "
                         f"launch with world_size={len(boundaries) + 1} or pass {ctx.world_size - 1} boundaries")
    stage = split_stages(net, boundaries)[ctx.rank].to(ctx.device)
    del net  # this rank keeps only its stage
    r, last = ctx.rank, ctx.world_size - 1
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # a common start, so the timeline shows who waits for whom
    t0 = time.perf_counter()
    if r == 0:
        inp = x.to(ctx.device)
    else:
        inp = recv_tensor(r - 1, ctx.device).requires_grad_()
    t_in = time.perf_counter()
    recv_bytes = inp.numel() * inp.element_size() if r > 0 else 0
    out, saved = _saved_bytes(lambda: stage(inp), exclude=stage)
    sent = 0
    t_fwd = time.perf_counter()
    if r < last:
        sent += send_tensor(out, r + 1)
        grad_out = recv_tensor(r + 1, ctx.device)
        t_grad = time.perf_counter()
        out.backward(grad_out)
        loss = None
    else:
        t_grad = time.perf_counter()
        loss = nn.functional.cross_entropy(out, y.to(ctx.device))
        loss.backward()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    t_bwd = time.perf_counter()
    if r > 0:
        sent += send_tensor(inp.grad, r - 1)
    t_end = time.perf_counter()
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


def reference_step(model: str | nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> dict:
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


def run_staged(model: str = "small", boundaries: Sequence[int] = (5,), batch: int = 4, seed: int = 0,
               pool: bool = False, timeout: float = 120, compare: bool = True, image_size: int | None = None) -> dict:
    """Launch :func:`stage_worker` on ``len(boundaries)+1`` ranks and compare with the unsliced model.

    Returns ``{"ranks": per-rank results, "max_output_err", "max_grad_err", "max_grad_rel", "n_grads",
    "loss", "ref_loss"}``: max absolute differences, and for gradients also the worst per-tensor
    error relative to that tensor's largest entry (``compare=False`` skips the reference).
    ``image_size`` overrides the input side (32 for small, 224 for torchvision models); ``model``
    may also be a ResNet module (it is pickled to every rank; its input defaults to 32x32).
    """
    import labkit

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    n_layers = len(flatten_resnet(build_model(model, seed) if isinstance(model, str) else model))
    b = check_boundaries(boundaries, n_layers)
    g = torch.Generator().manual_seed(seed + 1)
    shape = input_shape_for(model, batch) if isinstance(model, str) else (batch, 3, 32, 32)
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8 (pixels per side), got {image_size!r}")
        shape = (batch, 3, image_size, image_size)
    x = torch.randn(*shape, generator=g)
    if isinstance(model, str):
        n_cls = 10 if model == "small" else 1000
    else:  # ask the model how many classes it has (on a copy, so its BatchNorm statistics stay put)
        with torch.no_grad():
            n_cls = copy.deepcopy(model).eval()(x[:1]).shape[-1]
    y = torch.randint(0, n_cls, (batch,), generator=g)
    ranks = labkit.launch(stage_worker, world_size=len(b) + 1, args=(model, b, x, y, seed), pool=pool,
                          timeout=timeout, echo=False)
    out = {"ranks": list(ranks), "loss": ranks[-1]["loss"], "seconds": ranks.seconds}
    if compare:
        ref = reference_step(model, x, y, seed)
        grads = {k: v for rr in ranks for k, v in rr["grads"].items()}
        if set(grads) != set(ref["grads"]):
            raise AssertionError(f"parameter names differ: {sorted(set(grads) ^ set(ref['grads']))[:5]}")
        out["max_output_err"] = float((ranks[-1]["output"] - ref["output"]).abs().max())
        out["max_grad_err"] = max(float((grads[k] - ref["grads"][k]).abs().max()) for k in grads)
        out["max_grad_rel"] = max(float((grads[k] - ref["grads"][k]).abs().max() / ref["grads"][k].abs().max().clamp_min(1e-12))
                                  for k in grads)
        out["n_grads"] = len(grads)
        out["ref_loss"] = ref["loss"]
    return out


def check_stage_params(fn):
    """Exercise check: ``fn(model, boundaries)`` must return the parameter count of each stage."""
    from .checks import expect_equal, run_cases

    def case(name, bounds):
        def thunk():
            model = build_model(name)
            want = [r["params"] for r in split_costs(model, bounds, input_shape_for(name, 1))]
            got = fn(model, list(bounds))
            expect_equal([int(v) for v in got], want, what=f"parameters per stage of {name} split at {list(bounds)}")
        return thunk

    cases = [(f"{n} split at {b}", case(n, b)) for n, b in [("small", [4]), ("small", [2, 5, 8]), ("small", [9])]]
    return run_cases("parameters per stage", cases,
                     hint="split_stages(model, boundaries) gives the stages; count p.numel() over stage.parameters()")


# --------------------------------------------------------------------------------------------
# Quick path
# --------------------------------------------------------------------------------------------
def tour() -> list[dict]:
    """Lab 03's headless quick checks (a few seconds plus one 2-rank launch)."""
    from . import sliced_channels

    rows = []

    def add(check, fn):
        from .tour import check_row

        rows.append(check_row("03 model parallel", check, fn))

    def single_process():
        torch.manual_seed(0)
        net = small_resnet().train()
        ref = copy.deepcopy(net)
        x = torch.randn(4, 3, 32, 32)
        staged = StagedModel(split_stages(net, [4, 7]), ["cpu"] * 3)
        a, b = staged(x), ref(x)
        a.square().mean().backward()
        b.square().mean().backward()
        ga = dict(flatten_resnet(net).named_parameters())
        err = max((ga[n].grad - p.grad).abs().max().item() for n, p in flatten_resnet(ref).named_parameters())
        oe = (a - b).abs().max().item()
        return oe < 1e-5 and err < 1e-5, f"output err {oe:.1e}, grad err {err:.1e}"

    def multi_process():
        r = run_staged("small", [5], batch=4, pool=True)
        ok = r["max_output_err"] < 1e-5 and r["max_grad_rel"] < 1e-5
        return ok, f"output err {r['max_output_err']:.1e}, grad err {r['max_grad_err']:.1e} over {r['n_grads']} tensors"

    add("3 stages on 3 'devices' in one process == unsliced small ResNet (output, grads)", single_process)
    add("2 ranks, send/recv activations and gradients == unsliced small ResNet", multi_process)
    rows.extend(sliced_channels.tour())
    return rows
