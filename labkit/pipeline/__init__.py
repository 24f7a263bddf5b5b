"""Lab 04, pipeline parallelism: one stage per rank, micro-batches, schedules and the bubble.

- ``schedules`` (pure): naive, GPipe, 1F1B, interleaved and zero-bubble (ZB-H1, and ZB-V with two chunks per rank in
  a V) action lists, validation, a simulator,
  bubble fraction and ideal speed-up (the papers' symbols: p = ``n_stages``, m = ``n_micro``, v = ``chunks``).
- ``stages``: sleeping stages (known cost, no CPU used) and ``ModelStages`` (stage ``i`` of a seeded model cut
  by :mod:`labkit.partition`'s cuts; ``"mlp"`` is :func:`labkit.models.mlp`); ``Sleep`` is the one sleeping
  autograd function (lab 05 uses it too).
- ``reference``: micro-batch splitting, the single-process reference step, and each stage timed alone
  (``stage_times``: what a device with its own compute spends on it).
- ``executor``: ``run_pipeline`` (one step on real ranks: timelines, memory, gradients) and
  ``speedup_over_naive``; its rank function ``pipeline_rank`` (isend/irecv executor) is in ``lab``.
- ``torch_pipelining``: the same step with ``torch.distributed.pipelining`` (``run_torch_pipelining``), to
  compare; its rank function ``torch_pipelining_rank`` is in ``lab``.
- ``lab``: exercise checks, the tour and the rank functions (``labkit.pipeline.lab.pipeline_rank``, ...);
  ``bench``: measured speed-ups against theory.
"""
from .._compat import moved_names
from .executor import PipelineRun, run_pipeline, speedup_over_naive
from .reference import max_grad_error, reference_step, split_batch, stage_times, time_in_process
from .schedules import (
    PLACEMENTS,
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
    placement_of,
    rank_of_stage,
    simulate,
    splits_backward,
    stage_of,
    validate,
    zb_h1,
    zb_h1_bubble,
    zb_h1_stage,
    zb_v,
)
from .stages import ModelStages, Sleep, SleepStage, SleepStages
from .torch_pipelining import run_torch_pipelining

__all__ = [
    "SCHEDULES", "Action", "naive", "gpipe", "one_f_one_b", "one_f_one_b_stage", "interleaved", "make_schedule",
    "n_chunks", "validate", "simulate", "peak_in_flight", "bubble_fraction", "ideal_speedup", "format_schedule",
    "zb_h1", "zb_h1_stage", "zb_h1_bubble", "splits_backward", "zb_v", "PLACEMENTS", "placement_of",
    "stage_of", "rank_of_stage",
    "Sleep", "SleepStage", "SleepStages", "ModelStages",
    "split_batch", "reference_step", "time_in_process", "stage_times", "max_grad_error",
    "PipelineRun", "run_pipeline", "speedup_over_naive",
    "run_torch_pipelining",
]

# Old names, one release (issue 30): SplitModel is a stage factory (ModelStages); the MLP builder is
# labkit.models.mlp (it takes the widths: the old pipeline.mlp() default is labkit.pipeline.stages.MLP_WIDTHS);
# the rank functions moved out of the package's API to labkit.pipeline.lab.
__getattr__ = moved_names(__name__, {
    "SplitModel": "labkit.pipeline.stages:ModelStages",
    "mlp": "labkit.models:mlp",
    "pipeline_rank": "labkit.pipeline.lab:pipeline_rank",
    "torch_pipelining_rank": "labkit.pipeline.lab:torch_pipelining_rank",
})
