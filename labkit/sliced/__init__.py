"""Lab 03, model parallelism: different parts of one model on different devices or ranks.

- ``models`` (pure): the small ResNet and torchvision's, flattened into one layer list; ``split_stages``
  cuts it (cuts as in :mod:`labkit.partition`); ``split_costs`` counts parameter, boundary and saved
  activation bytes exactly.
- ``stages``: :class:`StagedModel` (stages on devices in one process) and ``run_staged`` (one stage per
  rank over send/recv), both equal to the unsliced model; ``run_replicas`` (torch DDP: every rank holds it all).
- ``channels``: tensor (channel) parallelism — column- and row-parallel conv and linear layers, a
  tensor-parallel conv block, and the source article's ``SplitConvBlock`` reproduced (it does not run).
- ``article``: the source article's ``SplitConvBlock`` as published (it does not run), and its error.
- ``lab``: exercise checks and the tour.
"""
from .article import ArticleSplitConvBlock, article_block_error
from .channels import (
                       COMM_BYTES,
                       ColumnParallel,
                       RowParallel,
                       TensorParallelConvBlock,
                       channel_rank,
                       conv_block,
                       copy_to_ranks,
                       gather_channels,
                       reduce_from_ranks,
                       row_parallel_reference,
                       run_channel_checks,
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
from .stages import (
                       StagedModel,
                       recv_tensor,
                       reference_step,
                       replica_rank,
                       run_replicas,
                       run_staged,
                       send_tensor,
                       stage_rank,
)

__all__ = [
    "MODEL_NAMES", "SmallResNet", "small_resnet", "build_model", "input_shape_for", "flatten_resnet", "candidate_cuts",
    "split_stages", "param_bytes", "saved_bytes", "split_costs",
    "StagedModel", "send_tensor", "recv_tensor", "stage_rank", "reference_step", "run_staged", "replica_rank",
    "run_replicas",
    "COMM_BYTES", "copy_to_ranks", "reduce_from_ranks", "gather_channels", "scatter_channels", "shard_layer",
    "ColumnParallel", "RowParallel", "conv_block", "TensorParallelConvBlock", "ArticleSplitConvBlock",
    "article_block_error", "channel_rank", "run_channel_checks", "row_parallel_reference",
]
