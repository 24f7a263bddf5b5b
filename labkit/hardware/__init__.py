"""Lab 09, hardware optimisation: fit the model, its hyper-parameters and its optimiser to the hardware.

Speed, each option measured against the plain fp32 step (interleaved rounds, medians):
- ``cpu``: what the processor (or GPU) can do fast, and a bf16 prediction to check by measuring.
- ``timing``: :func:`time_interleaved`, timing in interleaved rounds (A, B, A, B, ...) with per-round ratios.
- ``step``: one real training step with each option (mixed precision, channels_last, torch.compile,
  checkpointing) and the result type the experiments share.
- ``speed``: the experiments (mixed precision, channels_last, compile, batch size, checkpointing).
- ``loading``: the input pipeline (DataLoader workers, pinned memory), a timeline of load, copy and compute.

Memory, predicted and checked against measured runs:
- ``transformer``: a transformer described by its shape, and the real small model of that shape.
- ``walk``: what autograd saves for backward, found by walking the model on the meta device.
- ``memory``: the calculator (``estimate``, per rank under data/ZeRO/tensor/sequence/pipeline parallelism) and
  the largest batch for a memory budget; the formulas themselves are the shared ``labkit.memory_model``.
- ``measure``: a real run's memory (MemTracker on CPU, the allocator on a GPU) beside the prediction.

``lab`` (rank-free lab functions, exercise checks, tour), ``bench`` (``python -m labkit bench hardware``) and
``plots`` are loaded by the notebook, the tour and the command line. Lab 09 runs in one process: it has no rank
functions.
"""
from .._compat import moved_names
from .cpu import CpuInfo, cpu_info, gpu_info, predict_bf16
from .loading import DecodeLikeDataset, input_pipeline
from .measure import Measured, compare, confirm_batch, measure, peak_rows
from .memory import Estimate, Setup, estimate, largest_batch
from .speed import batch_sweep, bf16_by_isa, channels_last_speed, checkpointing, compile_speed, mixed_precision
from .step import Result, Step, make_step
from .timing import Timing, time_interleaved
from .transformer import TransformerShape, tiny_transformer

__all__ = ["CpuInfo", "cpu_info", "gpu_info", "predict_bf16", "Timing", "time_interleaved", "Step", "Result",
           "make_step", "mixed_precision", "bf16_by_isa", "channels_last_speed", "compile_speed", "batch_sweep",
           "checkpointing", "input_pipeline", "DecodeLikeDataset", "TransformerShape", "tiny_transformer", "Setup",
           "Estimate", "estimate", "largest_batch", "Measured", "measure", "compare", "confirm_batch", "peak_rows"]

# renamed in issue 30 (one release): the timer was called like lab 04's interleaved schedule
__getattr__ = moved_names(__name__, {"interleaved": "labkit.hardware.timing:time_interleaved"})
