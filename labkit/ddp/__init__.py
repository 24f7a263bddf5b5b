"""Lab 02, data parallelism: every rank a full replica, gradients averaged by all-reduce each step.

- ``plan`` (pure): sharded sampling as ``DistributedSampler`` does it, contiguous chunks, gradient
  buckets, and the predicted timeline of a step (ring all-reduce cost from lab 01).
- ``wrappers``: :class:`NaiveDDP`, :class:`BucketedDDP`, :class:`OverlappedDDP` written from scratch on
  one base class, and :class:`TorchDDP` (torch's DistributedDataParallel behind the same API).
- ``training``: the lab's small CNN, the digits as images, ``train_steps`` (accumulation, timelines).
- ``lab``: rank functions, exercise checks, tour; ``bench``: steps per second against torch's DDP.
"""
from .plan import (
                   MB,
                   RULES,
                   TORCH_DEFAULT_BUCKET_MB,
                   TORCH_FIRST_BUCKET_MB,
                   chunk_ranges,
                   distributed_shards,
                   local_shard,
                   model_step,
                   plan_buckets,
                   ring_allreduce_seconds,
                   torch_bucket_assignment,
                   validate_bucket_mb,
)
from .training import digits_tensors, flat_params, small_cnn, train_steps
from .wrappers import ALGORITHMS, BucketedDDP, NaiveDDP, OverlappedDDP, Timeline, TorchDDP, make_ddp

__all__ = [
    "MB", "RULES", "TORCH_FIRST_BUCKET_MB", "TORCH_DEFAULT_BUCKET_MB", "distributed_shards", "chunk_ranges",
    "local_shard", "plan_buckets", "torch_bucket_assignment", "validate_bucket_mb",
    "ring_allreduce_seconds", "model_step",
    "ALGORITHMS", "Timeline", "NaiveDDP", "BucketedDDP", "OverlappedDDP", "TorchDDP", "make_ddp",
    "small_cnn", "digits_tensors", "train_steps", "flat_params",
]
