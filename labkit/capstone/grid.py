"""The whole grid: train the capstone's transformer on dp × pp × tp ranks (× cp, lab 12) and compare it with one
process.

On every rank (:func:`train_rank`): ``ctx.mesh(dp=, pp=, tp=)`` gives its coordinates and groups; it builds its
share of the model (:class:`~labkit.capstone.tp.ParallelStage`: pipeline stage = its pp coordinate, tensor-parallel
rank = its tp coordinate) and then, each step,

1. takes its data-parallel replica's rows of the global batch (the same batch one process would use);
2. runs one 1F1B step of lab 04's executor (:func:`~labkit.pipeline.executor.pipeline_rank`) over the pp group,
   with the stage's tensor-parallel collectives inside each forward and backward;
3. under sequence parallelism, sums the partial LayerNorm and position gradients over the tp group;
4. averages gradients over the dp group with lab 02's :class:`~labkit.ddp.BucketedDDP` (one flat all-reduce per
   bucket);
5. takes an Adam step on its shard.

**Context parallelism** (``cp > 1``, lab 12): each sequence's tokens are split over the cp group as well, the
stage adds the positions of this rank's tokens and its attention is ``cp_attention`` (lab 12's ring attention,
:class:`labkit.context_expert.cp_grid.RingAttention`: lab 11 has no attention that crosses ranks, so it is passed
in). Each rank's loss is the mean over its own tokens, and the gradients are averaged over the combined dp × cp
group (``mesh.group("dp_cp")``), as Megatron-LM does: the cp ranks hold the same weights and, with equal token
counts, the mean of their means is the whole batch's mean. Ring attention's backward already carries each query's
gradient to the rank that holds its keys, so nothing else is summed over cp.

A :class:`~labkit.capstone.comm.CommMeter` counts every byte each group carries, and the executor's timeline
gives the pipeline's bubble. :func:`run_grid` launches it and puts the shards back together (:func:`assemble`),
:meth:`GridRun.compare` measures the distance to :func:`~labkit.capstone.model.train_single`.
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, field

import torch

from .._compat import moved_names
from .._validate import ArgumentError, validate_int
from ..devices import now
from ..runtime.mesh import validate_shape
from .comm import CommMeter, wire_bytes
from .model import Config, build, make_optimizer, sort_batch, stage_layers
from .tp import ParallelStage, assemble, validate_tp


def choose_n_micro(batch: int, dp: int, n_micro: int | None = None) -> int:
    """How many micro-batches each replica cuts its ``batch / dp`` rows into: ``n_micro`` checked, or by default
    the largest of 4, 2, 1 that divides the replica's rows."""
    batch, dp = validate_int("batch", batch, minimum=1), validate_int("dp", dp, minimum=1)
    if batch % dp:
        ok = [d for d in range(1, batch + 1) if batch % d == 0]
        raise ArgumentError(f"batch={batch} rows do not split evenly over dp={dp} replicas: pass a batch that is a "
                            f"multiple of {dp}, or dp in {ok}")
    rows = batch // dp
    if n_micro is None:
        return next(m for m in (4, 2, 1) if rows % m == 0)
    n_micro = validate_int("n_micro", n_micro, minimum=1)
    if rows % n_micro:
        ok = [m for m in range(1, rows + 1) if rows % m == 0]
        raise ArgumentError(f"n_micro={n_micro} micro-batches do not divide the {rows} rows of each replica "
                            f"(batch={batch} / dp={dp}): pass n_micro in {ok}")
    return n_micro


def validate_grid(dp: int, pp: int, tp: int, cfg: Config = Config(), sp: bool = False, batch: int = 16,
               n_micro: int | None = None, cp: int = 1, cp_attention=None) -> int:
    """Every bad-input check, before any process starts; returns ``n_micro``, the micro-batches per replica."""
    cp = validate_int("cp", cp, minimum=1)
    dp, pp, tp = validate_shape(validate_int("dp", dp, minimum=1) * validate_int("pp", pp, minimum=1)
                                * validate_int("tp", tp, minimum=1) * cp, dp, pp, tp, cp)
    if cp > 1:
        if cp_attention is None:
            raise ArgumentError(f"cp={cp} splits each sequence over {cp} ranks, and then attention needs the other "
                                "ranks' keys, which lab 11's attend cannot reach: pass cp_attention="
                                "labkit.context_expert.cp_grid.RingAttention() (lab 12's ring attention), or cp=1")
        if cfg.seq % cp:
            ok = [d for d in range(1, cfg.seq + 1) if cfg.seq % d == 0]
            raise ArgumentError(f"cp={cp} does not divide the model's seq ({cfg.seq}): each context-parallel rank "
                                f"needs an equal share of the tokens; pass cp in {ok}")
        cp_attention.positions(cfg.seq, cp, 0)  # the layout's own condition (zigzag: 2·cp equal chunks)
    validate_tp(cfg, tp, sp, cp)
    stage_layers(cfg.layers, pp)
    return choose_n_micro(batch, dp, n_micro)


def train_rank(ctx, dp: int = 1, pp: int = 1, tp: int = 1, sp: bool = False, steps: int = 3, batch: int = 16,
               n_micro: int | None = None, cfg: Config = Config(), seed: int = 0, lr: float = 3e-3,
               dtype=torch.float64, cp: int = 1, cp_attention=None) -> dict:
    """One rank of the grid (see the module docstring). Returns its losses (last stage), step times, busy times,
    bytes per group and op, ``activations`` (per step, the most bytes of activations autograd held for the
    backward at once: lab 04's executor counts what it saves, parameters left out) and, on dp rank 0 (and cp rank
    0), its parameter shards.

    ``cp``, ``cp_attention``: context parallelism (the module docstring): ``cp_attention.positions(seq, cp, rank)``
    gives the positions of a cp rank's tokens, ``cp_attention(qkv, heads, group)`` the attention of this rank's
    tokens over the whole sequence, the sequence split over ``group``."""
    from ..ddp import BucketedDDP
    from ..pipeline.executor import pipeline_rank

    n_micro = validate_grid(dp, pp, tp, cfg, sp, batch, n_micro, cp, cp_attention)
    # this rank's place on the grid: its (dp, pp, cp, tp) coordinates and one process group per dimension
    mesh = ctx.mesh(dp=dp, pp=pp, tp=tp, cp=cp)
    c = mesh.coords
    # under context parallelism, the positions of this rank's tokens, and attention across the cp group
    positions = cp_attention.positions(cfg.seq, cp, c["cp"]) if cp > 1 else None
    attention = functools.partial(cp_attention, group=mesh.group("cp")) if cp > 1 else None
    # every rank builds the whole reference model from the same seed, then keeps only its share: the layers of
    # pipeline stage c["pp"], and within them the heads, MLP columns and vocabulary rows of tp rank c["tp"]
    stage = ParallelStage(build(cfg, seed, dtype), c["pp"], pp, mesh.group("tp"), c["tp"], tp, sp, positions,
                          attention).to(ctx.device)
    # the dp (× cp) replicas of this share average their gradients through lab 02's BucketedDDP (no initial
    # broadcast: the seed already made the replicas equal); with dp = cp = 1 there is nobody to average with
    replicas = dp * cp
    module = BucketedDDP(stage, group=mesh.group("dp_cp"), broadcast=False) if replicas > 1 else stage
    # Adam on the local shard only: its state is element-wise, so shards step exactly as the whole model would
    opt = make_optimizer(stage.parameters(), lr)
    rows = batch // dp
    # counts every collective and send by group from here on (the bytes traffic.predict must match)
    groups = {"dp": mesh.group("dp"), "pp": mesh.group("pp"), "tp": mesh.group("tp")}
    if cp > 1:  # the ring's sends, and the gradients' all-reduce over dp × cp
        groups.update(cp=mesh.group("cp"), dp_cp=mesh.group("dp_cp"))
    meter = CommMeter(groups)
    out = {"coords": c, "losses": [], "times": [], "busy": [], "spans": [], "activations": []}
    for step in range(steps):
        # the same global batch one process trains on at this step (same seed), then this replica's rows of it
        x, y = sort_batch(batch, cfg, seed=seed * 1000 + step)
        x, y = x[c["dp"] * rows:(c["dp"] + 1) * rows], y[c["dp"] * rows:(c["dp"] + 1) * rows]
        if positions is not None:  # and, under context parallelism, this rank's tokens of each row
            x, y = x[:, positions], y[:, positions]
        t0 = now(ctx.device)  # the step's span, synchronised at both ends: on a GPU it ends when its work has run
        with meter:
            # forward and backward of n_micro micro-batches through lab 04's executor, 1F1B over the pp group:
            # activations go to the next stage, their gradients come back. Inside each stage's forward and
            # backward the tp collectives run (Megatron's f and g, or all-gather/reduce-scatter under sp, and
            # the vocabulary-parallel loss on the last stage), and under cp the ring's sends. It zeroes the
            # gradients first, and leaves each parameter's gradient summed over the micro-batches, weighted so
            # that it is the gradient of the replica's mean loss
            run = pipeline_rank(ctx, None, (x, y), n_micro, "1f1b", loss_fn=stage.loss, repeats=1, warmup=0,
                                group=mesh.group("pp"), stages={0: module})
            # under sequence parallelism the LayerNorms, biases and position table saw 1/t of the sequence on
            # each tp rank: sum their partial gradients over the tp group (a no-op without sp)
            stage.sync_sp_grads()
            if replicas > 1:
                # average the gradients over the dp (× cp) replicas: one flat all-reduce per bucket. The
                # replicas' rows (and tokens) make up the global batch, so their mean gradient is the whole
                # batch's gradient
                module.sync_grads()
        # the update: every rank now holds its shard of exactly the gradient one process computes, so after
        # this step its shard equals that slice of the one-process model (GridRun.compare checks it to 1e-9)
        opt.step()
        out["times"].append((t0, now(ctx.device)))
        out["spans"].append(run["times"][0])  # the executor's step span and busy time give the pipeline's bubble
        out["busy"].append(run["busy"][0])
        out["activations"].append(max(m[2] for m in run["memory"]))  # (time, micro-batches held, bytes saved)
        if run["loss"] is not None:  # only the last stage computes the loss
            out["losses"].append(run["loss"])
    out["bytes"] = {f"{g}/{op}": v["bytes"] / steps for g, ops in meter.by_group().items() for op, v in ops.items()}
    out["calls"] = {f"{g}/{op}": v["calls"] / steps for g, ops in meter.by_group().items() for op, v in ops.items()}
    out["params"] = stage.shards() if c["dp"] == 0 and c["cp"] == 0 else None
    return out


@dataclass
class GridRun:
    """What :func:`run_grid` measured. ``bytes[group][op]``: payload per rank per step, averaged over the
    group's ranks; ``wire``: the same on the wire (ring algorithms); seconds are medians over steps."""

    dp: int
    pp: int
    tp: int
    sp: bool
    n_micro: int
    losses: list
    params: dict
    bytes: dict
    calls: dict
    step_seconds: float
    bubble: float
    per_rank: list = field(repr=False, default_factory=list)
    #: per rank, the most bytes of activations autograd held for the backward at once during a step (the median
    #: over steps; parameters not counted): the activation memory a rank needs
    activations: list = field(repr=False, default_factory=list)
    #: context-parallel ranks (lab 12); 1: lab 11's grid
    cp: int = 1

    @property
    def shape(self) -> str:
        """``"dp×pp×tp"``, then " sp" under sequence parallelism and " cp2" (say) under context parallelism."""
        return f"{self.dp}×{self.pp}×{self.tp}" + (" sp" if self.sp else "") + (f" cp{self.cp}" if self.cp > 1 else "")

    @property
    def wire(self) -> dict:
        sizes = {"dp": self.dp, "pp": self.pp, "tp": self.tp, "cp": self.cp, "dp_cp": self.dp * self.cp}
        return {g: sum(wire_bytes(op, b, sizes.get(g, 1)) for op, b in ops.items()) for g, ops in self.bytes.items()}

    @property
    def bubble_theory(self) -> float:
        """(p - 1) / (m + p - 1): the idle fraction of 1F1B with equal stages (GPipe paper; Narayanan et al.)."""
        return (self.pp - 1) / (self.n_micro + self.pp - 1)

    def compare(self, single: dict) -> dict:
        """Largest differences from :func:`~labkit.capstone.model.train_single`: ``loss`` (absolute) and
        ``params`` (relative to the largest value of each tensor)."""
        loss = max(abs(a - b) for a, b in zip(self.losses, single["losses"], strict=True))
        if set(self.params) != set(single["state"]):
            raise ValueError(f"parameters differ: {sorted(set(self.params) ^ set(single['state']))}")
        rel = max(float((self.params[k] - v).abs().max() / v.abs().max().clamp_min(1e-300))
                  for k, v in single["state"].items())
        return {"loss": loss, "params": rel}


def run_grid(dp: int = 2, pp: int = 2, tp: int = 2, sp: bool = False, steps: int = 3, batch: int = 16,
             n_micro: int | None = None, cfg: Config = Config(), seed: int = 0, lr: float = 3e-3,
             timeout: float = 300, pool: bool = True, backend: str = "auto", cp: int = 1,
             cp_attention=None) -> GridRun:
    """Train on a dp × pp × tp grid of ``dp·pp·tp`` ranks (gloo on CPU) and return a :class:`GridRun`; with
    ``cp > 1`` each sequence is also split over cp ranks (``dp·pp·cp·tp`` ranks), attention by ``cp_attention``
    (see the module docstring; lab 12's :func:`labkit.context_expert.cp_grid.run_grid` passes its ring)."""
    import labkit

    n_micro = validate_grid(dp, pp, tp, cfg, sp, batch, n_micro, cp, cp_attention)
    steps = validate_int("steps", steps, minimum=1)
    extra = dict(cp=cp, cp_attention=cp_attention) if cp > 1 else {}
    res = labkit.launch(train_rank, world_size=dp * pp * cp * tp, timeout=timeout, pool=pool, backend=backend,
                        kwargs=dict(dp=dp, pp=pp, tp=tp, sp=sp, steps=steps, batch=batch, n_micro=n_micro, cfg=cfg,
                                    seed=seed, lr=lr, **extra))
    last = [r for r in res if r["coords"]["pp"] == pp - 1 and r["coords"]["tp"] == 0]
    losses = [statistics.fmean(r["losses"][s] for r in last) for s in range(steps)]
    pieces = sorted((r for r in res if r["params"] is not None), key=lambda r: (r["coords"]["pp"], r["coords"]["tp"]))
    params = assemble([r["params"] for r in pieces])
    groups = sorted({k.split("/")[0] for r in res for k in r["bytes"]})
    nbytes = {g: {} for g in groups}
    calls = {g: {} for g in groups}
    for r in res:
        for k, v in r["bytes"].items():
            g, op = k.split("/")
            nbytes[g][op] = nbytes[g].get(op, 0.0) + v / len(res)
            calls[g][op] = calls[g].get(op, 0.0) + r["calls"][k] / len(res)
    step_s = statistics.median(max(r["times"][s][1] for r in res) - min(r["times"][s][0] for r in res)
                               for s in range(steps))
    bubbles = []
    for s in range(steps):  # one pipeline per (dp, cp, tp): the idle share of its stages' time
        for d in range(dp):
            for k in range(cp):
                for t in range(tp):
                    pipe = [r for r in res if (r["coords"]["dp"], r["coords"].get("cp", 0), r["coords"]["tp"])
                            == (d, k, t)]
                    span = max(r["spans"][s][1] for r in pipe) - min(r["spans"][s][0] for r in pipe)
                    bubbles.append(1 - sum(r["busy"][s] for r in pipe) / (len(pipe) * span) if span > 0 else 0.0)
    activations = [statistics.median(r["activations"]) for r in res]
    return GridRun(dp, pp, tp, sp, n_micro, losses, params, nbytes, calls, step_s, statistics.median(bubbles),
                   list(res), activations, cp)


# renamed in issue 30 (one release): it returns a count, n_micro, not micro-batches
__getattr__ = moved_names(__name__, {"micro_batches": "labkit.capstone.grid:choose_n_micro"})
