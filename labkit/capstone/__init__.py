"""Lab 11, the capstone: a small transformer trained on a data × pipeline × tensor mesh, equal to one process.

Builds on labs 01-04 and 09: the mesh is ``ctx.mesh(dp=, pp=, tp=)`` (:mod:`labkit.runtime.mesh`, on PyTorch's
``init_device_mesh``); lab 03's channel-parallel operators and lab 04's pipeline executor take a ``group=``. The grid
also takes a fourth dimension, ``cp`` (context parallelism), with an attention that crosses the cp group handed in
by lab 12 (:mod:`labkit.context_expert.cp_grid`).

- ``model``: the sorting task, the reference transformer (:class:`TinyGPT`, its causal :func:`attend`), pipeline
  stages, one-process training and its accuracy.
- ``comm``: sequence-parallel operators, the vocabulary-parallel loss, :class:`CommMeter` (bytes per group) and
  :func:`wire_bytes` (what a ring algorithm sends for a payload).
- ``tp``: Megatron-LM's tensor parallelism (attention by heads, MLP column then row, vocabulary-parallel
  embedding and output) with sequence parallelism as a variant; :class:`ParallelStage`, one rank's share.
- ``grid``: :func:`run_grid` trains on dp × pp × tp ranks (1F1B over pp, BucketedDDP over dp) and compares
  with one process; :func:`choose_n_micro`, the micro-batches per replica. ``traffic``: the bytes each group
  should carry, term by term (:func:`predict`).
- ``torch_impl``: torch's implementation, the same block under ``torch.distributed.tensor.parallel``.
- ``planner``: (dp, pp, tp) for a large model and cluster, with memory from lab 09's formulas and reasons
  (exported as the module: ``planner.Model``, ``planner.Cluster``, ``planner.plan``, ``planner.table``): the
  first-order estimate by hand. ``simulator``: one step's timeline from FLOPs, bytes and links; ``published``: the
  runs it is checked against; ``ranking``: :func:`rank_layouts`, every layout ranked by the simulator.
- ``lab``: the rank functions (``train_rank``, ``compare_block_rank``), the argument validator ``validate_grid``,
  exercise checks and the tour; ``bench``: ``python -m labkit bench capstone``; ``plots``.
"""
from .._compat import moved_names
from . import planner, published, ranking, simulator
from .comm import CommMeter, gather_seq, scatter_seq, vocab_parallel_cross_entropy, wire_bytes
from .grid import GridRun, choose_n_micro, run_grid
from .model import Config, TinyGPT, attend, build, sort_batch, sorted_accuracy, stage_layers, train_single
from .ranking import rank_layouts, ranking_table
from .tp import ParallelStage, TPBlock, VocabEmbedding, assemble
from .traffic import predict

__all__ = ["CommMeter", "gather_seq", "scatter_seq", "vocab_parallel_cross_entropy", "wire_bytes", "GridRun",
           "run_grid", "choose_n_micro", "Config", "TinyGPT", "attend", "build", "sort_batch", "sorted_accuracy",
           "stage_layers", "train_single", "ParallelStage", "TPBlock", "VocabEmbedding", "assemble", "predict",
           "planner", "simulator", "published", "ranking", "rank_layouts", "ranking_table"]

# renamed in issue 30 (one release); validators are not exported (labkit.capstone.lab imports validate_grid)
__getattr__ = moved_names(__name__, {"check_grid": "labkit.capstone.grid:validate_grid",
                                     "validate_grid": "labkit.capstone.grid:validate_grid"})
