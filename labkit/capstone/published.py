"""Published training runs that :mod:`labkit.capstone.simulator` is checked against, with their sources (pure).

**Narayanan et al. 2021**, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"
(SC21, arXiv 2104.04473). :data:`MEGATRON_TABLE1` is its Table 1 (weak scaling, 1.7B to 1T parameters; checked
against the paper's text: the 1T row has 160 heads). The settings the table does not give, and where each comes
from:

- schedule: interleaved, scatter/gather on: section 5.1 ("we use the interleaved pipeline schedule with the
  scatter/gather optimization enabled"). Every pipelined row's micro-batch count is a multiple of pp, which the
  interleaved schedule needs. The number of chunks is not given: **assumed** the smallest count above 1 that divides a
  stage's layers (2 where that count is even; 3 for the 76.1B row's 15 layers and the 529.6B row's 3).
- activation recomputation: full, **assumed** for every row: the paper's FLOP count (its equation 3) counts the
  recomputed forward, and section 3.5 says recomputation is needed for large models under pipelining.
- micro-batch size: 1, **assumed**: Table 1 does not give it; Table 2's PTD-P rows and the experiments of Figures
  11, 13-15 use 1.
- mixed precision fp16 (section 5: "All of our results are run with mixed precision"), the 312 TFLOP/s peak
  (section 5), Adam; data-parallel gradients all-reduced in 16 bits after the pipeline flush, not overlapped
  (Megatron-LM 2021's local DDP); Megatron's GPT: learned positions, tied output layer.
- hardware: Selene, DGX A100 80 GB nodes of 8 GPUs on NVLink/NVSwitch, eight 200 Gb/s HDR InfiniBand cards a node
  (section 5), see :data:`A100_SELENE`.

**The one set of constants** (:data:`A100_SELENE`): peak, HBM bandwidth and links from data sheets and lab 01's
:data:`labkit.collectives.cost.PUBLISHED_LINKS`; ``attention_efficiency`` and ``memory_efficiency`` stated, not
fitted; ``gemm_efficiency`` **fitted on one row, the 145.6B one** (lab 11's planner case; :func:`fit_gemm_efficiency`
reproduces it), and used unchanged for the other nine rows, for :data:`MEGATRON_TABLE2` and for the figures' trends.
It is an effective utilisation of the model's matrix products, lower than what cuBLAS reaches on these shapes alone:
it absorbs what the simulator leaves out (kernel launch gaps, the small products, dropout's random numbers, the
embedding, gradient clipping, data loading).

Figures reproduced as trends (:func:`figure11_trend`, :func:`figure13_trend`): Figure 11 (weak scaling of the
non-interleaved pipeline at tp = 8, a 128-head width-20480 model with 3·pp layers, batch 8 and 128: throughput per
GPU falls as pp grows, much faster at batch 8); Figure 13 (the 162.2B model, 32 layers, on 64 GPUs: at a fixed GPU
count, moving degree from tp to pp lowers throughput; the paper's tp = 16 and 32 points span nodes, which the
simulator refuses).
"""
from __future__ import annotations

from dataclasses import replace

from .._validate import ArgumentError, validate_int
from ..collectives.cost import PUBLISHED_LINKS
from ..viz import format_table
from .simulator import Hardware, Layout, Transformer, predict

__all__ = ["A100_SELENE", "MEGATRON_TABLE1", "MEGATRON_TABLE2", "FIT_ROW", "megatron_run", "megatron_table",
           "format_megatron_table", "fit_gemm_efficiency", "figure11_trend", "figure13_trend"]

_NVLINK, _IB = PUBLISHED_LINKS["NVLink (A100, 8 GPUs)"], PUBLISHED_LINKS["InfiniBand HDR (64 GPUs)"]

A100_SELENE = Hardware(
    name="A100 80GB SXM (DGX A100, Selene)", gpus_per_node=8,
    peak_flops={"fp16": 312e12, "bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    memory_bytes=80 * 2 ** 30, hbm_bytes_per_s=2.039e12,
    intra_alpha=_NVLINK["alpha"], intra_beta=_NVLINK["beta"], inter_alpha=_IB["alpha"], inter_beta=_IB["beta"],
    gemm_efficiency=0.642, attention_efficiency=0.6, memory_efficiency=0.85,
    sources={
        "peak_flops": "NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOP/s dense fp16/bf16 (the paper's section 5 "
                      "uses the same peak), 156 tf32, 19.5 fp32",
        "memory_bytes": "A100 80GB: 80 GiB (datasheet)",
        "hbm_bytes_per_s": "A100 80GB SXM datasheet: 2,039 GB/s HBM2e",
        "intra_alpha/beta": "lab 01, PUBLISHED_LINKS['NVLink (A100, 8 GPUs)']: " + _NVLINK["source"],
        "inter_alpha/beta": "lab 01, PUBLISHED_LINKS['InfiniBand HDR (64 GPUs)']: " + _IB["source"]
                            + "; a DGX A100 has one HDR card per GPU (paper, section 5)",
        "gemm_efficiency": "fitted on Table 1's 145.6B row alone (fit_gemm_efficiency(FIT_ROW)), then held fixed",
        "attention_efficiency": "stated, not fitted: QK^T and the probabilities times V are batched products with an "
                                "inner dimension of one head (96-160), 2·d FLOPs a 2-byte score, near the A100's "
                                "153 FLOP/byte balance point; their bytes are counted with the memory-bound kernels",
        "memory_efficiency": "stated, not fitted: the share of the datasheet HBM bandwidth that a streaming kernel "
                             "typically reaches on an A100 (about 85%)",
    })
"""The one set of A100 constants the Megatron-LM rows are predicted with (see the module docstring)."""

_KEYS = ("params_b", "heads", "width", "layers", "tp", "pp", "gpus", "global_batch", "tflops")
MEGATRON_TABLE1 = [dict(zip(_KEYS, row)) for row in (
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163))]
"""Narayanan et al. 2021, Table 1: parameters (billions), heads, width, layers, tp, pp, GPUs, global batch, achieved
TFLOP/s per GPU (its equation 3's count). Sequence 2048, vocabulary 51,200, dp = GPUs / (tp·pp)."""

MEGATRON_TABLE2 = [dict(zip(_KEYS, row)) for row in (
    (174.6, 96, 12288, 96, 8, 12, 384, 1536, 153),
    (174.6, 96, 12288, 96, 8, 12, 768, 1536, 149),
    (174.6, 96, 12288, 96, 8, 12, 1536, 1536, 141),
    (529.6, 128, 20480, 105, 8, 35, 560, 2240, 171),
    (529.6, 128, 20480, 105, 8, 35, 1120, 2240, 167),
    (529.6, 128, 20480, 105, 8, 35, 2240, 2240, 159))]
"""Narayanan et al. 2021, Table 2, the PTD-P rows (micro-batch 1; model-parallel size 96 = tp 8 × pp 12 for GPT-3's
175B, 280 = 8 × 35 for the 530B model of Table 1; GPT-3's shape from section 5.3.2): a strong-scaling check, the
same global batch on 2 and 4 times the GPUs."""

FIT_ROW = 6
"""The index in :data:`MEGATRON_TABLE1` of the only row used to fit anything (the 145.6B model: ``gemm_efficiency``)."""


def _chunks(layers: int, pp: int) -> int:
    if pp == 1:
        return 1
    per = layers // pp
    return next(v for v in range(2, per + 1) if per % v == 0) if per > 1 else 1


def megatron_run(row: dict, seq: int = 2048, vocab: int = 51200, micro_batch: int = 1,
                 schedule: str | None = None, recompute: str = "full") -> tuple[Transformer, Layout, int]:
    """``(model, layout, world_size)`` for one row of :data:`MEGATRON_TABLE1` (or a dict with its keys) under the
    settings in the module docstring; ``schedule`` (default: interleaved when pp > 1) and the others can be varied."""
    need = [k for k in _KEYS[1:8] if k not in row]
    if need:
        raise ArgumentError(f"row is missing {need}; pass a dict with the keys {list(_KEYS[1:8])}, e.g. "
                            "MEGATRON_TABLE1[0]")
    tp, pp, gpus = row["tp"], row["pp"], row["gpus"]
    if gpus % (tp * pp):
        raise ArgumentError(f"gpus={gpus} is not a multiple of tp·pp={tp * pp}")
    model = Transformer(layers=row["layers"], width=row["width"], heads=row["heads"], vocab=vocab, seq=seq,
                        micro_batch=micro_batch, global_batch=row["global_batch"])
    if schedule is None:
        schedule = "interleaved" if pp > 1 else "1f1b"
    chunks = _chunks(row["layers"], pp) if schedule == "interleaved" else 1
    layout = Layout(dp=gpus // (tp * pp), tp=tp, pp=pp, schedule=schedule, chunks=chunks, recompute=recompute,
                    scatter_gather=True, precision="mixed-fp16", dtype="fp16")
    return model, layout, gpus


def megatron_table(hardware: Hardware = A100_SELENE, rows: list | None = None) -> list[dict]:
    """Each row of :data:`MEGATRON_TABLE1` (or ``rows``) predicted beside the published TFLOP/s per GPU: ``params
    B``, ``tp``, ``pp``, ``dp``, ``GPUs``, ``batch``, ``m`` (micro-batches), ``chunks``, ``bubble``, ``memory
    GiB``, ``predicted``, ``published``, ``error`` (predicted / published - 1) and ``fit`` ("fit" on the row
    used to fit)."""
    rows = MEGATRON_TABLE1 if rows is None else rows
    out = []
    for i, row in enumerate(rows):
        model, layout, n = megatron_run(row)
        r = predict(model, hardware, layout, n)
        out.append({"params B": row.get("params_b", model.params / 1e9), "tp": layout.tp, "pp": layout.pp,
                    "dp": layout.dp, "GPUs": n, "batch": model.global_batch, "m": r.n_micro, "chunks": layout.chunks,
                    "bubble": r.bubble, "memory GiB": r.memory_bytes / 2 ** 30, "predicted": r.tflops_per_gpu,
                    "published": float(row["tflops"]), "error": r.tflops_per_gpu / row["tflops"] - 1,
                    "fit": "fit" if rows is MEGATRON_TABLE1 and i == FIT_ROW else ""})
    return out


def format_megatron_table(hardware: Hardware = A100_SELENE, rows: list | None = None) -> str:
    """:func:`megatron_table` as text (error in percent); print it:
    ``python -c "from labkit.capstone import published; print(published.format_megatron_table())"``."""
    table = megatron_table(hardware, rows)
    for r in table:
        r["error"] = f"{100 * r['error']:+.1f}%"
    return format_table(table, floatfmt="{:.3g}")


def fit_gemm_efficiency(row_index: int = FIT_ROW, hardware: Hardware = A100_SELENE, tol: float = 1e-4) -> float:
    """The ``gemm_efficiency`` at which the simulator predicts :data:`MEGATRON_TABLE1` row ``row_index`` exactly,
    the other constants of ``hardware`` fixed (bisection: throughput grows with the efficiency)."""
    row_index = validate_int("row_index", row_index, minimum=0, maximum=len(MEGATRON_TABLE1) - 1)
    row = MEGATRON_TABLE1[row_index]
    model, layout, n = megatron_run(row)

    def gap(eff):
        return predict(model, replace(hardware, gemm_efficiency=eff), layout, n).tflops_per_gpu - row["tflops"]

    lo, hi = 0.05, 1.0
    if gap(hi) < 0:
        raise ArgumentError(f"row {row_index} cannot be reached even at gemm_efficiency=1 with the other constants "
                            "of this hardware; check them")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def figure11_trend(hardware: Hardware = A100_SELENE, batches=(8, 128), stages=(1, 2, 4, 8)) -> dict:
    """Figure 11 of Narayanan et al. 2021: weak scaling of the non-interleaved (1F1B) pipeline, tp = 8, a model of
    128 heads, width 20480 and 3·pp layers (15B at pp = 1, 121B at pp = 8), micro-batch 1, 8·pp GPUs. Returns
    ``{batch: [TFLOP/s per GPU for each pp in stages]}``; the paper's figure falls with pp, faster at batch 8."""
    out = {}
    for batch in batches:
        out[batch] = []
        for pp in stages:
            row = {"heads": 128, "width": 20480, "layers": 3 * pp, "tp": 8, "pp": pp, "gpus": 8 * pp,
                   "global_batch": batch}
            model, layout, n = megatron_run(row, schedule="1f1b")
            out[batch].append(predict(model, hardware, layout, n).tflops_per_gpu)
    return out


def figure13_trend(hardware: Hardware = A100_SELENE, batch: int = 128,
                   grids=((2, 32), (4, 16), (8, 8))) -> dict:
    """Figure 13 of Narayanan et al. 2021: the 162.2B model (32 layers, 128 heads, width 20480) on 64 GPUs, dp = 1,
    micro-batch 1, for (tp, pp) in ``grids``. Returns ``{(tp, pp): TFLOP/s per GPU}``. The paper's peak is at
    (8, 8) and throughput falls as the degree moves from tp to pp (the bubble (pp-1)/m grows); its tp = 16 and 32
    points, which span nodes, are refused here (tp must fit in a node)."""
    out = {}
    for tp, pp in grids:
        row = {"heads": 128, "width": 20480, "layers": 32, "tp": tp, "pp": pp, "gpus": 64, "global_batch": batch}
        model, layout, n = megatron_run(row, schedule="1f1b")
        out[(tp, pp)] = predict(model, hardware, layout, n).tflops_per_gpu
    return out


if __name__ == "__main__":  # pragma: no cover
    print(format_megatron_table())
    print(f"gemm_efficiency fitted on row {FIT_ROW}: {fit_gemm_efficiency():.4f}")
