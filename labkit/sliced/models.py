"""The models lab 03 slices, as flat layer lists, and what a split costs (no processes).

:func:`flatten_resnet` turns a torchvision ResNet (or :func:`small_resnet`, a CIFAR-sized one) into
one flat ``nn.Sequential`` of layers that computes exactly the model's ``forward``;
:func:`split_stages` cuts that sequence at chosen cuts (:mod:`labkit.partition`: a cut ``c`` starts a
new stage at layer ``c``) into stage modules. The pipeline (lab 04) and balancing (lab 05) labs reuse
both. :func:`split_costs` counts, per stage, the parameter bytes, the bytes of the activation that
crosses each cut (sent forward, and its gradient sent back) and the activation bytes autograd keeps
for the backward pass, all exactly from tensors, not estimated.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..partition import stage_ranges

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


def candidate_cuts(layers: nn.Module) -> list[int]:
    """Every legal cut of the flattened model: ``1 .. L-1`` (a new stage starts at that layer)."""
    return list(range(1, len(flatten_resnet(layers))))


def split_stages(model: nn.Module, cuts: Sequence[int]) -> list[nn.Sequential]:
    """Cut a ResNet (or an already flat ``nn.Sequential``) into ``len(cuts)+1`` stages.

    ``split_stages(resnet18, [5, 10])`` gives stages ``layers[0:5]``, ``layers[5:10]``,
    ``layers[10:]``. The stages share parameters with ``model`` (no copy); running them one
    after another equals ``model(x)``. Layer names are kept, so ``stage.named_parameters()``
    names match ``flatten_resnet(model).named_parameters()``.
    """
    layers = flatten_resnet(model)
    return [layers[r.start:r.stop] for r in stage_ranges(cuts, len(layers))]


# --------------------------------------------------------------------------------------------
# Costs, counted from tensors
# --------------------------------------------------------------------------------------------
def param_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (BatchNorm running stats included)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def saved_bytes(fn, exclude: nn.Module | None = None):
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


def split_costs(model: nn.Module, cuts: Sequence[int], input_shape: Sequence[int] = (8, 3, 32, 32)) -> list[dict]:
    """What each stage costs for one training step on an input of ``input_shape``.

    Per stage: layer names, parameter count, ``param_MB`` (parameters + buffers), ``send_MB``
    (the activation it sends to the next stage; its gradient of the same size comes back),
    ``saved_MB`` (activation bytes autograd keeps for this stage's backward, counted from the
    saved tensors' storages with ``saved_tensors_hooks``, weights excluded) and ``device_MB`` = param + grads +
    saved + received input. All counted exactly from tensors on a real forward pass.
    """
    layers = flatten_resnet(model)
    stages = split_stages(layers, cuts)
    x = torch.randn(*input_shape)
    rows = []
    was_training = layers.training
    layers.train()
    try:
        for i, st in enumerate(stages):
            x_in = x.detach().requires_grad_(i > 0)
            out, saved = saved_bytes(lambda: st(x_in), exclude=st)
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
