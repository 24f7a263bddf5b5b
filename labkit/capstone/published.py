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
- pipeline messages block the sender (``blocking_p2p``), **assumed** from Megatron-LM 2021's code, which waits for
  each batch of sends and receives before the next computation; section 5.3.2's remark that the interleaved
  schedule's extra messages cost it throughput at large batches says the same.
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

Figures reproduced as trends (:func:`figure11_trend`, :func:`figure12_trend`, :func:`figure13_trend`): Figure 11
(weak scaling of the non-interleaved pipeline at tp = 8, a 128-head width-20480 model with 3·pp layers, batch 8 and
128: throughput per GPU falls as pp grows, much faster at batch 8); Figure 12 (GPT-3 175B on 96 GPUs: the
interleaved schedule beats 1F1B, by less as the batch grows; with Figure 18, scatter/gather helps the interleaved
schedule); Figure 13 (the 162.2B model, 32 layers, on 64 GPUs: at a fixed GPU count, moving degree from tp to pp
lowers throughput; the paper's tp = 16 and 32 points span nodes, which the simulator refuses).

**Llama 3 405B on H100s** (:data:`LLAMA3_TABLE4`, :func:`llama3_table`): the same efficiencies, the H100's own peak,
HBM and links (:data:`H100_LLAMA3`); the settings each come from the Llama 3 paper or are marked assumed in
:func:`llama3_run`. Its memory is not reproduced: the simulator's activation formula (GPT-style, Korthikanti et al.
2022) times the interleaved schedule's warm-up puts more than 80 GB on the first stage of the 8K-GPU layout, which
the paper says ran without recomputation.
"""
from __future__ import annotations

from dataclasses import replace

from .._validate import ArgumentError, validate_int
from ..collectives.cost import PUBLISHED_LINKS
from ..viz import format_table
from .simulator import Hardware, Layout, Transformer, predict

__all__ = ["A100_SELENE", "MEGATRON_TABLE1", "MEGATRON_TABLE2", "FIT_ROW", "megatron_run", "megatron_table",
           "format_megatron_table", "fit_gemm_efficiency", "figure11_trend", "figure12_trend", "figure13_trend",
           "H100_LLAMA3",
           "LLAMA3_TABLE4", "llama3_run", "llama3_table", "format_published"]

_NVLINK, _IB = PUBLISHED_LINKS["NVLink (A100, 8 GPUs)"], PUBLISHED_LINKS["InfiniBand HDR (64 GPUs)"]

A100_SELENE = Hardware(
    name="A100 80GB SXM (DGX A100, Selene)", gpus_per_node=8,
    peak_flops={"fp16": 312e12, "bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    memory_bytes=80 * 2 ** 30, hbm_bytes_per_s=2.039e12,
    intra_alpha=_NVLINK["alpha"], intra_beta=_NVLINK["beta"], inter_alpha=_IB["alpha"], inter_beta=_IB["beta"],
    gemm_efficiency=0.646, attention_efficiency=0.6, memory_efficiency=0.85,
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
                    scatter_gather=True, blocking_p2p=True, precision="mixed-fp16", dtype="fp16")
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
        r["params B"] = f"{r['params B']:g}"
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


def figure12_trend(hardware: Hardware = A100_SELENE, batches=(12, 24, 36, 48, 60)) -> dict:
    """Figures 12 and 18 of Narayanan et al. 2021: GPT-3 175B (96 layers, 96 heads, width 12288) on 96 GPUs, tp = 8,
    pp = 12, dp = 1, micro-batch 1. Returns ``{"1f1b": [...], "interleaved": [...], "interleaved, no scatter/gather":
    [...]}``, TFLOP/s per GPU for each batch. The paper: the interleaved schedule (with scatter/gather) is faster,
    the gap closing as the batch grows; scatter/gather gains up to 11% (Figure 18)."""
    out = {"1f1b": [], "interleaved": [], "interleaved, no scatter/gather": []}
    for batch in batches:
        row = {"heads": 96, "width": 12288, "layers": 96, "tp": 8, "pp": 12, "gpus": 96, "global_batch": batch}
        for key, schedule in (("1f1b", "1f1b"), ("interleaved", "interleaved")):
            model, layout, n = megatron_run(row, schedule=schedule)
            out[key].append(predict(model, hardware, layout, n).tflops_per_gpu)
        out["interleaved, no scatter/gather"].append(
            predict(model, hardware, replace(layout, scatter_gather=False), n).tflops_per_gpu)
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


H100_LLAMA3 = replace(
    A100_SELENE, name="H100 80GB SXM (Grand Teton, Llama 3's RoCE cluster)",
    peak_flops={"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
    hbm_bytes_per_s=3.35e12, intra_beta=1 / 450e9, inter_beta=1 / 50e9,
    sources={**A100_SELENE.sources,
             "peak_flops": "NVIDIA H100 Tensor Core GPU datasheet, SXM: 989 TFLOP/s dense bf16 (the Llama 3 paper's "
                           "MFU uses the same: 430 TFLOP/s is 43%)",
             "memory_bytes": "H100 80GB: 80 GiB (datasheet; the Llama 3 paper, section 3.3.1: 80GB HBM3)",
             "hbm_bytes_per_s": "H100 SXM datasheet: 3.35 TB/s HBM3",
             "intra_alpha/beta": "alpha as the A100 (lab 01); 1/beta 450 GB/s each way, half of the H100's 900 GB/s "
                                 "NVLink (datasheet)",
             "inter_alpha/beta": "alpha as the A100 (NCCL's network figure, lab 01); 1/beta 50 GB/s, the 400 Gb/s "
                                 "RoCE link of each GPU (Llama 3 paper, section 3.3.1)",
             "efficiencies": "gemm, attention and memory efficiency unchanged from A100_SELENE (not refitted)"})
"""H100 constants for Llama 3's runs: the H100's own peak, HBM and links, every efficiency of :data:`A100_SELENE`."""

LLAMA3_TABLE4 = [{"gpus": 8192, "tp": 8, "cp": 1, "pp": 16, "dp": 64, "seq": 8192, "batch_each_dp": 32,
                  "tflops": 430},
                 {"gpus": 16384, "tp": 8, "cp": 1, "pp": 16, "dp": 128, "seq": 8192, "batch_each_dp": 16,
                  "tflops": 400}]
"""Llama Team 2024, "The Llama 3 Herd of Models" (arXiv 2407.21783), Table 4: Llama 3 405B's pre-training on H100s,
the two 8K-sequence rows (the 131K-context row is left out: its degrees as transcribed do not multiply to its GPU
count). TFLOP/s per GPU are model FLOPs (BF16 MFU × 989)."""


def llama3_run(row: dict, chunks: int = 2) -> tuple[Transformer, Layout, int]:
    """``(model, layout, world_size)`` for a row of :data:`LLAMA3_TABLE4`. The model (section 3.2, Table 3): 126
    layers, width 16384, 128 heads with 8 key/value heads, FFN 53248 (SwiGLU), vocabulary 128,000, rotary positions,
    untied output. The layout (section 3.3.2): tp·cp·pp·dp as the row; micro-batch 1, so n_micro = the row's batch
    per DP group; the interleaved schedule, **assumed** with 2 chunks a rank (its Figure 6 draws 2; V is not given),
    one layer fewer on the first and last chunks (its balancing); no activation recomputation at 8K; FSDP that keeps
    the weights gathered through the step (ZeRO-2's memory and messages), overlapped ("asynchronously prefetching ...
    and reducing gradients"); sequence parallel and a fused (flash) attention **assumed**; bf16."""
    model = Transformer(layers=126, width=16384, heads=128, kv_heads=8, ffn_width=53248, gated_mlp=True, tied=False,
                        positions=0, vocab=128000, seq=row["seq"], micro_batch=1,
                        global_batch=row["dp"] * row["batch_each_dp"])
    layout = Layout(dp=row["dp"], tp=row["tp"], pp=row["pp"], cp=row["cp"], zero=2, schedule="interleaved",
                    chunks=chunks, recompute="none", overlap_dp=True, sp=True, flash=True, precision="mixed-bf16",
                    dtype="bf16")
    return model, layout, row["gpus"]


def llama3_table(hardware: Hardware = H100_LLAMA3) -> list[dict]:
    """:data:`LLAMA3_TABLE4` predicted beside the published model TFLOP/s per GPU (``error``: predicted / published
    - 1), with the MFU, the bubble and the memory per GPU the simulator predicts."""
    out = []
    for row in LLAMA3_TABLE4:
        model, layout, n = llama3_run(row)
        r = predict(model, hardware, layout, n)
        out.append({"GPUs": n, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "m": r.n_micro,
                    "bubble": r.bubble, "memory GiB": r.memory_bytes / 2 ** 30, "MFU": r.mfu,
                    "predicted": r.tflops_per_gpu, "published": float(row["tflops"]),
                    "error": r.tflops_per_gpu / row["tflops"] - 1})
    return out


def format_published() -> str:
    """Every check of this module as text: Table 1 (the fitted row marked), Table 2, Llama 3 and the two figures'
    trends. ``python -c "from labkit.capstone import published; print(published.format_published())"``."""
    def pct(rows):
        return [{**r, "error": f"{100 * r['error']:+.1f}%"} for r in rows]

    f11, f12, f13 = figure11_trend(), figure12_trend(), figure13_trend()
    parts = [
        "Narayanan et al. 2021, Table 1 (A100_SELENE; gemm_efficiency fitted on the row marked 'fit'):",
        format_megatron_table(),
        "\nNarayanan et al. 2021, Table 2, PTD-P rows (same constants, nothing fitted):",
        format_megatron_table(rows=MEGATRON_TABLE2),
        "\nLlama 3 405B, Table 4, 8K-sequence rows (H100_LLAMA3: the A100's efficiencies, the H100's own hardware):",
        format_table(pct(llama3_table()), floatfmt="{:.3g}"),
        "\nFigure 11 trend (tp = 8, 1F1B, 3·pp layers; TFLOP/s per GPU for pp = 1, 2, 4, 8):",
        *(f"  batch {b:4d}: " + "  ".join(f"{x:.0f}" for x in v) for b, v in f11.items()),
        "\nFigure 12 and 18 trend (175B on 96 GPUs; TFLOP/s per GPU for batch 12, 24, 36, 48, 60):",
        *(f"  {k:31s} " + "  ".join(f"{x:.0f}" for x in v) for k, v in f12.items()),
        "\nFigure 13 trend (162.2B on 64 GPUs, batch 128; TFLOP/s per GPU):",
        "  " + "  ".join(f"(tp={t}, pp={p}): {x:.0f}" for (t, p), x in f13.items()),
    ]
    return "\n".join(parts)
