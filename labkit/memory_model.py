"""The arithmetic of training memory: one implementation of the formulas that labs 05, 09, 10 and 11 use.

Pure arithmetic (no torch): bytes per parameter for a precision and an optimiser, their sharding under ZeRO,
a transformer's parameter count and activation memory, and how many micro-batches a pipeline stage holds.
Each formula's docstring names its source.

This is a formula module: it writes the papers' symbols, each of which is one word of docs/glossary.md and one
parameter here: Ψ the parameter count (``params``), N the data-parallel ``world_size``, h the model's ``width``
(f its MLP's ``ffn_width``, 4h by default), s the sequence length ``seq``, b the ``micro_batch`` (sequences), a
the attention ``heads``, L the ``layers``, t the tensor-parallel degree ``tp``, p the pipeline's ``n_stages`` (s,
the index of one ``stage``, in :func:`pipeline_in_flight`), m the number of micro-batches ``n_micro``.
Sources:

- Rajbhandari et al. 2019, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
  (arXiv 1910.02054), section 3.1 and Figure 1: mixed-precision Adam keeps 2Ψ (fp16 weights) + 2Ψ (fp16
  gradients) + KΨ optimiser state with K = 12 (fp32 master weights, momentum and variance), 16Ψ in all;
  per rank under data parallelism of degree N: stage 1 4Ψ + 12Ψ/N, stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N.
- Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198),
  equations 1-6: activation bytes per transformer layer sbh(34 + 5as/h) with 16-bit values and dropout; with
  tensor parallelism of degree t sbh(10 + 24/t + 5as/(ht)); with tensor and sequence parallelism
  sbh(34/t + 5as/(ht)); with selective recomputation 34sbh/t; with full recomputation only each layer's input,
  2sbh. A fused (flash) attention kernel keeps no s x s matrices, which removes the 5as/h term.
- The Ultra-Scale Playbook (Hugging Face, 2025): a transformer's parameter count h·v + L(12h² + 13h) + 2h with
  tied embeddings; about 16 bytes per parameter for mixed-precision Adam (1B parameters: 16 GB).
- Narayanan et al. 2021 (Megatron-LM, arXiv 2104.04473), section 2.2: under 1F1B, stage s of p holds at most
  p - s micro-batches' activations at once; GPipe (Huang et al. 2019) holds all m.

Precisions (:data:`PRECISIONS`):

- ``fp32``: weights, gradients and optimiser state in 4 bytes.
- ``bf16``: pure bf16 training, everything in 2 bytes (no master copy).
- ``autocast-bf16`` / ``autocast-fp16``: PyTorch's automatic mixed precision as ``torch.autocast`` does it:
  weights, gradients and optimiser state stay fp32; the 16-bit copies of the weights are made in the forward
  and saved for the backward, so they belong with the activations, not here.
- ``mixed-bf16`` / ``mixed-fp16``: the ZeRO paper's (and Megatron's) mixed precision: 16-bit weights and
  gradients, and an fp32 master copy of the weights kept by the optimiser.

For Adam both ``autocast-*`` and ``mixed-*`` cost 16 bytes per parameter, split differently (4 + 4 + 8 against
2 + 2 + 12), which is what decides how much each ZeRO stage saves.
"""
from __future__ import annotations

from ._compat import moved_names, renamed_kwargs
from ._validate import ArgumentError, validate_choice, validate_int

__all__ = ["GB", "PRECISIONS", "OPTIMIZERS", "bytes_per_parameter", "zero_bytes_each_rank", "transformer_params",
           "transformer_activations", "pipeline_in_flight"]

GB = 10 ** 9  # the ZeRO paper's and the Playbook's gigabyte (GPU memory lines are GiB: 80 GB cards hold 80 GiB)
PRECISIONS = ("fp32", "bf16", "autocast-bf16", "autocast-fp16", "mixed-bf16", "mixed-fp16")
OPTIMIZERS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}  # optimiser state tensors per parameter
RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("1f1b", "gpipe")


def bytes_per_parameter(precision: str = "fp32", optimizer: str = "adam") -> dict:
    """Bytes each parameter costs in training, before activations: ``weights``, ``grads``, ``optimizer`` (the
    optimiser's state, with the fp32 master copy for the ``mixed-*`` precisions) and their ``total``.

    ``fp32`` + Adam: 4 + 4 + 8 = 16; ``mixed-fp16`` + Adam: 2 + 2 + 12 = 16 (ZeRO's K = 12); ``bf16`` + Adam:
    2 + 2 + 4 = 8; SGD without momentum keeps no state (the master copy still counts under ``mixed-*``)."""
    validate_choice("precision", precision, PRECISIONS)
    validate_choice("optimizer", optimizer, tuple(OPTIMIZERS))
    states = OPTIMIZERS[optimizer]
    if precision == "bf16":
        w, g, opt = 2, 2, 2 * states
    elif precision.startswith("mixed-"):
        w, g, opt = 2, 2, 4 + 4 * states      # fp32 master weights + fp32 state
    else:                                      # fp32, autocast-*: everything the optimiser sees is fp32
        w, g, opt = 4, 4, 4 * states
    return {"weights": w, "grads": g, "optimizer": opt, "total": w + g + opt}


@renamed_kwargs(world="world_size")
def zero_bytes_each_rank(params: int, world_size: int, stage: int, precision: str = "mixed-fp16",
                         optimizer: str = "adam") -> dict:
    """Bytes on each rank of weights, gradients and optimiser state under ZeRO ``stage`` on ``world_size``
    data-parallel ranks (stage 0: plain data parallelism, every rank holds everything).

    Stage 1 shards the optimiser state, stage 2 also the gradients, stage 3 also the weights (ZeRO, section 5).
    With ``mixed-fp16`` + Adam this is the paper's 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N and 16Ψ/N."""
    params = validate_int("params", params, minimum=1)
    world_size = validate_int("world_size", world_size, minimum=1, hint="the number of data-parallel ranks")
    stage = validate_int("stage", stage, minimum=0, maximum=3, hint="0 (plain data parallel), 1, 2 or 3")
    b = bytes_per_parameter(precision, optimizer)
    sharded = {"weights": stage >= 3, "grads": stage >= 2, "optimizer": stage >= 1}
    out = {k: params * b[k] / (world_size if sharded[k] else 1) for k in ("weights", "grads", "optimizer")}
    out["total"] = sum(out.values())
    return out


@renamed_kwargs(hidden="width", ffn="ffn_width")
def transformer_params(layers: int, width: int, vocab: int, ffn_width: int | None = None, tied: bool = True,
                       positions: int = 0) -> int:
    """Parameters of a GPT-style transformer (the Ultra-Scale Playbook's count), h = ``width``, v = ``vocab``.

    Per layer: attention 4h² + 4h (Q, K, V and output projections with biases), MLP 2·h·f + f + h (f =
    ``ffn_width``, 4h by default), two LayerNorms 4h: 12h² + 13h when f = 4h. Plus the token embedding h·v, a
    final LayerNorm 2h, an untied output head h·v when ``tied`` is False and learned position embeddings
    ``positions``·h."""
    layers = validate_int("layers", layers, minimum=1)
    h = validate_int("width", width, minimum=1)
    vocab = validate_int("vocab", vocab, minimum=1)
    f = 4 * h if ffn_width is None else validate_int("ffn_width", ffn_width, minimum=1)
    positions = validate_int("positions", positions, minimum=0)
    per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
    return h * vocab * (1 if tied else 2) + layers * per_layer + 2 * h + positions * h


@renamed_kwargs(hidden="width")
def transformer_activations(seq: int, micro_batch: int, width: int, heads: int, layers: int = 1, tp: int = 1,
                            sp: bool = False, recompute: str = "none", flash: bool = False,
                            bytes_per_value: int = 2) -> float:
    """Activation bytes a transformer keeps for its backward (Korthikanti et al. 2022, equations 1-6).

    Per layer, with s = ``seq``, b = ``micro_batch``, h = ``width``, a = ``heads``, t = ``tp``:

    - no parallelism: sbh(34 + 5as/h);
    - tensor parallel: sbh(10 + 24/t + 5as/(ht)) (LayerNorm and dropout inputs are not split);
    - tensor + sequence parallel (``sp``): sbh(34/t + 5as/(ht));
    - ``recompute="selective"`` (recompute attention's s x s part): the 5as/h term goes, 34sbh/t with ``sp``;
    - ``recompute="full"``: each layer keeps its input only, 2sbh (/t with ``sp``);
    - ``flash`` (a fused attention kernel): the 5as/h term goes too.

    The paper counts 16-bit values (``bytes_per_value=2``); the formula scales with the value size."""
    s = validate_int("seq", seq, minimum=1)
    b = validate_int("micro_batch", micro_batch, minimum=1)
    h = validate_int("width", width, minimum=1)
    a = validate_int("heads", heads, minimum=1)
    layers = validate_int("layers", layers, minimum=1)
    t = validate_int("tp", tp, minimum=1)
    validate_choice("recompute", recompute, RECOMPUTE)
    bpv = validate_int("bytes_per_value", bytes_per_value, minimum=1)
    if h % a:
        raise ArgumentError(f"width={h} is not a multiple of heads={a}; pick heads that divide the width")
    if a % t or h % t:
        fits = [d for d in range(1, a + 1) if a % d == 0 and h % d == 0]
        raise ArgumentError(f"tp={t} must divide heads={a} and width={h}: tensor parallelism splits the heads "
                            f"across ranks; pick a tp among {fits}")
    sbh = s * b * h
    if recompute == "full":
        per = 2 * sbh / (t if sp else 1)
    else:
        attn = 0.0 if (flash or recompute == "selective") else 5 * a * s / h
        per = sbh * ((34 / t if sp else 10 + 24 / t) + attn / t)
    return per * layers * bpv / 2


@renamed_kwargs(stages="n_stages", micro_batches="n_micro")
def pipeline_in_flight(schedule: str, stage: int, n_stages: int, n_micro: int) -> int:
    """How many micro-batches' activations stage ``stage`` (0 = first) of ``n_stages`` holds at its peak, with
    ``n_micro`` micro-batches per step.

    GPipe runs every forward before any backward, so each stage holds all m. 1F1B starts a micro-batch's backward
    as soon as the last stage has it, so stage s holds at most p - s (Narayanan et al. 2021, section 2.2): the
    first stage holds the most, min(p, m)."""
    validate_choice("schedule", schedule, SCHEDULES)
    p = validate_int("n_stages", n_stages, minimum=1)
    stage = validate_int("stage", stage, minimum=0, maximum=p - 1)
    m = validate_int("n_micro", n_micro, minimum=1)
    return m if schedule == "gpipe" else min(p - stage, m)


__getattr__ = moved_names(__name__, {"zero_bytes_per_rank": "labkit.memory_model:zero_bytes_each_rank"})
