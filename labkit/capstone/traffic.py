"""The bytes each group should carry per training step, from the formulas, term by term.

The published forms (the Ultra-Scale Playbook, Hugging Face 2025, chapters on tensor, sequence, pipeline and data
parallelism; Narayanan et al. 2021, arXiv 2104.04473, section 3; Korthikanti et al. 2022, section 4.2.2), for a
micro-batch of b sequences of s tokens of width h, values of e bytes, t tensor-parallel ranks:

- **tensor parallel**, per transformer layer and micro-batch: four all-reduces of b·s·h values, two in the forward
  (after attention and after the MLP: Megatron's g) and two in the backward (before them: f). On a ring each sends
  2(t-1)/t of its payload. With sequence parallelism each all-reduce becomes a reduce-scatter and an all-gather
  of the same tensor, (t-1)/t each: the same bytes.
- **pipeline parallel**, per micro-batch and stage boundary: the activation b·s·h forward and its gradient back
  (b·s·h/t per rank under sequence parallelism, where each tp rank sends its slice of the sequence).
- **data parallel**, per step: a ring all-reduce of the gradients of the rank's parameters, 2(d-1)/d of them.
- **context parallel** (lab 12), per layer and micro-batch: ring attention's sends, 2(c-1) chunks of keys and
  values forward and 4c backward (keys, values and their gradients), a chunk b·(s/c)·h/t values; lab 12's
  ``ring_bytes`` is the formula, passed in (lab 11 comes first and does not import it). Every other term then
  covers this rank's s/c tokens, and the gradients' all-reduce runs over the d·c ranks of the ``dp_cp`` group.

:func:`predict` applies them to the capstone's model and adds the terms that sit outside the layers, so that
its total can be compared with what :class:`~labkit.capstone.comm.CommMeter` measures to the byte: the
vocabulary-parallel embedding's all-reduce, the output layer's f, the three per-token all-reduces of the
vocabulary-parallel loss, the 64-byte header lab 04's executor sends before each activation, and, under sequence
parallelism, the all-reduce of the LayerNorm, bias and position gradients.

This is a formula module: it writes the papers' symbols, each one word of docs/glossary.md: b the ``micro_batch``
(sequences: ``batch / dp / n_micro``), s the sequence length (``Config.seq``), h the model's ``width``
(``Config.width``; f its MLP's ``ffn_width``, v the vocabulary), e the bytes of one value (8 in float64, the
parameter ``e``), t, p, d and c the mesh's ``tp``, ``pp``, ``dp`` and ``cp``, m the number of micro-batches
``n_micro``.
"""
from __future__ import annotations

from .._compat import moved_names
from .._validate import ArgumentError
from .model import Config, stage_layers

HEADER = 64  # lab 04's executor: 8 int64 values with the shape before each tensor


def tp_layer_bytes(b: int, s: int, h: int, e: int = 8, sp: bool = False) -> dict:
    """Payload one tensor-parallel rank hands to collectives for one layer and one micro-batch (forward and
    backward): ``{op: bytes}``. Four all-reduces of b·s·h values, or four all-gathers and four reduce-scatters."""
    x = b * s * h * e
    if sp:
        return {"all_gather_single": 4 * x, "reduce_scatter_single": 4 * x}
    return {"all_reduce": 4 * x}


def stage_params(cfg: Config, stage: int, pp: int, tp: int) -> dict:
    """Parameters one tensor-parallel rank of ``stage`` holds: ``{"split", "replicated"}`` (counts)."""
    h, f, v = cfg.width, cfg.resolved_ffn_width, cfg.vocab
    layers = len(stage_layers(cfg.layers, pp)[stage])
    split = layers * ((3 * h * h + 3 * h) + h * h + (h * f + f) + f * h) // tp
    replicated = layers * (4 * h + 2 * h)  # two LayerNorms; the row layers' biases, added once after the sum
    if stage == 0:
        split += v * h // tp
        replicated += cfg.seq * h
    if stage == pp - 1:
        split += v * h // tp
        replicated += 2 * h
    return {"split": split, "replicated": replicated}


def _add(d: dict, op: str, n: float) -> None:
    if n:
        d[op] = d.get(op, 0) + n


def predict_stage(cfg: Config, stage: int, dp: int, pp: int, tp: int, sp: bool, batch: int, n_micro: int,
                  e: int = 8, cp: int = 1, ring_bytes=None) -> dict:
    """``{group: {op: payload bytes per step}}`` for one rank at pipeline stage ``stage`` (every rank of a stage
    sends the same). ``cp > 1``: context parallelism, ``ring_bytes`` lab 12's formula (see the module docstring)."""
    if cp > 1 and ring_bytes is None:
        raise ArgumentError(f"cp={cp}: the ring's bytes need lab 12's formula: pass "
                            "ring_bytes=labkit.context_expert.ring.ring_bytes, or cp=1")
    b, s, h = batch // dp // n_micro, cfg.seq // cp, cfg.width
    m, x = n_micro, b * s * h * e
    first, last = stage == 0, stage == pp - 1
    out: dict = {}
    if tp > 1:
        t = out.setdefault("tp", {})
        for op, n in tp_layer_bytes(b, s, h, e, sp).items():
            _add(t, op, n * m * len(stage_layers(cfg.layers, pp)[stage]))
        if first:  # the embedding's partial sums; under sp their gradient is all-gathered on the way back
            _add(t, "reduce_scatter_single" if sp else "all_reduce", m * x)
            if sp:
                _add(t, "all_gather_single", m * x)
        if last:  # the output layer's f (forward gather and backward reduce-scatter under sp) and the loss
            if sp:
                _add(t, "all_gather_single", m * x)
                _add(t, "reduce_scatter_single", m * x)
            else:
                _add(t, "all_reduce", m * x)
            _add(t, "all_reduce", 3 * m * b * s * e)
        if sp:
            _add(t, "all_reduce", stage_params(cfg, stage, pp, tp)["replicated"] * e)
    if cp > 1:  # per layer and micro-batch, this rank's heads: h/t values per token
        ring = ring_bytes(b, cfg.heads // tp, cfg.seq, cfg.head_dim, cp, e)
        _add(out.setdefault("cp", {}), "isend",
             m * len(stage_layers(cfg.layers, pp)[stage]) * (ring["forward"] + ring["backward"]))
    if pp > 1:
        act = b * (s // tp if sp else s) * h * e + HEADER
        _add(out.setdefault("pp", {}), "isend", m * act * ((not last) + (not first)))
    if dp * cp > 1:
        n = stage_params(cfg, stage, pp, tp)
        _add(out.setdefault("dp" if cp == 1 else "dp_cp", {}), "all_reduce", (n["split"] + n["replicated"]) * e)
    return out


def predict(cfg: Config, dp: int, pp: int, tp: int, sp: bool = False, batch: int = 16, n_micro: int = 4,
            e: int = 8, cp: int = 1, ring_bytes=None) -> dict:
    """``{group: {op: payload bytes per step}}`` averaged over all ranks, as :class:`~labkit.capstone.grid.GridRun`
    reports its measurement. ``cp > 1`` (lab 12) needs ``ring_bytes``, lab 12's formula for the ring's sends
    (:func:`labkit.context_expert.cp_grid.predict_cp` passes it)."""
    total: dict = {}
    for stage in range(pp):
        for g, ops in predict_stage(cfg, stage, dp, pp, tp, sp, batch, n_micro, e, cp, ring_bytes).items():
            for op, n in ops.items():
                _add(total.setdefault(g, {}), op, n / pp)
    return total


# renamed in issue 30 (one release): it takes no ctx, it predicts one pipeline stage's ranks
__getattr__ = moved_names(__name__, {"predict_rank": "labkit.capstone.traffic:predict_stage"})
