"""Tensor parallelism inside the capstone's transformer (Megatron-LM, Shoeybi et al. 2019), with or without
sequence parallelism (Korthikanti et al. 2022).

Each module here is built *from* the reference module of :mod:`labkit.capstone.model` (each rank copies its slice
with lab 03's :func:`~labkit.sliced.channels.shard_layer`), so it starts equal to it and tests can compare the two:

- :class:`TPBlock`: attention split by heads (the fused ``qkv`` layer column-parallel: each rank computes
  heads/t whole heads; ``proj`` row-parallel) and the MLP split column-then-row (``fc1`` keeps 1/t of the MLP's
  ``ffn_width`` units, ``fc2`` sums partial products). One all-reduce in the forward and one in the backward per
  half-block: Megatron's g after the row layer and f before the column layer.
- :class:`VocabEmbedding`: each rank holds 1/t of the vocabulary's rows; tokens outside it give zeros, and the
  partial embeddings are summed (all-reduce, or reduce-scatter along the sequence under sequence parallelism).
- the output layer is column-parallel over the vocabulary and feeds
  :func:`~labkit.capstone.comm.vocab_parallel_cross_entropy` without gathering the logits.

Under sequence parallelism (``sp=True``) the activations between the operators (LayerNorm, residual) are split
along the sequence, f/g become all-gather/reduce-scatter, and the LayerNorm weights and the position embedding
(now applied to 1/t of the positions on each rank) get partial gradients: :meth:`ParallelStage.sync_sp_grads`
sums them over the tensor-parallel group, as Megatron-LM does.

Under context parallelism (lab 12) a rank holds only some of each sequence's tokens: the stage is given their
``positions`` (the rows of the position table its embedding adds) and an ``attention`` function in place of
:func:`~labkit.capstone.model.attend`, one that brings the other ranks' keys and values to this rank's queries (lab
12's ring attention). Everything else in the block works token by token and needs no change.

:class:`ParallelStage` is one (pipeline stage, tensor-parallel rank)'s share of the whole model, and its
:attr:`~ParallelStage.spec` says where each local parameter sits in the full model, so that
:func:`assemble` can put a grid's shards back together for the comparison with one process.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import renamed_kwargs
from .._validate import ArgumentError
from ..sliced.channels import copy_to_ranks, reduce_from_ranks, shard_layer
from .comm import gather_seq, scatter_seq, vocab_parallel_cross_entropy
from .model import Config, TinyGPT, attend, stage_layers


def validate_tp(cfg: Config, tp: int, sp: bool = False, cp: int = 1) -> None:
    """A tensor-parallel degree must divide the heads, the MLP width and the vocabulary (and, with sequence
    parallelism, the sequence length, or under context parallelism the ``seq / cp`` tokens of each cp rank)."""
    ffn_width = cfg.resolved_ffn_width
    seq = cfg.seq // cp
    seq_name = "seq" if cp == 1 else f"seq / cp = {cfg.seq}/{cp}"
    for name, value in (("heads", cfg.heads), ("ffn_width", ffn_width), ("vocab", cfg.vocab)) + (
            ((seq_name, seq),) if sp else ()):
        if value % tp:
            ok = [d for d in range(1, value + 1) if value % d == 0 and cfg.heads % d == 0 and ffn_width % d == 0
                  and cfg.vocab % d == 0 and (not sp or seq % d == 0)]
            raise ArgumentError(f"tp={tp} does not divide the model's {name} ({value}): each tensor-parallel rank "
                                f"needs an equal share; pass tp in {ok}")


class _Region:
    """Entering and leaving a tensor-parallel region: Megatron's f and g, or their sequence-parallel forms."""

    def __init__(self, group, sp: bool, world_size: int):
        self.group, self.sp, self.world_size = group, sp, world_size

    def enter(self, x):
        if self.world_size == 1:  # nothing to say to oneself: no call, no bytes counted
            return x
        return gather_seq(x, self.group) if self.sp else copy_to_ranks(x, group=self.group)

    def leave(self, x):
        if self.world_size == 1:
            return x
        return scatter_seq(x, self.group) if self.sp else reduce_from_ranks(x, group=self.group)


@renamed_kwargs(world="world_size")
class TPBlock(nn.Module):
    """Tensor-parallel rank ``rank`` of ``world_size``'s share of the reference ``block`` (see the module docstring)."""

    def __init__(self, block: nn.Module, group, rank: int, world_size: int, sp: bool = False, attention=None):
        """``attention(qkv, heads)``: causal self-attention from the fused qkv output of this rank's heads,
        :func:`~labkit.capstone.model.attend` by default (context parallelism passes lab 12's ring attention)."""
        super().__init__()
        self.attention = attention or attend
        self.region = _Region(group, sp, world_size)
        self.world_size = world_size
        self.heads = block.heads // world_size
        self.ln1, self.ln2 = copy.deepcopy(block.ln1), copy.deepcopy(block.ln2)
        self.qkv = shard_layer(block.qkv, "column", rank, world_size)
        self.proj = shard_layer(block.proj, "row", rank, world_size)
        self.proj_bias = nn.Parameter(block.proj.bias.detach().clone())
        self.fc1 = shard_layer(block.fc1, "column", rank, world_size)
        self.fc2 = shard_layer(block.fc2, "row", rank, world_size)
        self.fc2_bias = nn.Parameter(block.fc2.bias.detach().clone())

    def forward(self, x):
        r = self.region
        a = self.proj(self.attention(self.qkv(r.enter(self.ln1(x))), self.heads))
        x = x + r.leave(a) + self.proj_bias
        h = self.fc2(F.gelu(self.fc1(r.enter(self.ln2(x)))))
        return x + r.leave(h) + self.fc2_bias

    # local name -> (name in the reference block, the dimension split over tp or None if replicated)
    SPEC = {"ln1.weight": ("ln1.weight", None), "ln1.bias": ("ln1.bias", None),
            "ln2.weight": ("ln2.weight", None), "ln2.bias": ("ln2.bias", None),
            "qkv.weight": ("qkv.weight", 0), "qkv.bias": ("qkv.bias", 0), "proj.weight": ("proj.weight", 1),
            "proj_bias": ("proj.bias", None), "fc1.weight": ("fc1.weight", 0), "fc1.bias": ("fc1.bias", 0),
            "fc2.weight": ("fc2.weight", 1), "fc2_bias": ("fc2.bias", None)}


@renamed_kwargs(world="world_size")
class VocabEmbedding(nn.Module):
    """Token embedding split over the vocabulary, plus the position embedding (replicated). ``positions``: the
    positions of the tokens this rank is given, under context parallelism (None: 0, 1, ..., as many as it gets)."""

    def __init__(self, tok: nn.Embedding, pos: nn.Parameter, group, rank: int, world_size: int, sp: bool = False,
                 positions: torch.Tensor | None = None):
        super().__init__()
        # a plain tensor, not a buffer: data parallelism broadcasts rank 0's buffers, and every cp rank has its own
        self.positions = None if positions is None else positions.detach().clone().long()
        v = tok.num_embeddings // world_size
        self.lo, self.rank, self.world_size = rank * v, rank, world_size
        self.region = _Region(group, sp, world_size)
        self.weight = nn.Parameter(tok.weight.detach()[self.lo:self.lo + v].clone())
        self.pos = nn.Parameter(pos.detach().clone())

    def forward(self, ids):
        local = ids - self.lo
        mine = (local >= 0) & (local < self.weight.shape[0])
        e = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine.unsqueeze(-1)
        e = self.region.leave(e)  # the sum of every rank's partial embedding (this rank's part of the sequence)
        s = e.shape[1]
        start = self.rank * s if self.region.sp else 0
        if self.positions is None:
            return e + self.pos[start:start + s]
        return e + self.pos[self.positions[start:start + s].to(e.device)]


@renamed_kwargs(world="world_size")
class ParallelStage(nn.Module):
    """Pipeline stage ``stage`` of ``pp`` of the reference ``model``, this tensor-parallel rank's share of it.

    Input: token ids (first stage) or the previous stage's activation. Output: the activation, or (last stage)
    this rank's vocabulary slice of the logits, for :meth:`loss`. ``positions`` and ``attention``: under context
    parallelism, the positions of this rank's tokens and the attention over the whole sequence (see the module
    docstring); the loss is then the mean over this rank's tokens."""

    def __init__(self, model: TinyGPT, stage: int, pp: int, group, rank: int, world_size: int, sp: bool = False,
                 positions: torch.Tensor | None = None, attention=None):
        super().__init__()
        cfg = model.cfg
        validate_tp(cfg, world_size, sp, 1 if positions is None else cfg.seq // len(positions))
        self.layers = stage_layers(cfg.layers, pp)[stage]
        self.first, self.last, self.sp, self.group = stage == 0, stage == pp - 1, sp, group
        self.tp = self.world_size = world_size
        self.embed = (VocabEmbedding(model.tok, model.pos, group, rank, world_size, sp, positions) if self.first
                      else None)
        self.blocks = nn.ModuleList(TPBlock(model.blocks[i], group, rank, world_size, sp, attention)
                                    for i in self.layers)
        if self.last:
            self.ln_f = copy.deepcopy(model.ln_f)
            self.head = shard_layer(model.head, "column", rank, world_size)
            self.region = _Region(group, sp, world_size)
            self.vocab_lo = rank * (cfg.vocab // world_size)
        self.spec = self._spec()

    def _spec(self) -> dict:
        spec = {}
        if self.first:
            spec["embed.weight"] = ("tok.weight", 0)
            spec["embed.pos"] = ("pos", None)
        for j, i in enumerate(self.layers):
            for local, (full, dim) in TPBlock.SPEC.items():
                spec[f"blocks.{j}.{local}"] = (f"blocks.{i}.{full}", dim)
        if self.last:
            spec.update({"ln_f.weight": ("ln_f.weight", None), "ln_f.bias": ("ln_f.bias", None),
                         "head.weight": ("head.weight", 0)})
        names = {n for n, _ in self.named_parameters()}
        if names != set(spec):
            raise RuntimeError(f"parameter map out of date: {sorted(names ^ set(spec))}")
        return spec

    def forward(self, x):
        if self.first:
            x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        if self.last:
            x = self.head(self.region.enter(self.ln_f(x)))
        return x

    def loss(self, logits, targets):
        if self.tp == 1:
            return unsplit_loss(logits, targets)
        return vocab_parallel_cross_entropy(logits, targets, self.vocab_lo, self.group)

    def sp_params(self) -> list:
        """The replicated parameters that see only 1/t of the sequence under sequence parallelism."""
        if not self.sp or self.tp == 1:
            return []
        return [p for n, p in self.named_parameters() if self.spec[n][1] is None]

    def sync_sp_grads(self) -> None:
        """Sum the partial gradients of :meth:`sp_params` over the tensor-parallel group (sequence parallelism)."""
        import torch.distributed as dist

        ps = [p for p in self.sp_params() if p.grad is not None]
        if not ps:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, group=self.group)
        off = 0
        for p in ps:
            p.grad.copy_(flat[off:off + p.numel()].view_as(p.grad))
            off += p.numel()

    def shards(self) -> dict:
        """``{full name: (dim, tensor)}`` of this rank's parameters, for :func:`assemble`."""
        return {self.spec[n][0]: (self.spec[n][1], p.detach().cpu().clone()) for n, p in self.named_parameters()}


def assemble(pieces: list[dict]) -> dict:
    """The full model's parameters from every (stage, tp rank)'s :meth:`ParallelStage.shards`, given in tp order
    within each stage: split parameters are concatenated along their dimension, replicated ones taken once."""
    parts: dict = {}
    for shard in pieces:
        for name, (dim, t) in shard.items():
            parts.setdefault(name, (dim, []))[1].append(t)
    return {name: (torch.cat(ts, dim=dim) if dim is not None else ts[0]) for name, (dim, ts) in parts.items()}


def unsplit_loss(logits, targets):
    """The loss the reference uses (for tests of the vocabulary-parallel loss)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
