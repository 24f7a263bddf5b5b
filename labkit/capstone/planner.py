"""Lab 11's planner: for a large model and a cluster, which data × pipeline × tensor grid (dp, pp, tp) to use.

Pure arithmetic (no torch), fast enough to try every grid of a few thousand GPUs. :func:`plan` scores each
(dp, pp, tp) with dp·pp·tp = gpus; :func:`rule_out` gives the reasons one grid cannot be used; :func:`table`
prints the ranking. What each grid is scored on, per GPU, for one optimiser step:

**Memory** (the busiest GPU: the first pipeline stage, which holds the most micro-batches under 1F1B and the
embedding): lab 09's formulas from :mod:`labkit.memory_model`. Its parameter share is
(params - E)/(tp·pp) + E/tp, E = (vocab + positions)·width, the embedding tables that Megatron-LM places on the
first stage and splits over tp; weights, gradients and optimiser state are :func:`~labkit.memory_model.
zero_bytes_each_rank` of that share (ZeRO stage 0 or 1 over dp). Activations are
:func:`~labkit.memory_model.transformer_activations` of one stage's layers (tp, sequence parallel, recompute,
flash) times :func:`~labkit.memory_model.pipeline_in_flight` (1F1B, stage 0: min(pp, m) micro-batches); with
full recomputation, one layer's activations rebuilt for its backward come on top (``working``). A share
``headroom`` of the card is kept free for what the formulas leave out: the CUDA context, NCCL's buffers, the
allocator's fragmentation, the optimiser's fp32 temporaries (Megatron-LM keeps 18-20 bytes per parameter where
the ZeRO count used here says 16).

**Communication**, bytes each GPU sends per step (ring algorithms: every GPU sends the same amount):

- tensor parallel (Shoeybi et al. 2019, section 3; Narayanan et al. 2021, arXiv 2104.04473, section 3.2):
  per layer and micro-batch, 2 all-reduces in the forward and 2 in the backward of the b·s·h activations,
  each sending 2(tp-1)/tp of them; full recomputation repeats the forward's 2. Per step:
  (layers/pp)·m·n_ar·b·s·h·B·2(tp-1)/tp, n_ar = 4 (6 with full recompute), B bytes per value. Under sequence
  parallelism each all-reduce becomes an all-gather plus a reduce-scatter: the same bytes.
- pipeline parallel (Narayanan et al. 2021, section 2.2): per micro-batch, a stage sends its output b·s·h
  forward and the gradient of its input b·s·h backward; a middle stage does both, 2·m·b·s·h·B per step (one
  direction when pp = 2). Megatron-LM's scatter/gather trick (section 4.1), sending b·s·h/tp, is not modelled.
- data parallel (the Ultra-Scale Playbook, Hugging Face 2025, "Data parallelism"; ZeRO stage 1 moves the same
  volume): one ring all-reduce of the GPU's gradients per step, 2(dp-1)/dp · grad bytes.

Seconds = bytes / bandwidth, no latency term. The ranks are laid out as Megatron-LM does and
:mod:`labkit.runtime.mesh` draws (tp innermost, then pp, then dp: rank (d·pp + p)·tp + t): a group uses the
intra-node bandwidth when every group of its kind lies in one node, the inter-node bandwidth (per GPU: one NIC
each, as on a DGX A100) otherwise.

**Time**: compute = k·params·tokens / (gpus·peak·mfu), tokens = global_batch·seq, k = 6 (forward 2 + backward 4
FLOPs per parameter and token) or 8 with full recomputation (the forward runs twice; Narayanan et al. 2021,
section 5.1, count the same). The pipeline adds its bubble, (pp-1)/(m+pp-1) of the time with
m = global_batch/(dp·micro_batch) micro-batches (section 2.2.1): step = compute·(m+pp-1)/m + tp + pp seconds +
dp seconds. Tensor-parallel all-reduces sit between dependent matrix products and pipeline sends on the
critical path, so neither is overlapped; the data-parallel all-reduce runs after the pipeline flush, as in
Megatron-LM 2021, unless ``overlap_dp=True`` (then it is assumed hidden behind the backward).

This is the estimate a student can redo by hand. :func:`labkit.capstone.ranking.rank_layouts` asks the same
question of the step-time simulator (latency, the schedule played, ZeRO stages, interleaving, recomputation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .._compat import renamed_kwargs
from .._validate import ArgumentError, validate_choice, validate_int, validate_number
from ..memory_model import (
    GB,
    OPTIMIZERS,
    PRECISIONS,
    RECOMPUTE,
    bytes_per_parameter,
    pipeline_in_flight,
    transformer_activations,
    transformer_params,
    zero_bytes_each_rank,
)
from ..runtime.mesh import rank_of, validate_shape
from ..viz import format_table
from .ranking import grids

__all__ = ["Model", "Cluster", "Candidate", "plan", "rule_out", "evaluate", "table"]


def _check_bool(name, value, hint=""):
    if not isinstance(value, bool):
        raise ArgumentError(f"{name} must be True or False, got {value!r}" + (f"; {hint}" if hint else ""))
    return value


@renamed_kwargs(hidden="width", ffn="ffn_width")
@dataclass(frozen=True)
class Model:
    """A GPT-style transformer and how it is trained. ``params`` defaults to
    :func:`~labkit.memory_model.transformer_params` (``positions`` learned position embeddings, ``tied`` output
    head, ``ffn_width`` the MLP's inner width, 4 × ``width`` when left out); ``micro_batch`` and ``global_batch``
    count sequences of ``seq`` tokens; ``zero`` is the ZeRO stage over dp (0 or 1); ``sp`` turns on sequence
    parallelism when tp > 1."""

    layers: int
    width: int
    heads: int
    seq: int
    vocab: int
    global_batch: int
    micro_batch: int = 1
    ffn_width: int | None = None
    params: int | None = None
    positions: int = 0
    tied: bool = True
    precision: str = "mixed-bf16"
    optimizer: str = "adam"
    recompute: str = "none"
    flash: bool = False
    sp: bool = False
    zero: int = 0

    def __post_init__(self):
        for name in ("layers", "width", "heads", "seq", "vocab", "global_batch", "micro_batch"):
            validate_int(name, getattr(self, name), minimum=1)
        if self.width % self.heads:
            raise ArgumentError(f"heads must divide width={self.width}, got heads={self.heads}; pick one of "
                                f"{_divisors(self.width, 128)[-6:]}, say")
        if self.micro_batch > self.global_batch:
            raise ArgumentError(f"micro_batch must be <= global_batch={self.global_batch}, got "
                                f"{self.micro_batch}; pass a micro_batch that divides the global batch")
        if self.ffn_width is None:
            object.__setattr__(self, "ffn_width", 4 * self.width)
        validate_int("ffn_width", self.ffn_width, minimum=1, hint="the MLP's inner width (4·width by default)")
        validate_int("positions", self.positions, minimum=0, hint="learned position embeddings (0: none, e.g. rotary)")
        for name in ("tied", "flash", "sp"):
            _check_bool(name, getattr(self, name))
        validate_choice("precision", self.precision, PRECISIONS)
        validate_choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        validate_choice("recompute", self.recompute, RECOMPUTE)
        validate_int("zero", self.zero, minimum=0, maximum=1,
                  hint="the planner models ZeRO stage 0 (none) or 1 (optimiser state sharded over dp)")
        if self.params is None:
            object.__setattr__(self, "params", transformer_params(self.layers, self.width, self.vocab,
                                                                  self.ffn_width, self.tied, self.positions))
        validate_int("params", self.params, minimum=1, hint="leave it out to count it from the shape")

    @property
    def embedding(self) -> int:
        """Parameters of the embedding tables (tokens and learned positions), placed on the first stage."""
        return min(self.params, (self.vocab + self.positions) * self.width)

    @property
    def bytes_per_value(self) -> int:
        """Bytes of one activation value: 4 in fp32, 2 otherwise (as lab 09's calculator counts)."""
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class Cluster:
    """A cluster of ``gpus`` GPUs in nodes of ``gpus_per_node``: each GPU's memory, its links inside and between
    nodes, its arithmetic speed, and the share of its memory the plan leaves free. Memory is in GB of 10⁹ bytes,
    the unit of the estimate: an "80 GB" A100 holds 80 GiB = 85.9 GB, so 80 leaves that 7% as extra margin."""

    gpus: int
    gpus_per_node: int = 8           # GPUs joined by NVLink inside one node
    gpu_memory_gb: float = 80.0      # each GPU's memory, GB
    intra_node_GBps: float = 300.0   # GB/s a GPU sends to another of its node (NVLink)
    inter_node_GBps: float = 25.0    # GB/s a GPU sends to another node (its own network card)
    peak_tflops: float = 312.0       # peak 16-bit matrix arithmetic, TFLOP/s
    mfu: float = 0.5                 # the share of that peak the matrix products reach
    headroom: float = 0.1            # the share of memory not planned on (CUDA context, NCCL, fragmentation)

    def __post_init__(self):
        validate_int("gpus", self.gpus, minimum=1)
        validate_int("gpus_per_node", self.gpus_per_node, minimum=1)
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ArgumentError(f"gpus must fill whole nodes of gpus_per_node={self.gpus_per_node}, got "
                                f"gpus={self.gpus}; pass a multiple of {self.gpus_per_node}")
        for name in ("gpu_memory_gb", "intra_node_GBps", "inter_node_GBps", "peak_tflops"):
            validate_number(name, getattr(self, name), minimum=0, open_low=True)
        validate_number("mfu", self.mfu, minimum=0, maximum=1, open_low=True,
                     hint="the share of peak the matrix products reach, e.g. 0.5")
        validate_number("headroom", self.headroom, minimum=0, maximum=1, open_high=True,
                     hint="the share of each GPU's memory kept free, e.g. 0.1")

    @property
    def usable_gb(self) -> float:
        return self.gpu_memory_gb * (1 - self.headroom)


@renamed_kwargs(micro_batches="n_micro")
@dataclass
class Candidate:
    """One (dp, pp, tp) grid, scored: memory per GPU in GB (``memory``: the breakdown), bytes each GPU sends and
    their seconds per group (``comm_bytes``, ``comm_seconds``, over the ``links`` "intra"/"inter"), the
    ``n_micro`` micro-batches m per replica, the pipeline ``bubble``, ``compute_seconds`` and ``step_seconds``.
    ``reasons``: why the grid cannot be used (empty when it can). Figures that cannot be computed are NaN."""

    dp: int
    pp: int
    tp: int
    n_micro: int = 0
    memory_gb: float = math.nan
    memory: dict = field(default_factory=dict)
    comm_bytes: dict = field(default_factory=dict)
    comm_seconds: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)
    bubble: float = math.nan
    compute_seconds: float = math.nan
    step_seconds: float = math.nan
    reasons: list = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.reasons

    def as_row(self) -> dict:
        return {"dp": self.dp, "pp": self.pp, "tp": self.tp, "memory GB": self.memory_gb, "m": self.n_micro,
                "bubble": self.bubble, **{f"{k} comm s": self.comm_seconds.get(k, math.nan) for k in
                                          ("tp", "pp", "dp")},
                "step s": self.step_seconds, "verdict": "ok" if self.feasible else self.reasons[0]}


def _in_one_node(dim: str, dp: int, pp: int, tp: int, per_node: int) -> bool:
    """Whether every group of ``dim`` lies inside one node, ranks placed as :func:`labkit.runtime.mesh.rank_of`.
    A group's ranks grow along it, so comparing its first and last member's node suffices; the pattern repeats
    every lcm(block, node) ranks, so only the groups starting in that span are checked."""
    size = {"dp": dp, "pp": pp, "tp": tp}[dim]
    gpus = dp * pp * tp
    if size == 1 or gpus <= per_node:
        return True
    block = {"tp": tp, "pp": pp * tp, "dp": gpus}[dim]
    span = min(gpus, math.lcm(block, per_node))
    for start in range(span):
        d, p, t = start // (pp * tp), (start // tp) % pp, start % tp
        if {"dp": d, "pp": p, "tp": t}[dim]:
            continue
        last = rank_of(dp - 1 if dim == "dp" else d, pp - 1 if dim == "pp" else p, tp - 1 if dim == "tp" else t,
                       pp, tp)
        if start // per_node != last // per_node:
            return False
    return True


def _divisors(n: int, limit: int) -> list:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def evaluate(dp: int, pp: int, tp: int, model: Model, cluster: Cluster, max_bubble: float = 0.25,
             overlap_dp: bool = False) -> Candidate:
    """Score one grid (see the module docstring); refuse one whose dp·pp·tp is not ``cluster.gpus``."""
    if not isinstance(model, Model):
        raise ArgumentError(f"model must be a planner.Model, got {type(model).__name__}; build one with "
                            "Model(layers=, width=, heads=, seq=, vocab=, global_batch=)")
    if not isinstance(cluster, Cluster):
        raise ArgumentError(f"cluster must be a planner.Cluster, got {type(cluster).__name__}; build one with "
                            "Cluster(gpus=, ...)")
    dp, pp, tp = validate_shape(cluster.gpus, dp, pp, tp)
    max_bubble = validate_number("max_bubble", max_bubble, minimum=0, maximum=1, hint="e.g. 0.25")
    _check_bool("overlap_dp", overlap_dp)
    c, M, node = Candidate(dp, pp, tp), model, cluster.gpus_per_node
    why = c.reasons
    if not _in_one_node("tp", dp, pp, tp, node):
        where = f"tp={tp} > {node} GPUs per node" if tp > node else \
            f"tp={tp} does not divide the {node} GPUs per node, so some tp groups straddle two nodes"
        why.append(f"tensor parallel across nodes: {where}, and its all-reduces in every layer would run over the "
                   f"{cluster.inter_node_GBps:g} GB/s network instead of {cluster.intra_node_GBps:g} GB/s")
    bad = [f"{n}={v}" for n, v in (("heads", M.heads), ("width", M.width), ("ffn_width", M.ffn_width)) if v % tp]
    if bad:
        why.append(f"tp={tp} does not divide {' and '.join(bad)}: tensor parallelism splits the heads and the "
                   f"matrix widths evenly; tp can be one of {_divisors(math.gcd(M.heads, M.width, M.ffn_width), node)}")
    if pp > M.layers:
        why.append(f"pp={pp} > layers={M.layers}: every pipeline stage needs at least one layer")
    elif M.layers % pp:
        why.append(f"pp={pp} does not divide layers={M.layers} ({M.layers / pp:.3g} layers a stage): Megatron-LM "
                   "gives every stage the same number of layers")
    share = dp * M.micro_batch
    if M.global_batch % share:
        why.append(f"global_batch={M.global_batch} does not split into dp={dp} replicas × micro_batch="
                   f"{M.micro_batch} ({M.global_batch / share:.3g} micro-batches each): pick a dp that divides "
                   f"global_batch/micro_batch")
    m = c.n_micro = M.global_batch // share
    if bad or pp > M.layers or m == 0:
        return c
    bpv, bsh = M.bytes_per_value, M.micro_batch * M.seq * M.width * M.bytes_per_value
    stage_layers = math.ceil(M.layers / pp)
    # memory of the first stage
    share_params = round((M.params - M.embedding) / (tp * pp) + M.embedding / tp)
    states = zero_bytes_each_rank(share_params, dp, M.zero, M.precision, M.optimizer)
    sp = M.sp and tp > 1
    kw = dict(seq=M.seq, micro_batch=M.micro_batch, width=M.width, heads=M.heads, tp=tp, sp=sp, flash=M.flash,
              bytes_per_value=bpv)
    flight = pipeline_in_flight("1f1b", 0, pp, m)
    acts = transformer_activations(layers=stage_layers, recompute=M.recompute, **kw) * flight
    working = transformer_activations(layers=1, recompute="none", **kw) if M.recompute == "full" else 0.0
    c.memory = {k: states[k] / GB for k in ("weights", "grads", "optimizer")}
    c.memory.update(activations=acts / GB, working=working / GB, params_per_gpu=share_params, in_flight=flight)
    c.memory_gb = (states["total"] + acts + working) / GB
    # communication per step, bytes each GPU sends
    n_ar = 6 if M.recompute == "full" else 4
    grads = share_params * bytes_per_parameter(M.precision, M.optimizer)["grads"]
    c.comm_bytes = {"tp": stage_layers * m * n_ar * bsh * 2 * (tp - 1) / tp,
                    "pp": min(2, pp - 1) * m * bsh,
                    "dp": 2 * (dp - 1) / dp * grads}
    for dim, nbytes in c.comm_bytes.items():
        inside = _in_one_node(dim, dp, pp, tp, node)
        c.links[dim] = "intra" if inside else "inter"
        c.comm_seconds[dim] = nbytes / ((cluster.intra_node_GBps if inside else cluster.inter_node_GBps) * 1e9)
    # time
    flops = (8 if M.recompute == "full" else 6) * M.params * M.global_batch * M.seq
    c.compute_seconds = flops / (cluster.gpus * cluster.peak_tflops * 1e12 * cluster.mfu)
    c.bubble = (pp - 1) / (m + pp - 1)
    c.step_seconds = (c.compute_seconds / (1 - c.bubble) + c.comm_seconds["tp"] + c.comm_seconds["pp"]
                      + (0.0 if overlap_dp else c.comm_seconds["dp"]))
    if c.memory_gb > cluster.usable_gb:
        why.append(f"does not fit: needs {c.memory_gb:.1f} GB per GPU of the {cluster.usable_gb:.1f} GB usable "
                   f"({cluster.gpu_memory_gb:g} GB less {cluster.headroom:.0%} headroom): {states['total'] / GB:.1f} "
                   f"GB of weights, gradients and optimiser state "
                   f"for {share_params / 1e9:.3g}B parameters, {(acts + working) / GB:.1f} GB of activations")
    if c.bubble > max_bubble:
        why.append(f"pipeline bubble {c.bubble:.0%} > max_bubble {max_bubble:.0%}: (pp-1)/(m+pp-1) with pp={pp} "
                   f"and m={m} micro-batches; use fewer stages or more micro-batches")
    return c


def rule_out(dp: int, pp: int, tp: int, model: Model, cluster: Cluster, max_bubble: float = 0.25) -> list[str]:
    """The reasons grid (dp, pp, tp) cannot train ``model`` on ``cluster``, one sentence each with its numbers
    (an empty list: it can). A grid whose dp·pp·tp is not ``cluster.gpus`` raises ArgumentError."""
    return list(evaluate(dp, pp, tp, model, cluster, max_bubble=max_bubble).reasons)


def plan(model: Model, cluster: Cluster, max_bubble: float = 0.25, overlap_dp: bool = False) -> list[Candidate]:
    """Every grid dp·pp·tp = ``cluster.gpus`` scored by :func:`evaluate`: the feasible ones first, fastest
    estimated step first, then the ruled-out ones (fewest reasons, then fastest)."""
    n = cluster.gpus if isinstance(cluster, Cluster) else None
    if n is None:
        raise ArgumentError(f"cluster must be a planner.Cluster, got {type(cluster).__name__}; build one with "
                            "Cluster(gpus=, ...)")
    out = [evaluate(d, p, t, model, cluster, max_bubble, overlap_dp) for d, t, p in grids(n)]

    def key(c):
        step = c.step_seconds if math.isfinite(c.step_seconds) else math.inf
        return (not c.feasible, len(c.reasons), step, c.tp, c.pp)
    return sorted(out, key=key)


def table(candidates: list[Candidate], top: int = 10) -> str:
    """The first ``top`` candidates as a plain-text table (:func:`labkit.viz.format_table`); the verdict column
    shows "ok" or the first reason."""
    if not isinstance(candidates, (list, tuple)) or not all(isinstance(c, Candidate) for c in candidates):
        raise ArgumentError(f"candidates must be a list of Candidate, got {type(candidates).__name__}; pass "
                            "what plan(model, cluster) returns")
    top = validate_int("top", top, minimum=1, hint="the number of rows to show")
    return format_table([c.as_row() for c in candidates[:top]], floatfmt="{:.3g}")


def megatron_145b() -> tuple[Model, Cluster, tuple[int, int]]:
    """Narayanan et al. 2021 (arXiv 2104.04473), Table 1: the 145.6B GPT (80 layers, width 12,288, 96 heads,
    sequence 2,048, vocabulary 51,200, global batch 2,304) on 1,536 A100 80 GB GPUs, 8 per node, trained in mixed
    precision with full recomputation, with tp = 8 and pp = 8. Returns ``(model, cluster, (tp, pp))``."""
    model = Model(layers=80, width=12288, heads=96, seq=2048, vocab=51200, positions=2048, global_batch=2304,
                  micro_batch=1, precision="mixed-fp16", optimizer="adam", recompute="full")
    cluster = Cluster(gpus=1536, gpus_per_node=8, gpu_memory_gb=80.0, intra_node_GBps=300.0, inter_node_GBps=25.0,
                      peak_tflops=312.0, mfu=0.5)
    return model, cluster, (8, 8)


def megatron_check() -> tuple[bool, str]:
    """Does the planner's first choice for :func:`megatron_145b` use the published (tp, pp)? ``(ok, detail)``."""
    model, cluster, (tp, pp) = megatron_145b()
    cands = plan(model, cluster)
    best = next((c for c in cands if c.feasible), None)
    if best is None:
        return False, "the planner found no feasible grid for the 145.6B model"
    ok = (best.tp, best.pp) == (tp, pp)
    return ok, (f"145.6B on 1536 A100s: planner's first choice dp={best.dp} pp={best.pp} tp={best.tp} "
                f"({best.memory_gb:.1f} GB per GPU, {best.step_seconds:.1f} s per step); published tp={tp} pp={pp} "
                "(Narayanan et al. 2021, Table 1)")
