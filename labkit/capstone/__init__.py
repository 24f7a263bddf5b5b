"""Lab 11, the capstone: a small transformer trained on a data × pipeline × tensor parallel mesh, equal to one process.

Builds on labs 01-04 and 09: the mesh is ``ctx.mesh(dp=, pp=, tp=)`` (:mod:`labkit.runtime.mesh`, on PyTorch's
``init_device_mesh``); lab 03's channel-parallel operators and lab 04's pipeline executor take a ``group=``.

- ``model``: the sorting task, the reference transformer (:class:`TinyGPT`), pipeline stages, one-process training.
- ``comm``: sequence-parallel operators, the vocabulary-parallel loss, and :class:`CommMeter` (bytes per group).
- ``tp``: Megatron-LM's tensor parallelism (attention by heads, MLP column then row, vocabulary-parallel
  embedding and output) with sequence parallelism as a variant; :class:`ParallelStage`, one rank's share.
- ``grid``: :func:`run_grid` trains on dp × pp × tp ranks (1F1B over pp, BucketedDDP over dp) and compares
  with one process; ``traffic``: the bytes each group should carry, term by term.
- ``torch_ref``: the same block under ``torch.distributed.tensor.parallel``.
- ``planner``: (dp, pp, tp) for a large model and cluster, with memory from lab 09's formulas and reasons.
- ``lab``: exercise checks and the tour; ``bench``: ``python -m labkit bench capstone``; ``plots``.
"""
from .comm import CommMeter, gather_seq, scatter_seq, vocab_parallel_cross_entropy
from .grid import GridRun, run_grid, validate_grid
from .model import Config, TinyGPT, build, sort_batch, stage_layers, train_single
from .tp import ParallelStage, TPBlock, VocabEmbedding, assemble
from .traffic import predict

__all__ = ["CommMeter", "gather_seq", "scatter_seq", "vocab_parallel_cross_entropy", "GridRun", "validate_grid",
           "run_grid", "Config", "TinyGPT", "build", "sort_batch", "stage_layers", "train_single", "ParallelStage",
           "TPBlock", "VocabEmbedding", "assemble", "predict"]
