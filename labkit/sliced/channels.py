"""Model parallelism by channels (tensor parallelism) for convolutions and linear layers.

A convolution or linear layer ``y = W x + b`` can be cut across N ranks two ways:

* **column** (split the *output* channels): rank r holds rows ``W[r]`` of the weight and computes
  ``y[r] = W[r] x`` on the whole input; the slices are then gathered (``all_gather``) or handed,
  still split, to a row-parallel layer.
* **row** (split the *input* channels): rank r holds ``W[:, r]`` and the matching slice ``x[r]``
  of the input, computes a partial result ``W[:, r] x[r]``; ``all_reduce`` sums the partials
  (a convolution is linear in its input channels, so the sum is exact), then the bias is added.

A column layer followed by a row layer needs **one** all-reduce in the forward pass and one in the
backward pass (Megatron-LM's MLP, Shoeybi et al. 2019). :class:`TensorParallelConvBlock` applies it
to a conv-BN-ReLU-conv block: this is the working version of the source article's
``SplitConvBlock`` (:class:`ArticleSplitConvBlock`, reproduced faithfully, does not run).

The collectives are written as four tiny autograd functions so their forward and backward are
visible: :func:`copy_to_ranks` (identity / all-reduce), :func:`reduce_from_ranks`
(all-reduce / identity), :func:`gather_channels` (all-gather / keep own slice),
:func:`scatter_channels` (keep own slice / all-gather). With ``group=`` (e.g. ``mesh["tp"].get_group()``) the
channels are split over that group's ranks, by position in it, and the collectives run on it (None: all ranks).

This module is long because the autograd collectives, the split layers built on them and the rank
function that checks each split layer against the unsplit one belong together.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._compat import renamed_kwargs
from .._validate import validate_int
from ..collectives.validation import _group_position, _rank_world
from ..devices import no_tf32
from .models import saved_bytes

__all__ = [
    "copy_to_ranks", "reduce_from_ranks", "gather_channels", "scatter_channels", "shard_layer",
    "ColumnParallel", "RowParallel", "conv_block", "TensorParallelConvBlock",
    "channel_rank", "run_channel_checks", "row_parallel_reference",
]


COMM_BYTES = {"all_reduce": 0, "all_gather": 0}  # payload bytes this process put into collectives


def _count(kind: str, t: torch.Tensor) -> None:
    COMM_BYTES[kind] += t.numel() * t.element_size()


def _chunk(t: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    size = t.shape[dim]
    if size % world_size:
        raise ValueError(f"{size} channels do not split evenly over {world_size} ranks: "
                         f"pick a world size that divides {size}")
    per_rank = size // world_size
    return t.narrow(dim, rank * per_rank, per_rank)


class _CopyToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        _group_position(group, "copy_to_ranks")  # fail here, not in the backward pass
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        _count("all_reduce", g)
        dist.all_reduce(g, group=ctx.group)  # every rank used x: the gradients of its uses add up
        return g, None


class _ReduceFromRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        _group_position(group, "reduce_from_ranks")
        x = x.contiguous().clone()
        _count("all_reduce", x)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None  # d(sum)/d(part) = 1: each rank's partial gets the whole gradient


class _GatherChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, (ctx.world_size, ctx.rank) = dim, _group_position(group, "gather_channels")
        parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
        _count("all_gather", x)
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, g):
        return _chunk(g, ctx.dim, ctx.rank, ctx.world_size).contiguous(), None, None


class _ScatterChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group, (ctx.world_size, rank) = dim, group, _group_position(group, "scatter_channels")
        return _chunk(x, dim, rank, ctx.world_size).contiguous()

    @staticmethod
    def backward(ctx, g):
        parts = [torch.empty_like(g) for _ in range(ctx.world_size)]
        _count("all_gather", g)
        dist.all_gather(parts, g.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=ctx.dim), None, None


def copy_to_ranks(x, group=None):
    """Forward: identity (x is replicated). Backward: all-reduce the gradient over ``group``."""
    return _CopyToRanks.apply(x, group)


def reduce_from_ranks(x, group=None):
    """Forward: all-reduce over ``group`` (sum the partial results). Backward: identity."""
    return _ReduceFromRanks.apply(x, group)


def gather_channels(x, dim: int = 1, group=None):
    """Forward: all-gather the channel slices over ``group`` and concatenate. Backward: keep this rank's slice."""
    return _GatherChannels.apply(x, dim, group)


def scatter_channels(x, dim: int = 1, group=None):
    """Forward: keep this rank's channel slice. Backward: all-gather the gradient slices over ``group``."""
    return _ScatterChannels.apply(x, dim, group)


def _validate_layer(layer):
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"expected an nn.Conv2d or nn.Linear to shard, got {type(layer).__name__}")
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(f"only groups=1 convolutions can be channel-split here, got groups={layer.groups}")


def _validate_rank_in(rank, world_size):
    world_size = validate_int("world size", world_size, minimum=1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in 0..{world_size - 1}, got {rank!r}")


@renamed_kwargs(world="world_size")
def shard_layer(layer: nn.Module, mode: str, rank: int, world_size: int, bias: bool = True) -> nn.Module:
    """A new Conv2d/Linear holding rank ``rank``'s slice of ``layer``'s weights (copied).

    With ``c`` channels per rank (the layer's channels / ``world_size``), ``mode="column"`` keeps output channels
    ``rank*c:(rank+1)*c`` (and that slice of the bias); ``mode="row"`` keeps input channels ``rank*c:(rank+1)*c``
    and no bias (the bias is added once, after the partial results are summed).
    """
    _validate_layer(layer)
    _validate_rank_in(rank, world_size)
    if mode not in ("column", "row"):
        raise ValueError(f"mode must be 'column' (split outputs) or 'row' (split inputs), got {mode!r}")
    w = layer.weight.detach()
    w = _chunk(w, 0 if mode == "column" else 1, rank, world_size)
    b = layer.bias.detach() if (layer.bias is not None and mode == "column" and bias) else None
    if b is not None:
        b = _chunk(b, 0, rank, world_size)
    if isinstance(layer, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    else:
        new = nn.Conv2d(w.shape[1], w.shape[0], layer.kernel_size, stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation, bias=b is not None, padding_mode=layer.padding_mode, device="meta")
    new.weight = nn.Parameter(w.clone())
    if b is not None:
        new.bias = nn.Parameter(b.clone())
    return new


class _ShardedLayer(nn.Module):
    """What :class:`ColumnParallel` and :class:`RowParallel` share: this rank's slice of the layer (``local``), the
    channel dimension (1 for a convolution, the last for a linear layer) and the group the slices live on."""

    def __init__(self, layer: nn.Module, mode: str, rank, world_size, group, name: str):
        super().__init__()
        self.rank, self.world_size = _rank_world(rank, world_size, group, name)
        self.local = shard_layer(layer, mode, self.rank, self.world_size)
        self.dim = 1 if isinstance(layer, nn.Conv2d) else -1
        self.group = group


@renamed_kwargs(world="world_size")
class ColumnParallel(_ShardedLayer):
    """An ``nn.Conv2d`` or ``nn.Linear`` with its output channels split over the ranks.

    Built from the full layer (each rank copies its slice). Input: the whole tensor, the same on
    every rank. Output: the whole result (``gather_output=True``, one all-gather) or this rank's
    slice of channels (``False``, to feed a :class:`RowParallel`). ``group``: split over that process group's
    ranks, communicate within it (None: all ranks); ``rank``, ``world_size``: from the group unless given.
    """

    def __init__(self, layer: nn.Module, rank=None, world_size=None, gather_output: bool = True, *, group=None):
        super().__init__(layer, "column", rank, world_size, group, "ColumnParallel")
        self.gather_output = gather_output

    def forward(self, x):
        y = self.local(copy_to_ranks(x, group=self.group))
        return gather_channels(y, self.dim, group=self.group) if self.gather_output else y


@renamed_kwargs(world="world_size")
class RowParallel(_ShardedLayer):
    """An ``nn.Conv2d`` or ``nn.Linear`` with its input channels split over the ranks.

    Input: this rank's channel slice (``input_is_split=True``, e.g. from a ``ColumnParallel``
    with ``gather_output=False``) or the whole tensor (``False``: each rank takes its slice).
    Output: the whole result on every rank (one all-reduce), bias added once after the sum.
    ``group``, ``rank``, ``world_size``: as in :class:`ColumnParallel`.
    """

    def __init__(self, layer: nn.Module, rank=None, world_size=None, input_is_split: bool = True, *, group=None):
        super().__init__(layer, "row", rank, world_size, group, "RowParallel")
        self.input_is_split = input_is_split
        self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None
        self._conv = isinstance(layer, nn.Conv2d)

    def forward(self, x):
        if not self.input_is_split:
            x = scatter_channels(x, self.dim, group=self.group)
        y = reduce_from_ranks(self.local(x), group=self.group)
        if self.bias is not None:
            y = y + (self.bias.view(1, -1, 1, 1) if self._conv else self.bias)
        return y


def conv_block(inplanes: int = 16, mid: int = 32, planes: int = 16) -> nn.Sequential:
    """The unsplit reference block: 1x1 conv (in -> mid), BN, ReLU, 3x3 conv (mid -> planes), BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(inplanes, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
    )


def _shard_bn(bn: nn.BatchNorm2d, rank: int, world_size: int) -> nn.BatchNorm2d:
    """BatchNorm normalises each channel on its own, so a channel slice of it is exact."""
    k = bn.num_features // world_size
    new = nn.BatchNorm2d(k, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, dtype=bn.running_mean.dtype,
                         device=bn.running_mean.device)  # where the layer it slices lives
    with torch.no_grad():
        sl = slice(rank * k, (rank + 1) * k)
        if bn.affine:
            new.weight.copy_(bn.weight[sl])
            new.bias.copy_(bn.bias[sl])
        new.running_mean.copy_(bn.running_mean[sl])
        new.running_var.copy_(bn.running_var[sl])
    new.train(bn.training)
    return new


@renamed_kwargs(world="world_size")
class TensorParallelConvBlock(nn.Module):
    """:func:`conv_block` split over the ranks by its ``mid`` channels: the article's idea, done right.

    1x1 conv column-parallel (each rank makes ``mid/N`` channels, no communication), its BN and
    ReLU on the local channels (exact: both work channel by channel), 3x3 conv row-parallel
    (partial sums), one all-reduce, then the last BN and ReLU replicated. Equals the unsplit
    block, forward and backward; the big weights and the ``mid``-channel activation are 1/N per rank.
    ``group``, ``rank``, ``world_size``: as in :class:`ColumnParallel`.
    """

    def __init__(self, block: nn.Sequential, rank=None, world_size=None, *, group=None):
        super().__init__()
        conv_a, bn_a, _, conv_b, bn_b, _ = block
        self.rank, self.world_size = rank, world_size = _rank_world(rank, world_size, group, "TensorParallelConvBlock")
        self.col = ColumnParallel(conv_a, rank, world_size, gather_output=False, group=group)
        self.bn_a = _shard_bn(bn_a, rank, world_size)
        self.row = RowParallel(conv_b, rank, world_size, input_is_split=True, group=group)
        self.bn_b = copy.deepcopy(bn_b)

    def forward(self, x):
        h = F.relu(self.bn_a(self.col(x)))
        return F.relu(self.bn_b(self.row(h)))


# ---------------------------------------------------------------------------------------------
# Distributed equivalence checks and measurements
# ---------------------------------------------------------------------------------------------
def _pbytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


def channel_rank(ctx, batch: int = 4, seed: int = 0, channels: int = 32, side: int = 8) -> dict:
    """Lab function: on every rank, compare each channel-split layer with the unsplit one.

    Cases: column conv (gathered), row conv (input split by the layer), column linear, row
    linear, column->row linear pair, and :class:`TensorParallelConvBlock`. For each: max abs error
    of the output, of the input gradient, and of this rank's parameter gradients against the
    matching slice of the full layer's (relative to the largest reference value);
    plus parameter bytes and saved activation bytes of the
    split version and of the full one, measured on this rank, and the bytes it put into collectives
    (forward and backward, counted in the autograd functions).
    """
    torch.manual_seed(seed)
    c = channels
    dev = ctx.device  # everything on the rank's device: NCCL's collectives take no CPU tensor
    x_img = torch.randn(batch, c, side, side).to(dev)
    x_vec = torch.randn(batch, c).to(dev)
    full = {
        "column conv": nn.Conv2d(c, 2 * c, 3, padding=1),
        "row conv": nn.Conv2d(2 * c, c, 3, padding=1),
        "column linear": nn.Linear(c, 4 * c),
        "row linear": nn.Linear(4 * c, c),
        "column->row linears": nn.Sequential(nn.Linear(c, 4 * c), nn.ReLU(), nn.Linear(4 * c, c)),
        "TP conv block": conv_block(c, 2 * c, c),
    }
    full = {name: m.to(dev) for name, m in full.items()}
    inputs = {"column conv": x_img, "row conv": torch.randn(batch, 2 * c, side, side).to(dev), "column linear": x_vec,
              "row linear": torch.randn(batch, 4 * c).to(dev), "column->row linears": x_vec, "TP conv block": x_img}
    r, n = ctx.rank, ctx.world_size
    out = {"rank": r, "world_size": n, "cases": []}
    with no_tf32():  # float32 against float32 at 1e-5: TF32 convolutions on a GPU would differ by 1e-3
        for name, ref in full.items():
            ref.train()
            if name.startswith("column") and "->" not in name:
                par = ColumnParallel(ref, r, n)
            elif name.startswith("row"):
                par = RowParallel(ref, r, n, input_is_split=False)
            elif name == "column->row linears":
                par = nn.Sequential(ColumnParallel(ref[0], r, n, gather_output=False), nn.ReLU(),
                                    RowParallel(ref[2], r, n))
            else:
                par = TensorParallelConvBlock(ref, r, n)
            x = inputs[name]
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            COMM_BYTES.update(all_reduce=0, all_gather=0)
            ya, saved_full = saved_bytes(lambda: ref(xa), ref)
            yb, saved_par = saved_bytes(lambda: par(xb), par)
            w = torch.randn_like(ya)  # a random upstream gradient, the same on every rank
            (ya * w).sum().backward()
            (yb * w).sum().backward()
            grad_err = _param_grad_err(ref, par, r, n)
            out["cases"].append({
                "case": name, "out_err": _rel(yb, ya), "xgrad_err": _rel(xb.grad, xa.grad),
                "wgrad_err": grad_err, "full_param_bytes": _pbytes(ref), "param_bytes": _pbytes(par),
                "full_saved_bytes": saved_full, "saved_bytes": saved_par,
                "comm_bytes": COMM_BYTES["all_reduce"] + COMM_BYTES["all_gather"],
                "in_bytes": x.numel() * x.element_size(),
                "out_bytes": ya.numel() * ya.element_size(),
            })
    return out


def _param_grad_err(ref, par, r, n) -> float:
    """Compare each sharded parameter's gradient with the right slice of the full gradient."""
    pairs = []
    if isinstance(par, ColumnParallel):
        pairs += [(par.local.weight, ref.weight, 0), (par.local.bias, ref.bias, 0)]
    elif isinstance(par, RowParallel):
        pairs += [(par.local.weight, ref.weight, 1), (par.bias, ref.bias, None)]
    elif isinstance(par, TensorParallelConvBlock):
        pairs += [(par.col.local.weight, ref[0].weight, 0), (par.bn_a.weight, ref[1].weight, 0),
                  (par.bn_a.bias, ref[1].bias, 0), (par.row.local.weight, ref[3].weight, 1),
                  (par.bn_b.weight, ref[4].weight, None), (par.bn_b.bias, ref[4].bias, None)]
    else:  # column -> row linears
        pairs += [(par[0].local.weight, ref[0].weight, 0), (par[0].local.bias, ref[0].bias, 0),
                  (par[2].local.weight, ref[2].weight, 1), (par[2].bias, ref[2].bias, None)]
    err = 0.0
    for p, q, dim in pairs:
        if p is None:
            continue
        g = q.grad if dim is None else _chunk(q.grad, dim, r, n)
        err = max(err, _rel(p.grad, g))
    return err


def _rel(a, b) -> float:
    """Max abs difference relative to the reference's largest magnitude (scale-free)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run_channel_checks(world_size: int = 2, pool: bool = False, timeout: float = 120, **kw) -> list[dict]:
    """Launch :func:`channel_rank` and return one row per case with the worst relative error over ranks
    and rank 0's parameter and activation bytes as a fraction of the unsplit layer's."""
    import labkit

    world_size = validate_int("world_size", world_size, minimum=1)
    res = labkit.launch(channel_rank, world_size=world_size, kwargs=kw, pool=pool, timeout=timeout, echo=False)
    rows = []
    for i, c0 in enumerate(res[0]["cases"]):
        cs = [rr["cases"][i] for rr in res]
        rows.append({
            "case": c0["case"], "ranks": world_size,
            "max_err": max(max(c["out_err"], c["xgrad_err"], c["wgrad_err"]) for c in cs),
            "params/rank": c0["param_bytes"] / c0["full_param_bytes"],
            "saved/rank": c0["saved_bytes"] / c0["full_saved_bytes"],
            "param_kB": c0["param_bytes"] / 1e3, "full_param_kB": c0["full_param_bytes"] / 1e3,
            "comm_kB/rank": c0["comm_bytes"] / 1e3, "input_kB": c0["in_bytes"] / 1e3,
            "output_kB": c0["out_bytes"] / 1e3,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# Exercise support
# ---------------------------------------------------------------------------------------------
@renamed_kwargs(world="world_size")
def row_parallel_reference(x: torch.Tensor, conv: nn.Conv2d, world_size: int) -> torch.Tensor:
    """Single-process simulation of a row-parallel conv: split the input channels into ``world_size``
    slices, convolve each with its weight slice, sum the partials, add the bias once."""
    _validate_layer(conv)
    total = None
    for r in range(world_size):
        w = _chunk(conv.weight, 1, r, world_size)
        part = F.conv2d(_chunk(x, 1, r, world_size), w, None, conv.stride, conv.padding, conv.dilation)
        total = part if total is None else total + part
    if conv.bias is not None:
        total = total + conv.bias.view(1, -1, 1, 1)
    return total
