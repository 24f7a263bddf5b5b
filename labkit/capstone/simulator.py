"""A step-time simulator: one training step of a transformer on a GPU cluster, from FLOPs, bytes and links (pure).

No process starts here: :func:`predict` adds up arithmetic. It is long because it holds the whole step, each part
of which a course lab already teaches, put together once: the kernels' time from their FLOPs and bytes, the
tensor-, context-, pipeline- and data-parallel messages from lab 01's alpha-beta model
(:func:`labkit.collectives.cost.predict_time`), the pipeline from lab 04's schedules played by
:func:`labkit.pipeline.schedules.simulate`, and the memory from lab 09's formulas (:mod:`labkit.memory_model`).

**What is computed**, for one micro-batch of ``micro_batch`` sequences of ``seq`` tokens on one GPU, per layer
(h = ``width``, f = ``ffn_width``, a = ``heads``, V = ``vocab``, t = ``tp``, c = ``cp``, T = b·s/c the tokens a
context-parallel rank holds):

- matrix products (GEMMs), forward: 2T(4h² + 2hf)/t FLOPs (Q, K, V and output projections, the MLP's two; with
  grouped-query attention and a gated MLP, 2T/t times :attr:`Transformer.matmul_params`), at ``gemm_efficiency``
  of the peak; the attention's two batched products (QKᵀ and the probabilities times V): 4·T·s·h/t FLOPs (half
  under ``flash``: a fused causal kernel skips the masked blocks), at ``attention_efficiency`` of the peak; the
  output layer on the last stage 2ThV/t.
- memory-bound kernels (LayerNorm, bias + GeLU, bias + dropout + residual, the scaled masked softmax and the
  attention dropout of Megatron-LM 2021, which keeps the s×s scores), forward bytes: 22·T·h (two LayerNorms
  reading and writing 2-byte values, two dropout-adds reading two, writing one, and a 1-byte mask), divided by t
  under sequence parallelism; 4·T·f/t (bias + GeLU); 13·b·a·(s/c)·s/t (scores written, softmax read and written,
  dropout read, written and its mask, read by the next product); at ``memory_efficiency`` of the HBM bandwidth.
  ``flash=True`` drops the s×s bytes (a fused attention kernel keeps none).
- backward: twice the forward's FLOPs and bytes; full recomputation runs the forward once more before it,
  selective recomputation the attention core only (Korthikanti et al. 2022).

**Communication** (alpha-beta, ring algorithms, :func:`labkit.collectives.cost.predict_time`): tensor parallel, per
layer and micro-batch, 2 all-reduces of T·h values in the forward and 2 in the backward (2 more with full
recomputation; an all-gather plus a reduce-scatter each under sequence parallelism), over NVLink, not overlapped.
Context parallel (ring attention): each of the c ranks sends 2(c-1) key/value chunks of T·h/t values in the forward
and twice that in the backward, overlapped with the attention's products (the longer of the two counts). Pipeline:
one message of T·h values per micro-batch and stage boundary each way; with ``scatter_gather`` (Narayanan et al.
2021, section 4.1) each of the t GPUs sends T·h/t over its own network card and the receiving node all-gathers it
over NVLink; the message delays the next stage, and with ``blocking_p2p`` (Megatron-LM 2021 waits for its sends) it
also holds the sender. Data parallel: one all-reduce of the GPU's gradients per step, hierarchical when the group
spans nodes (reduce-scatter inside the node over its k members, ring all-reduce of 1/k across the nodes, each member
on its own card, all-gather inside the node), after the pipeline flush unless ``overlap_dp`` (then it hides behind
the last micro-batch's backward and only the rest shows). ZeRO 1 and 2 move the same bytes (reduce-scatter of
gradients, all-gather of weights); ZeRO 3 also all-gathers each stage's weights before every forward and backward of
every micro-batch and reduce-scatters its gradients after each, hidden behind the compute when ``overlap_dp``.

Ranks are placed as Megatron-LM does: tp innermost, then cp, then dp, then pp (a group is inside one node when its
ranks span at most ``gpus_per_node``); tp larger than a node is refused.

**Pipeline**: the stage times (layers of a chunk, :func:`chunk_layers`: equal, or one fewer on the end chunks
when pp·chunks does not divide the layers; the output layer and loss on the last) go to
:func:`~labkit.pipeline.schedules.simulate` on the real schedule (``gpipe``, ``1f1b``, ``interleaved`` with
``chunks``, ``zb-h1``), with the pipeline message as its ``comm``. The makespan is affine in the micro-batch count
once every stage has reached its steady phase; above :data:`SIMULATE_MAX_MICRO` micro-batches the schedule is
played at two smaller counts with the same remainder modulo pp and extrapolated (equal to the full play, which the
tests check). Step = makespan + the data-parallel time left exposed + the optimiser's update (memory-bound: 30
bytes a parameter for mixed-precision Adam, on the GPU's share).

**FLOP counts**: ``tflops_per_gpu`` is the Megatron-LM paper's count (Narayanan et al. 2021, section 5.1,
:func:`megatron_flops`), 96·B·s·l·h²(1 + s/6h + V/16lh) per step, which counts full recomputation's extra
forward, when ``recompute="full"``, and 72·B·s·l·h²(1 + s/6h) + 6BshV otherwise (:func:`model_flops` for other
shapes); ``mfu`` is model FLOPs utilisation: the count without recomputation over the peak (PaLM's definition,
which Llama 3 reports).

**Constants**: :class:`Hardware` holds them, none built in; :mod:`labkit.capstone.published` states the A100 and
H100 sets, where each comes from, and the published runs they are checked against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from .._validate import ArgumentError, validate_choice, validate_int, validate_number
from ..collectives.cost import predict_time
from ..memory_model import (
    PRECISIONS,
    RECOMPUTE,
    bytes_per_parameter,
    transformer_activations,
    transformer_params,
    zero_bytes_each_rank,
)
from ..pipeline.schedules import make_schedule, peak_in_flight, simulate

__all__ = ["Transformer", "Hardware", "Layout", "StepResult", "SIMULATE_MAX_MICRO", "megatron_flops",
           "model_flops", "chunk_layers", "layer_work", "kernel_seconds", "comm_seconds", "pipeline_makespan",
           "memory_each_gpu", "simulated_micro", "in_flight", "problems", "predict"]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
SIMULATE_MAX_MICRO = 64
"""Above this many micro-batches the pipeline is played at two smaller counts and extrapolated (see the docstring)."""
HARDWARE_CONSTANTS = ("peak_flops", "memory_bytes", "hbm_bytes_per_s", "intra_alpha", "intra_beta", "inter_alpha",
                      "inter_beta", "gemm_efficiency", "attention_efficiency", "memory_efficiency")
ADAM_UPDATE_BYTES = 30  # mixed-precision Adam reads and writes fp32 master, m, v (24), reads an fp32 gradient (4),
#                         writes the 16-bit weight (2)


@dataclass(frozen=True)
class Transformer:
    """A GPT-style transformer and its batch: ``micro_batch`` and ``global_batch`` count sequences of ``seq``
    tokens. ``ffn_width``: 4·width if left out. The defaults are Megatron-LM's GPT (learned position embeddings of
    ``seq``, tied output layer, multi-head attention, a two-matrix MLP); ``kv_heads`` < heads is grouped-query
    attention, ``gated_mlp`` a three-matrix MLP (SwiGLU), ``positions=0`` rotary positions (Llama)."""

    layers: int
    width: int
    heads: int
    vocab: int
    seq: int
    micro_batch: int
    global_batch: int
    ffn_width: int | None = None
    kv_heads: int | None = None
    gated_mlp: bool = False
    tied: bool = True
    positions: int | None = None

    def __post_init__(self):
        for name in ("layers", "width", "heads", "vocab", "seq", "micro_batch", "global_batch"):
            validate_int(name, getattr(self, name), minimum=1)
        if self.width % self.heads:
            raise ArgumentError(f"heads must divide width={self.width}, got heads={self.heads}")
        if self.ffn_width is None:
            object.__setattr__(self, "ffn_width", 4 * self.width)
        validate_int("ffn_width", self.ffn_width, minimum=1, hint="the MLP's inner width (4·width if left out)")
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        validate_int("kv_heads", self.kv_heads, minimum=1, maximum=self.heads, hint="heads of K and V (GQA)")
        if self.heads % self.kv_heads:
            raise ArgumentError(f"kv_heads must divide heads={self.heads}, got kv_heads={self.kv_heads}")
        if self.positions is None:
            object.__setattr__(self, "positions", self.seq)
        validate_int("positions", self.positions, minimum=0, hint="learned position embeddings (0: rotary)")
        for name in ("gated_mlp", "tied"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def params(self) -> int:
        """All parameters; for Megatron's GPT, :func:`~labkit.memory_model.transformer_params`."""
        if self.kv_heads == self.heads and not self.gated_mlp:
            return transformer_params(self.layers, self.width, self.vocab, self.ffn_width, tied=self.tied,
                                      positions=self.positions)
        h = self.width
        return self.layers * self.layer_params + h * self.vocab * (1 if self.tied else 2) + 2 * h + self.positions * h

    @property
    def matmul_params(self) -> int:
        """Weights of one layer's matrix products: Q, K, V, output projection and the MLP's matrices."""
        h, f = self.width, self.ffn_width
        kv = self.kv_heads * (h // self.heads)
        return h * (h + 2 * kv) + h * h + (3 if self.gated_mlp else 2) * h * f

    @property
    def layer_params(self) -> int:
        """One layer's parameters: :attr:`matmul_params`, the biases and two LayerNorms (12h² + 13h for GPT)."""
        h, f = self.width, self.ffn_width
        kv = self.kv_heads * (h // self.heads)
        return self.matmul_params + (h + 2 * kv) + h + f + h + 4 * h


@dataclass(frozen=True)
class Hardware:
    """One kind of GPU and its cluster: ``gpus_per_node`` joined by NVLink, ``peak_flops`` per dtype (FLOP/s,
    e.g. ``{"bf16": 312e12}``), ``memory_bytes`` per GPU, ``hbm_bytes_per_s``, the alpha (s) and beta (s/byte) of
    a link inside a node (``intra_*``) and of one GPU's own network card (``inter_*``), and the per-kernel
    utilisation stated for the simulator: ``gemm_efficiency`` (the share of peak the large matrix products reach),
    ``attention_efficiency`` (the attention's batched products), ``memory_efficiency`` (the share of HBM bandwidth
    the memory-bound kernels reach). ``sources`` says where each comes from. A constant left as None is refused
    by :func:`predict`, which names it."""

    name: str = "GPU"
    gpus_per_node: int = 8
    peak_flops: dict | None = None
    memory_bytes: float | None = None
    hbm_bytes_per_s: float | None = None
    intra_alpha: float | None = None
    intra_beta: float | None = None
    inter_alpha: float | None = None
    inter_beta: float | None = None
    gemm_efficiency: float | None = None
    attention_efficiency: float | None = None
    memory_efficiency: float | None = None
    sources: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def validate(self, dtype: str) -> None:
        validate_int("gpus_per_node", self.gpus_per_node, minimum=1)
        missing = [n for n in HARDWARE_CONSTANTS if getattr(self, n) is None]
        if not missing and dtype not in self.peak_flops:
            missing.append(f"peak_flops[{dtype!r}]")
        if missing:
            raise ArgumentError(f"hardware constants missing for {self.name!r}: {', '.join(missing)}; pass them to "
                                "Hardware(...), e.g. peak_flops={'bf16': 312e12}, or start from a stated set such "
                                "as labkit.capstone.published.A100_SELENE (dataclasses.replace to change one)")
        validate_number(f"peak_flops[{dtype!r}]", self.peak_flops[dtype], minimum=0, open_low=True)
        for n in HARDWARE_CONSTANTS[1:7]:
            validate_number(n, getattr(self, n), minimum=0, open_low=n in ("memory_bytes", "hbm_bytes_per_s"))
        for n in HARDWARE_CONSTANTS[7:]:
            validate_number(n, getattr(self, n), minimum=0, maximum=1, open_low=True,
                            hint="a share of the peak, e.g. 0.7")


@dataclass(frozen=True)
class Layout:
    """How the step is parallelised and run: the degrees ``dp``, ``tp``, ``pp``, ``cp`` (context parallel, ring
    attention), the ZeRO stage ``zero`` over dp, the pipeline ``schedule`` (``gpipe``, ``1f1b``, ``interleaved``
    with ``chunks`` model chunks a GPU, ``zb-h1``), activation ``recompute`` (``none``, ``selective``, ``full``),
    ``overlap_dp`` (data-parallel messages hidden behind the backward), ``sp`` (sequence parallel),
    ``scatter_gather`` (pipeline messages split over the tp GPUs' cards), ``blocking_p2p`` (a stage waits for
    its sends, as Megatron-LM 2021 does, instead of sending in the background), ``flash`` (fused attention),
    ``precision`` (memory, :data:`labkit.memory_model.PRECISIONS`) and ``dtype`` (which peak to use)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero: int = 0
    schedule: str = "1f1b"
    chunks: int = 1
    recompute: str = "none"
    overlap_dp: bool = False
    sp: bool = False
    scatter_gather: bool = True
    flash: bool = False
    blocking_p2p: bool = False
    precision: str = "mixed-bf16"
    dtype: str = "bf16"

    def __post_init__(self):
        for name in ("dp", "tp", "pp", "cp", "chunks"):
            validate_int(name, getattr(self, name), minimum=1)
        validate_int("zero", self.zero, minimum=0, maximum=3, hint="a ZeRO stage: 0 (none), 1, 2 or 3")
        validate_choice("schedule", self.schedule, SCHEDULES)
        validate_choice("recompute", self.recompute, RECOMPUTE)
        validate_choice("precision", self.precision, PRECISIONS)
        for name in ("overlap_dp", "sp", "scatter_gather", "flash", "blocking_p2p"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.chunks > 1 and self.schedule != "interleaved":
            raise ArgumentError(f"chunks={self.chunks} needs schedule='interleaved', got schedule={self.schedule!r}; "
                                "pass chunks=1 or schedule='interleaved'")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp


@dataclass
class StepResult:
    """What :func:`predict` returns: ``step_seconds``, ``tokens_per_s``, ``tflops_per_gpu`` (Megatron-LM's count,
    :func:`megatron_flops`), ``mfu`` (model FLOPs, no recomputation, over the peak), ``memory_bytes`` per GPU (the
    first stage, the busiest) and its ``memory`` breakdown, ``n_micro``, the pipeline ``bubble`` (idle share of
    the pipeline's makespan), ``parts`` (seconds: pipeline makespan, exposed data-parallel, optimiser; per
    micro-batch stage times; communication per group) and ``events``: the Gantt chart of one step
    (:func:`labkit.viz.gantt`), one lane per pipeline rank (kinds ``forward``, ``backward``, ``weight``,
    ``allreduce``, ``optimizer``) and one beside it for its pipeline messages (lane ``"<rank> send"``, kind
    ``send``). Above :data:`SIMULATE_MAX_MICRO` micro-batches the chart is that of the smaller play,
    ``parts["simulated_micro"]`` micro-batches (the times are not)."""

    step_seconds: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float
    memory_bytes: float
    memory: dict
    n_micro: int
    bubble: float
    parts: dict
    events: list

    def as_row(self) -> dict:
        return {"step s": self.step_seconds, "tokens/s": self.tokens_per_s, "TFLOP/s/GPU": self.tflops_per_gpu,
                "MFU": self.mfu, "memory GiB": self.memory_bytes / 2 ** 30, "m": self.n_micro, "bubble": self.bubble}


def megatron_flops(global_batch: int, seq: int, layers: int, width: int, vocab: int, recompute: bool = True) -> float:
    """FLOPs of one step as Narayanan et al. 2021 count them (section 5.1, equation 3): 96·B·s·l·h²·(1 + s/(6h) +
    V/(16·l·h)), B = ``global_batch``, s = ``seq``, l = ``layers``, h = ``width``, V = ``vocab``. Its 96 = 4 × 24:
    forward, backward (twice the forward) and full recomputation's second forward of the layers; the output layer
    (6BshV) is not recomputed. ``recompute=False``: 72·B·s·l·h²(1 + s/6h) + 6BshV, the model FLOPs."""
    B, s, L, h, V = global_batch, seq, layers, width, vocab  # l is written L here (ruff E741)
    passes = 4 if recompute else 3
    return 24 * passes * B * s * L * h * h * (1 + s / (6 * h)) + 6 * B * s * h * V


def model_flops(model: Transformer, recompute: bool = False) -> float:
    """:func:`megatron_flops` of ``model``'s global batch, for any shape: per token and layer 2 FLOPs a matrix
    weight (:attr:`Transformer.matmul_params`, 12h² for GPT) and 4·s·h for the attention (all s keys, causal mask
    or not: the papers' and PaLM's MFU convention), 3 passes (4 with ``recompute``), and 6hV for the output layer."""
    h = model.width
    B, s, L, V = model.global_batch, model.seq, model.layers, model.vocab
    passes = 4 if recompute else 3
    return passes * B * s * L * (2 * model.matmul_params + 4 * s * h) + 6 * B * s * h * V


def layer_work(model: Transformer, layout: Layout) -> dict:
    """One layer's forward on one GPU for one micro-batch: ``gemm_flops``, ``attention_flops`` (executed: a fused
    causal kernel, ``flash``, skips the masked half), ``memory_bytes`` (of the memory-bound kernels;
    ``attention_bytes`` of them belong to the s×s scores), and the output layer's ``logits_flops`` and
    ``logits_bytes`` (last stage). See the module docstring for each term."""
    b, s, h, f, a, V = model.micro_batch, model.seq, model.width, model.ffn_width, model.heads, model.vocab
    t, c = layout.tp, layout.cp
    T = b * s / c
    gemm = 2 * T * model.matmul_params / t
    attn = 4 * T * s * h / t * (0.5 if layout.flash else 1.0)
    unsplit = 22 * T * h / (t if layout.sp else 1)
    scores = 0.0 if layout.flash else 13 * b * a * (s / c) * s / t
    return {"gemm_flops": gemm, "attention_flops": attn, "memory_bytes": unsplit + 4 * T * f / t + scores,
            "attention_bytes": scores, "logits_flops": 2 * T * h * V / t, "logits_bytes": 12 * T * V / t}


def _seconds(flops: float, attn: float, nbytes: float, hw: Hardware, dtype: str) -> float:
    peak = hw.peak_flops[dtype]
    return (flops / (peak * hw.gemm_efficiency) + attn / (peak * hw.attention_efficiency)
            + nbytes / (hw.hbm_bytes_per_s * hw.memory_efficiency))


def kernel_seconds(model: Transformer, hardware: Hardware, layout: Layout) -> dict:
    """Seconds of compute for one micro-batch on one GPU: ``layer_forward``, ``layer_backward`` (with the
    recomputation ``layout.recompute`` asks for), ``logits_forward``, ``logits_backward`` (last stage)."""
    w, d = layer_work(model, layout), layout.dtype
    fwd = _seconds(w["gemm_flops"], w["attention_flops"], w["memory_bytes"], hardware, d)
    bwd = 2 * fwd
    if layout.recompute == "full":
        bwd += fwd
    elif layout.recompute == "selective":
        bwd += _seconds(0.0, w["attention_flops"], w["attention_bytes"], hardware, d)
    lf = _seconds(w["logits_flops"], 0.0, w["logits_bytes"], hardware, d)
    return {"layer_forward": fwd, "layer_backward": bwd, "logits_forward": lf, "logits_backward": 2 * lf}


def chunk_layers(layers: int, n_chunks: int) -> list[int]:
    """Layers of each of ``n_chunks`` virtual stages: equal when they divide ``layers`` (Megatron-LM); otherwise
    ceil(layers / n_chunks) each, one fewer on the first and last, then the second and second-last, ... (Llama 3's
    balancing: the ends also hold the embedding and the output layer)."""
    n = -(-layers // n_chunks)
    out, extra = [n] * n_chunks, n * n_chunks - layers
    for i in range(extra):
        out[i // 2 if i % 2 == 0 else n_chunks - 1 - i // 2] -= 1
    return out


def _in_one_node(stride: int, size: int, per_node: int) -> bool:
    """Whether a group of ``size`` ranks ``stride`` apart lies in one node of ``per_node`` GPUs."""
    return size == 1 or (stride * size <= per_node and per_node % (stride * size) == 0)


def _ring(nbytes, n, alpha, beta, algorithm="ring"):
    return predict_time(algorithm, nbytes, n, alpha, beta) if n > 1 else 0.0


def _all_reduce(nbytes: float, stride: int, size: int, hw: Hardware) -> float:
    """A data-parallel all-reduce of ``nbytes`` over ``size`` ranks ``stride`` apart: hierarchical across nodes."""
    if size == 1:
        return 0.0
    if _in_one_node(stride, size, hw.gpus_per_node):
        return _ring(nbytes, size, hw.intra_alpha, hw.intra_beta)
    k = max(1, min(size, hw.gpus_per_node // stride))  # members of the group in one node
    nodes = math.ceil(size / k)
    return (_ring(nbytes, k, hw.intra_alpha, hw.intra_beta, "reduce_scatter")
            + _ring(nbytes / k, nodes, hw.inter_alpha, hw.inter_beta)
            + _ring(nbytes, k, hw.intra_alpha, hw.intra_beta, "all_gather"))


def comm_seconds(model: Transformer, hardware: Hardware, layout: Layout) -> dict:
    """Seconds of each group's messages: ``tp_layer_forward``/``tp_layer_backward`` (per layer and micro-batch),
    ``cp_layer_forward``/``cp_layer_backward`` (ring attention, per layer and micro-batch), ``p2p`` (one pipeline
    message), ``dp`` (the gradients' all-reduce, per step), ``zero3_layer_forward``/``zero3_layer_backward``
    (ZeRO-3, per layer and micro-batch: the weights' all-gather before the forward; before the backward another,
    a third for the recomputed forward, and the gradients' reduce-scatter) and ``links``: which link each group
    uses."""
    hw, L = hardware, layout
    bpv = 2 if L.dtype in ("bf16", "fp16") else 4
    T = model.micro_batch * model.seq / L.cp
    act = T * model.width * bpv
    node = hw.gpus_per_node
    out, links = {}, {}
    # tensor parallel: inside a node (tp > node is refused by predict)
    if L.sp:
        one = (_ring(act, L.tp, hw.intra_alpha, hw.intra_beta, "all_gather")
               + _ring(act, L.tp, hw.intra_alpha, hw.intra_beta, "reduce_scatter"))
    else:
        one = _ring(act, L.tp, hw.intra_alpha, hw.intra_beta)
    out["tp_layer_forward"] = 2 * one
    out["tp_layer_backward"] = (4 if L.recompute == "full" else 2) * one
    links["tp"] = "intra"
    # context parallel: ring attention, 2(c-1) k/v chunks forward, twice that backward
    cp_inside = _in_one_node(L.tp, L.cp, node)
    ca, cb = (hw.intra_alpha, hw.intra_beta) if cp_inside else (hw.inter_alpha, hw.inter_beta)
    chunk = act * model.kv_heads / model.heads / L.tp  # one K or V block of the rank's tokens
    out["cp_layer_forward"] = 2 * (L.cp - 1) * predict_time("p2p", chunk, 2, ca, cb) if L.cp > 1 else 0.0
    out["cp_layer_backward"] = 2 * out["cp_layer_forward"]
    links["cp"] = "intra" if cp_inside else "inter"
    # pipeline: one activation per boundary, scattered over the tp cards and gathered over NVLink
    pp_inside = _in_one_node(L.tp * L.cp * L.dp, L.pp, node)
    pa, pb = (hw.intra_alpha, hw.intra_beta) if pp_inside else (hw.inter_alpha, hw.inter_beta)
    if L.pp == 1:
        out["p2p"] = 0.0
    elif L.scatter_gather and L.tp > 1 and not pp_inside:
        out["p2p"] = (predict_time("p2p", act / L.tp, 2, pa, pb)
                      + _ring(act, L.tp, hw.intra_alpha, hw.intra_beta, "all_gather"))
    else:
        out["p2p"] = predict_time("p2p", act, 2, pa, pb)
    links["pp"] = "intra" if pp_inside else "inter"
    # data parallel: the first stage's gradients (it also holds the embedding), hierarchical across nodes
    grads = _busiest_params(model, L) * bytes_per_parameter(L.precision)["grads"]
    out["dp"] = _all_reduce(grads, L.tp * L.cp, L.dp, hw)
    links["dp"] = "intra" if _in_one_node(L.tp * L.cp, L.dp, node) else "inter"
    per = 0.0
    if L.zero == 3 and L.dp > 1:  # an all-gather or a reduce-scatter of one layer's weights: half an all-reduce
        per = _all_reduce(model.layer_params / L.tp * bpv, L.tp * L.cp, L.dp, hw) / 2
    out["zero3_layer_forward"] = per
    out["zero3_layer_backward"] = (3 if L.recompute == "full" else 2) * per
    out["links"] = links
    return out


def _stage_params(model: Transformer, layout: Layout, stage: int) -> float:
    """Parameters one GPU of pipeline ``stage`` holds: its layers / tp (LayerNorms counted as split too), plus the
    embeddings on the first, the final LayerNorm and (pp > 1) the tied output layer's copy on the last, as
    Megatron-LM places them. With tp = pp = 1 it is :func:`~labkit.memory_model.transformer_params`."""
    per = model.layers / layout.pp * model.layer_params / layout.tp  # an average stage
    emb = (model.vocab * model.width) / layout.tp
    if stage == 0:
        per += emb + model.positions * model.width
    if stage == layout.pp - 1:
        per += 2 * model.width + (emb if layout.pp > 1 or not model.tied else 0)  # final LayerNorm, output layer
    return per


def _busiest_params(model: Transformer, layout: Layout) -> float:
    return max(_stage_params(model, layout, 0), _stage_params(model, layout, layout.pp - 1))


def simulated_micro(n_stages: int, n_micro: int) -> int:
    """The micro-batch count :func:`pipeline_makespan` plays: ``n_micro`` itself up to :data:`SIMULATE_MAX_MICRO`,
    else n_stages + n_micro mod n_stages + n_stages (the larger of its two plays), unless that is not smaller."""
    if n_micro <= SIMULATE_MAX_MICRO:
        return n_micro
    m2 = 2 * n_stages + n_micro % n_stages
    return n_micro if n_micro <= m2 else m2


@lru_cache(maxsize=1024)  # pure in its integers; a planner asks for the same few thousands of times
def in_flight(schedule: str, n_stages: int, n_micro: int, chunks: int = 1) -> int:
    """Micro-batch chunks whose activations the first pipeline rank holds at its peak under ``schedule``
    (:func:`~labkit.pipeline.schedules.peak_in_flight` of the schedule :func:`pipeline_makespan` plays; GPipe holds
    all ``n_micro``): what :func:`memory_each_gpu` multiplies one chunk's activations by."""
    played = make_schedule(schedule, n_stages, simulated_micro(n_stages, n_micro), chunks)
    return max(peak_in_flight(played)[0], n_micro if schedule == "gpipe" else 0)


@lru_cache(maxsize=8)  # a play of a deep pipeline holds ~10^5 events: keep few
def _play(schedule: str, p: int, m: int, v: int, forward: tuple, backward: tuple, comm: float) -> tuple:
    sim = simulate(make_schedule(schedule, p, m, v), list(forward), list(backward), comm=comm)
    return sim["makespan"], sim["bubble"], tuple(sim["events"])


def pipeline_makespan(schedule: str, n_stages: int, n_micro: int, chunks: int, forward: list, backward: list,
                      comm: float = 0.0) -> dict:
    """``{"makespan", "bubble", "events", "simulated_micro"}`` of ``schedule`` played by
    :func:`labkit.pipeline.schedules.simulate` with per-virtual-stage ``forward``/``backward`` seconds and ``comm``
    per message. Above :data:`SIMULATE_MAX_MICRO` micro-batches it plays two smaller counts with the same remainder
    modulo ``n_stages``, m1 = n_stages + m mod n_stages and m2 = m1 + n_stages, and extrapolates the makespan, affine
    in m from there; ``events`` are then those of the m2 play (``simulated_micro``)."""
    p, m, v = n_stages, n_micro, chunks
    fw, bw = tuple(float(x) for x in forward), tuple(float(x) for x in backward)
    m2 = simulated_micro(p, m)
    if m2 == m:
        span, bubble, events = _play(schedule, p, m, v, fw, bw, float(comm))
        return {"makespan": span, "bubble": bubble, "events": list(events), "simulated_micro": m}
    m1 = m2 - p
    s1, _, _ = _play(schedule, p, m1, v, fw, bw, float(comm))
    s2, _, events = _play(schedule, p, m2, v, fw, bw, float(comm))
    span = s2 + (s2 - s1) * (m - m2) / p
    busy = m * sum(f + b for f, b in zip(fw, bw))
    return {"makespan": span, "bubble": 1 - busy / (p * span), "events": list(events), "simulated_micro": m2}


def memory_each_gpu(model: Transformer, layout: Layout, in_flight: int) -> dict:
    """Bytes on a GPU of the first pipeline stage (the busiest): ``states`` (weights, gradients, optimiser state
    under ZeRO over dp, :func:`~labkit.memory_model.zero_bytes_each_rank`), ``activations``
    (:func:`~labkit.memory_model.transformer_activations` of one chunk's layers times ``in_flight`` micro-batch
    chunks), ``working`` (one layer rebuilt for its backward under full recomputation) and ``total``."""
    L = layout
    params = max(1, round(_stage_params(model, L, 0)))
    states = zero_bytes_each_rank(params, L.dp, L.zero, L.precision)["total"]
    bpv = 4 if L.precision == "fp32" else 2
    seq = max(1, model.seq // L.cp)
    per_chunk = max(chunk_layers(model.layers, L.pp * L.chunks))
    acts = in_flight * transformer_activations(seq, model.micro_batch, model.width, model.heads, max(1, per_chunk),
                                               L.tp, L.sp, L.recompute, L.flash, bpv)
    working = (transformer_activations(seq, model.micro_batch, model.width, model.heads, 1, L.tp, L.sp, "none",
                                       L.flash, bpv) if L.recompute == "full" else 0.0)
    return {"states": states, "activations": acts, "working": working, "total": states + acts + working}


def _validate(model, hardware, layout, world_size):
    if not isinstance(model, Transformer):
        raise ArgumentError(f"model must be a simulator.Transformer, got {type(model).__name__}; build one with "
                            "Transformer(layers=, width=, heads=, vocab=, seq=, micro_batch=, global_batch=)")
    if not isinstance(hardware, Hardware):
        raise ArgumentError(f"hardware must be a simulator.Hardware, got {type(hardware).__name__}; use "
                            "labkit.capstone.published.A100_SELENE or build one with Hardware(...)")
    if not isinstance(layout, Layout):
        raise ArgumentError(f"layout must be a simulator.Layout, got {type(layout).__name__}; build one with "
                            "Layout(dp=, tp=, pp=)")
    hardware.validate(layout.dtype)
    world_size = validate_int("world_size", world_size, minimum=1, hint="the number of GPUs")
    why = problems(model, hardware, layout, world_size)
    if why:
        raise ArgumentError(why[0])
    return model.global_batch // (layout.dp * model.micro_batch)


def problems(model: Transformer, hardware: Hardware, layout: Layout, world_size: int) -> list[str]:
    """Why ``layout`` cannot run ``model`` on ``world_size`` GPUs of ``hardware``, one sentence each naming the
    argument, its value and what to pass (empty: it can). Memory is not judged here (:func:`predict` reports it;
    :func:`labkit.capstone.ranking.rank_layouts` compares it with the card). :func:`predict` raises the first."""
    L, M, why = layout, model, []
    if L.world_size != world_size:
        why.append(f"dp·tp·pp·cp must equal world_size={world_size}, got dp={L.dp} × tp={L.tp} × pp={L.pp} "
                   f"× cp={L.cp} = {L.world_size}; pass degrees whose product is {world_size}")
    if L.tp > hardware.gpus_per_node:
        why.append(f"tp must be <= gpus_per_node={hardware.gpus_per_node} (its all-reduces in every layer "
                   f"need NVLink), got tp={L.tp}; move the rest of the degree to pp or dp")
    elif hardware.gpus_per_node % L.tp:
        why.append(f"tp must divide gpus_per_node={hardware.gpus_per_node}, got tp={L.tp}: some tensor-parallel "
                   "groups would straddle two nodes and run their all-reduces over the network; pass a divisor")
    if M.heads % L.tp or M.ffn_width % L.tp:
        why.append(f"tp must divide heads={M.heads} and ffn_width={M.ffn_width}, got tp={L.tp}")
    if M.seq % L.cp:
        why.append(f"cp must divide seq={M.seq}, got cp={L.cp}")
    if M.layers < L.pp * L.chunks:
        why.append(f"pp·chunks must be <= layers={M.layers}, got pp={L.pp} × chunks={L.chunks}; every "
                   "model chunk needs a layer")
    if M.global_batch % (L.dp * M.micro_batch):
        why.append(f"global_batch={M.global_batch} must split into dp={L.dp} × micro_batch="
                   f"{M.micro_batch}; pass a global_batch that is a multiple of {L.dp * M.micro_batch}")
        return why
    m = M.global_batch // (L.dp * M.micro_batch)
    if L.schedule in ("1f1b", "interleaved", "zb-h1") and m < L.pp:
        why.append(f"n_micro must be >= pp={L.pp} for schedule={L.schedule!r} (every stage needs a "
                   f"micro-batch in flight), got n_micro={m} (global_batch / (dp·micro_batch)); pass a "
                   f"global_batch of at least {L.pp * L.dp * M.micro_batch} or use fewer stages")
    if L.schedule == "interleaved" and m % L.pp:
        why.append(f"n_micro must be a multiple of pp={L.pp} for the interleaved schedule, got n_micro={m}")
    return why


def _send_spans(events: list, p: int, n_virtual: int, p2p: float, blocking: bool = False) -> list:
    """A "send" span after each forward that feeds the next virtual stage and each backward that feeds the previous
    one (the last ``p2p`` of it when the sender waits, ``blocking``), on a lane of its own beside its rank's
    (``"<rank> send"``): the pipeline's messages in the Gantt chart."""
    if p2p <= 0:
        return []
    out = []
    for e in events:
        s = e["chunk"] * p + e["lane"]
        if (e["kind"] == "forward" and s < n_virtual - 1) or (e["kind"] == "backward" and s > 0):
            start = e["end"] - p2p if blocking else e["end"]
            out.append({"lane": f"{e['lane']} send", "kind": "send", "start": start, "end": start + p2p,
                        "label": e["label"]})
    return out


def predict(model: Transformer, hardware: Hardware, layout: Layout, world_size: int) -> StepResult:
    """One training step of ``model`` on ``world_size`` GPUs of ``hardware`` laid out as ``layout`` (see the
    module docstring for every term). Raises :class:`~labkit._validate.ArgumentError` naming the argument when
    the degrees do not multiply to ``world_size``, tp is larger than a node, there are fewer micro-batches than
    stages for a 1F1B-like schedule, or a hardware constant is missing."""
    m = _validate(model, hardware, layout, world_size)
    L, M, hw = layout, model, hardware
    k, c = kernel_seconds(M, hw, L), comm_seconds(M, hw, L)
    counts = chunk_layers(M.layers, L.pp * L.chunks)
    attn_fwd = _seconds(0.0, layer_work(M, L)["attention_flops"], 0.0, hw, L.dtype)
    cp_f = max(0.0, c["cp_layer_forward"] - attn_fwd)  # ring attention overlaps its products
    cp_b = max(0.0, c["cp_layer_backward"] - 2 * attn_fwd)
    zf, zb = c["zero3_layer_forward"], c["zero3_layer_backward"]
    lf = k["layer_forward"] + c["tp_layer_forward"] + cp_f
    lb = k["layer_backward"] + c["tp_layer_backward"] + cp_b
    if zf:  # prefetched behind the compute with overlap_dp, else in line
        lf, lb = (max(lf, zf), max(lb, zb)) if L.overlap_dp else (lf + zf, lb + zb)
    fw, bw = [n * lf for n in counts], [n * lb for n in counts]
    fw[-1] += k["logits_forward"]
    bw[-1] += k["logits_backward"]
    delay = c["p2p"]
    if L.blocking_p2p and L.pp > 1:  # the sender waits for its message: it runs on the stage's own clock
        fw = [f + (delay if i < len(fw) - 1 else 0.0) for i, f in enumerate(fw)]
        bw = [b + (delay if i > 0 else 0.0) for i, b in enumerate(bw)]
        delay = 0.0
    pipe = pipeline_makespan(L.schedule, L.pp, m, L.chunks, fw, bw, delay)
    dp_exposed = max(0.0, c["dp"] - bw[0]) if L.overlap_dp else c["dp"]
    if L.zero == 3:
        dp_exposed = 0.0  # its messages are counted per micro-batch above
    shard = L.dp if L.zero >= 1 else 1
    opt = _busiest_params(M, L) / shard * ADAM_UPDATE_BYTES / (hw.hbm_bytes_per_s * hw.memory_efficiency)
    step = pipe["makespan"] + dp_exposed + opt
    mem = memory_each_gpu(M, L, in_flight(L.schedule, L.pp, m, L.chunks))
    tokens = M.global_batch * M.seq
    events = [dict(e) for e in pipe["events"]]
    span = max((e["end"] for e in events), default=0.0)
    events += _send_spans(events, L.pp, L.pp * L.chunks, c["p2p"], L.blocking_p2p)
    for r in range(L.pp):
        if dp_exposed:
            events.append({"lane": r, "kind": "allreduce", "start": span, "end": span + dp_exposed, "label": "dp"})
        events.append({"lane": r, "kind": "optimizer", "start": span + dp_exposed, "end": span + dp_exposed + opt,
                       "label": "opt"})
    return StepResult(
        step_seconds=step, tokens_per_s=tokens / step,
        tflops_per_gpu=model_flops(M, recompute=L.recompute == "full") / (step * world_size) / 1e12,
        mfu=model_flops(M) / (step * world_size * hw.peak_flops[L.dtype]),
        memory_bytes=mem["total"], memory=mem, n_micro=m, bubble=pipe["bubble"],
        parts={"pipeline": pipe["makespan"], "dp_exposed": dp_exposed, "optimizer": opt,
               "stage_forward": fw, "stage_backward": bw, "comm": c, "kernels": k,
               "simulated_micro": pipe["simulated_micro"]},
        events=events)
