"""Lab 04, pipeline parallelism: one stage per rank, micro-batches, schedules and the bubble.

- ``schedules`` (pure): naive, GPipe, 1F1B and interleaved action lists, validation, a simulator,
  bubble fraction and ideal speed-up.
- ``stages``: sleeping stages (known cost, no CPU used) and ``SplitModel`` (a seeded model cut by
  :mod:`labkit.partition`'s cuts); ``Sleep`` is the one sleeping autograd function (lab 05 uses it too).
- ``reference``: micro-batch splitting and the single-process reference step.
- ``executor``: ``pipeline_rank`` (isend/irecv executor with timelines and memory) and ``run_pipeline``.
- ``torch_pipelining``: the same step with ``torch.distributed.pipelining``, to compare.
- ``lab``: exercise checks and the tour; ``bench``: measured speed-ups against theory.
"""
from .executor import PipelineRun, pipeline_rank, run_pipeline, speedup_over_naive
from .reference import max_grad_error, reference_step, split_batch, time_in_process
from .schedules import (
                        SCHEDULES,
                        Action,
                        bubble_fraction,
                        format_schedule,
                        gpipe,
                        ideal_speedup,
                        interleaved,
                        make_schedule,
                        n_chunks,
                        naive,
                        one_f_one_b,
                        one_f_one_b_stage,
                        peak_in_flight,
                        simulate,
                        validate,
)
from .stages import Sleep, SleepStage, SleepStages, SplitModel, mlp
from .torch_pipelining import run_torch_pipelining, torch_pipelining_rank

__all__ = [
    "SCHEDULES", "Action", "naive", "gpipe", "one_f_one_b", "one_f_one_b_stage", "interleaved", "make_schedule",
    "n_chunks", "validate", "simulate", "peak_in_flight", "bubble_fraction", "ideal_speedup", "format_schedule",
    "Sleep", "SleepStage", "SleepStages", "SplitModel", "mlp",
    "split_batch", "reference_step", "time_in_process", "max_grad_error",
    "pipeline_rank", "PipelineRun", "run_pipeline", "speedup_over_naive",
    "torch_pipelining_rank", "run_torch_pipelining",
]
