"""The capstone's model and task, in one process: the reference every parallel run must equal.

**Task** (:func:`sort_batch`): a sequence of ``k`` random digits, a separator, then the same digits sorted;
the model learns next-token prediction on it. Generated from a seed, so nothing is downloaded and a batch is
the same on every rank and in every run.

**Model** (:class:`TinyGPT`): a decoder-only transformer (GPT-2's pre-LayerNorm block): token and learned
position embeddings, ``layers`` blocks of causal self-attention and a GELU MLP (``ffn_width`` wide, 4 × ``width``
by default), a final LayerNorm and an untied output layer. The attention's fused ``qkv`` layer lays its outputs out
head by head, ``(head, q/k/v, head_dim)``, as Megatron-LM does, so that a contiguous split of its outputs gives
whole heads (lab 11's tensor parallelism cuts it that way). Dropout is left out: the equivalence checks compare
runs to 1e-9.

:func:`stage_layers` cuts the blocks into pipeline stages; :func:`train_single` trains the whole model in this
process, with the loss and optimiser the grid uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import renamed_kwargs
from .._validate import ArgumentError, validate_int


# hidden: the old name of the MLP's width (the resolved one), a property, not an argument
@renamed_kwargs(ffn="ffn_width", hidden="resolved_ffn_width")
@dataclass(frozen=True)
class Config:
    """The model's shape. The defaults make every mesh of 2, 4 or 8 ranks valid: 8 layers, 8 heads, width 64,
    a vocabulary of 16 and 16 positions all divide by 8.

    ``ffn_width`` is the MLP's inner width as asked for: ``None`` means 4 × ``width``, and stays ``None``, so that
    ``dataclasses.replace(cfg, width=...)`` keeps meaning 4 × the new width; :attr:`resolved_ffn_width` is the
    number the layers are built with."""

    layers: int = 8
    width: int = 64
    heads: int = 8
    vocab: int = 16
    seq: int = 16          # positions the model sees: 2k for sequences of k digits
    ffn_width: int | None = None  # the MLP's inner width; None: 4 × width

    def __post_init__(self):
        for name in ("layers", "width", "heads", "vocab", "seq"):
            validate_int(name, getattr(self, name), minimum=1)
        if self.ffn_width is not None:
            validate_int("ffn_width", self.ffn_width, minimum=1)
        if self.width % self.heads:
            raise ArgumentError(f"width={self.width} does not split into heads={self.heads} equal heads: pass a width "
                                f"that is a multiple of {self.heads}")
        if self.vocab < 3:
            raise ArgumentError(f"vocab={self.vocab} leaves no digits: pass vocab >= 3 (digits 0..vocab-2, "
                                "then the separator)")

    @property
    def resolved_ffn_width(self) -> int:
        """The MLP's inner width the layers are built with: ``ffn_width``, or 4 × ``width`` when it is None."""
        return self.ffn_width or 4 * self.width

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def sort_batch(rows: int, cfg: Config = Config(), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, each ``rows × cfg.seq`` token ids: ``k = seq/2`` digits in ``0..vocab-2``, the
    separator ``vocab-1``, the digits sorted; targets are the inputs shifted by one."""
    rows = validate_int("rows", rows, minimum=1)
    if cfg.seq % 2:
        raise ArgumentError(f"seq={cfg.seq} must be even: k digits, a separator and k-1 sorted digits are "
                            "seen, the last sorted digit is only a target")
    k = cfg.seq // 2
    g = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, cfg.vocab - 1, (rows, k), generator=g)
    sep = torch.full((rows, 1), cfg.vocab - 1)
    seq = torch.cat([digits, sep, digits.sort(dim=1).values], dim=1)  # rows × (2k + 1)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def attend(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Causal self-attention from the fused ``qkv`` output (``B × S × heads·3·head_dim``, laid out head by
    head) to ``B × S × heads·head_dim``. The same code runs on all heads or on one rank's share of them."""
    b, s, _ = qkv.shape
    q, k, v = qkv.view(b, s, heads, 3, -1).permute(3, 0, 2, 1, 4)  # each B × heads × S × head_dim
    att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(s, s, dtype=torch.bool, device=qkv.device).triu(1)
    att = att.masked_fill(mask, float("-inf")).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(b, s, -1)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.fc1 = nn.Linear(cfg.width, cfg.resolved_ffn_width)
        self.fc2 = nn.Linear(cfg.resolved_ffn_width, cfg.width)

    def forward(self, x):
        x = x + self.proj(attend(self.qkv(self.ln1(x)), self.heads))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.seq, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def build(cfg: Config = Config(), seed: int = 0, dtype=torch.float64) -> TinyGPT:
    """The reference model, the same weights for a seed on every rank."""
    torch.manual_seed(seed)
    model = TinyGPT(cfg).to(dtype)
    with torch.no_grad():  # GPT-2's small initial weights keep the first steps stable
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "pos":
                p.normal_(0.0, 0.02)
    return model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position of every row."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def stage_layers(layers: int, pp: int) -> list[range]:
    """The blocks of each of ``pp`` pipeline stages, as equal as possible (earlier stages get the extra one;
    the first also holds the embeddings, the last the final LayerNorm and the output layer)."""
    layers, pp = validate_int("layers", layers, minimum=1), validate_int("pp", pp, minimum=1)
    if pp > layers:
        raise ArgumentError(f"pp={pp} pipeline stages for {layers} layers leaves a stage without a layer: pass "
                            f"pp <= {layers} (a divisor of {layers} balances the stages)")
    base, extra = divmod(layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (s < extra)
        out.append(range(start, start + n))
        start += n
    return out


def make_optimizer(params, lr: float = 3e-3):
    """The optimiser every run uses (Adam; its state is element-wise, so shards step exactly as the whole)."""
    return torch.optim.Adam(params, lr=lr)


def train_single(steps: int = 3, cfg: Config = Config(), batch: int = 16, seed: int = 0, lr: float = 3e-3,
                 dtype=torch.float64, after: bool = False) -> dict:
    """Train the whole model in this process: ``{"losses", "state", "model"}`` (the loss of each step, before its
    update, the final parameters by name, and the model). Each step trains on a fresh batch of ``batch`` random
    sequences, so consecutive losses are measured on different data. With ``after``, also ``"losses_after"``: the
    loss on each step's own batch just after its update (one more forward per step), which says whether the step
    helped on the data it saw."""
    steps = validate_int("steps", steps, minimum=1)
    model = build(cfg, seed, dtype)
    opt = make_optimizer(model.parameters(), lr)
    losses, losses_after = [], []
    for step in range(steps):
        x, y = sort_batch(batch, cfg, seed=seed * 1000 + step)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if after:
            with torch.no_grad():
                losses_after.append(lm_loss(model(x), y).item())
    out = {"losses": losses, "state": {k: v.detach().clone() for k, v in model.named_parameters()}, "model": model}
    if after:
        out["losses_after"] = losses_after
    return out


@torch.no_grad()
def sorted_accuracy(model: TinyGPT, rows: int = 256, seed: int = 10 ** 6) -> float:
    """The share of the sorted half's tokens the model predicts right, on fresh sequences (chance: 1/(vocab-1));
    the digits before the separator are random, so no model can predict them."""
    cfg = model.cfg
    x, y = sort_batch(rows, cfg, seed=seed)
    k = cfg.seq // 2
    pred = model(x).argmax(-1)
    return float((pred[:, k:] == y[:, k:]).double().mean())
