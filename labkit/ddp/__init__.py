"""Lab 02, data parallelism: every rank a full replica, gradients averaged by all-reduce each step.

- ``plan`` (pure): sharded sampling as ``DistributedSampler`` does it, contiguous chunks, gradient
  buckets, the predicted timeline of a step (ring all-reduce cost from lab 01), and the time a recorded
  timeline spends communicating (``union_seconds``, ``exposed_seconds``).
- ``wrappers``: :class:`NaiveDDP`, :class:`BucketedDDP`, :class:`OverlappedDDP` written from scratch on
  one base class, and :class:`TorchDDP` (torch's DistributedDataParallel behind the same API); :data:`WRAPPERS`
  names them for :func:`make_ddp`.
- ``training``: the digits as images, ``train_steps`` (accumulation, timelines). The model is
  :func:`labkit.models.digits_cnn`.
- ``batchnorm``: :class:`~labkit.ddp.batchnorm.GlobalBatchNorm1d` (whole-batch statistics on any backend).
- ``lab``: rank functions, exercise checks, tour; ``bench``: steps per second against torch's DDP.
"""
from .._compat import moved_names
from .plan import (
    MB,
    RULES,
    TORCH_DEFAULT_BUCKET_MB,
    TORCH_FIRST_BUCKET_MB,
    chunk_ranges,
    distributed_shards,
    exposed_seconds,
    local_shard,
    model_step,
    plan_buckets,
    ring_allreduce_seconds,
    torch_bucket_assignment,
    union_seconds,
)
from .training import digits_tensors, flat_params, train_steps
from .training import small_cnn as small_cnn  # the old name, kept one release: it warns once, when called
from .wrappers import WRAPPERS, BucketedDDP, NaiveDDP, OverlappedDDP, Timeline, TorchDDP, make_ddp

__all__ = [
    "MB", "RULES", "TORCH_FIRST_BUCKET_MB", "TORCH_DEFAULT_BUCKET_MB", "distributed_shards", "chunk_ranges",
    "local_shard", "plan_buckets", "torch_bucket_assignment", "ring_allreduce_seconds", "model_step",
    "union_seconds", "exposed_seconds",
    "WRAPPERS", "Timeline", "NaiveDDP", "BucketedDDP", "OverlappedDDP", "TorchDDP", "make_ddp",
    "digits_tensors", "train_steps", "flat_params",
]

__getattr__ = moved_names(__name__, {
    "ALGORITHMS": "labkit.ddp.wrappers:WRAPPERS",
    "check_bucket_mb": "labkit.ddp.plan:validate_bucket_mb",
    "validate_bucket_mb": "labkit.ddp.plan:validate_bucket_mb",
})
