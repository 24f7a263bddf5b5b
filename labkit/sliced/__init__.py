"""Lab 03, model parallelism: different parts of one model on different devices or ranks.

- ``models`` (pure): the small ResNet and torchvision's, flattened into one layer list; ``split_stages``
  cuts it (cuts as in :mod:`labkit.partition`); ``split_costs`` counts parameter, boundary and saved
  activation bytes exactly.
- ``stages``: :class:`StagedModel` (stages on devices in one process), ``send_tensor``/``recv_tensor`` (a tensor
  of any shape between ranks) and ``unsliced_step`` (the unsliced model's step in one process, the reference);
  its rank functions ``stage_rank`` (one stage per rank over send/recv) and ``replica_rank`` (torch DDP: every
  rank holds it all) and their runners ``run_staged``, ``run_replicas`` are in ``lab``.
- ``channels``: tensor (channel) parallelism — column- and row-parallel conv and linear layers, a
  tensor-parallel conv block, ``row_parallel_reference`` (the row split in one process); its rank function
  ``channel_rank`` and runner ``run_channel_checks`` are in ``lab``.
- ``article``: the source article's ``SplitConvBlock`` as published (it does not run), and its error.
- ``lab``: exercise checks, the tour, and the rank functions and runners the notebook launches
  (``labkit.sliced.lab.stage_rank``, ...).
"""
from .._compat import moved_names
from .article import ArticleSplitConvBlock, article_block_error
from .channels import (
    COMM_BYTES,
    ColumnParallel,
    RowParallel,
    TensorParallelConvBlock,
    conv_block,
    copy_to_ranks,
    gather_channels,
    reduce_from_ranks,
    row_parallel_reference,
    scatter_channels,
    shard_layer,
)
from .models import (
    MODEL_NAMES,
    SmallResNet,
    build_model,
    candidate_cuts,
    flatten_resnet,
    input_shape_for,
    param_bytes,
    saved_bytes,
    small_resnet,
    split_costs,
    split_stages,
)
from .stages import StagedModel, recv_tensor, send_tensor, unsliced_step

__all__ = [
    "MODEL_NAMES", "SmallResNet", "small_resnet", "build_model", "input_shape_for", "flatten_resnet", "candidate_cuts",
    "split_stages", "param_bytes", "saved_bytes", "split_costs",
    "StagedModel", "send_tensor", "recv_tensor", "unsliced_step",
    "COMM_BYTES", "copy_to_ranks", "reduce_from_ranks", "gather_channels", "scatter_channels", "shard_layer",
    "ColumnParallel", "RowParallel", "conv_block", "TensorParallelConvBlock", "row_parallel_reference",
    "ArticleSplitConvBlock", "article_block_error",
]

# Old names, one release (issue 30): the unsliced step was reference_step (lab 04's reference_step is another
# thing); rank functions and notebook runners moved out of the package's API to labkit.sliced.lab.
__getattr__ = moved_names(__name__, {
    "reference_step": "labkit.sliced.stages:unsliced_step",
    "stage_rank": "labkit.sliced.lab:stage_rank",
    "replica_rank": "labkit.sliced.lab:replica_rank",
    "channel_rank": "labkit.sliced.lab:channel_rank",
    "run_staged": "labkit.sliced.lab:run_staged",
    "run_replicas": "labkit.sliced.lab:run_replicas",
    "run_channel_checks": "labkit.sliced.lab:run_channel_checks",
})
