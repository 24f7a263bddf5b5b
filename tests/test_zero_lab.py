"""Lab 10's exercise checks pass the answers and fail the shortcuts; its figures draw."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from labkit.zero import lab, plots  # noqa: E402


def zero1_step(params_flat, grads_flat, shard, optimizer):  # the notebook's answer
    import torch
    import torch.distributed as dist
    world = dist.get_world_size()
    mine = torch.empty_like(shard)
    dist.reduce_scatter_tensor(mine, grads_flat)
    shard.grad = mine / world
    optimizer.step()
    dist.all_gather_into_tensor(params_flat, shard.detach())


def naive_step(params_flat, grads_flat, shard, optimizer):  # right answer, 3 Psi per step
    import torch.distributed as dist
    world, rank, n = dist.get_world_size(), dist.get_rank(), shard.numel()
    dist.all_reduce(grads_flat)
    shard.grad = grads_flat[rank * n:(rank + 1) * n] / world
    optimizer.step()
    dist.all_gather_into_tensor(params_flat, shard.detach())


def summed_step(params_flat, grads_flat, shard, optimizer):  # forgets to average
    import torch
    import torch.distributed as dist
    mine = torch.empty_like(shard)
    dist.reduce_scatter_tensor(mine, grads_flat)
    shard.grad = mine
    optimizer.step()
    dist.all_gather_into_tensor(params_flat, shard.detach())


def stub(*args):
    raise NotImplementedError


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_zero1_check_passes_the_answer_and_fails_the_shortcuts():
    assert lab.check_zero1_step(zero1_step).passed
    naive = lab.check_zero1_step(naive_step)
    assert not naive.passed and [c.name for c in naive.failed_cases] == ["2 ranks: at most 2Ψ moved per step"]
    summed = lab.check_zero1_step(summed_step, world_sizes=(2,))
    assert not summed.passed and "differ from DDP" in summed.failed_cases[0].detail
    idle = lab.check_zero1_step(lambda *a: None, world_sizes=(2,))
    assert not idle.passed and "did not change" in idle.failed_cases[0].detail
    assert not lab.check_zero1_step(stub).attempted


def bytes_each_rank(params, world_size, stage):  # the notebook's answer
    weights, grads, state = 4 * params, 4 * params, 8 * params
    return (weights / (world_size if stage >= 3 else 1) + grads / (world_size if stage >= 2 else 1)
            + state / (world_size if stage >= 1 else 1))


def test_memory_check_passes_the_answer_and_refuses_the_library():
    assert lab.check_memory_each_rank(bytes_each_rank).passed
    assert not lab.check_memory_each_rank(lambda p, n, s: 16 * p / n).passed      # everything sharded at every stage
    from labkit.memory_model import zero_bytes_each_rank
    refused = lab.check_memory_each_rank(lambda p, n, s: zero_bytes_each_rank(p, n, s, "fp32", "adam")["total"])
    assert not refused.passed and all("formulas" in c.detail for c in refused.failed_cases)
    assert not lab.check_memory_each_rank(stub).attempted
    assert zero_bytes_each_rank(10, 2, 1)["total"] > 0  # usable again afterwards


def test_figures_draw_and_refuse_bad_input():
    import matplotlib.pyplot as plt
    for stage in range(4):
        ax = plots.holdings(stage, 3)
        assert len(ax.patches) == 3 * 3 * 2
    ax = plots.bytes_each_rank({"ddp": {"weights": 8, "grads": 8, "optimizer": 16, "buffers": 8},
                                "zero1": {"weights": 8, "grads": 8, "optimizer": 8}},
                               predicted={"ddp": 32, "zero1": 24}, unit=1)
    # a bar is everything the rank holds, buffers included, and its label says the same number
    assert ax.bar_totals == {"ddp": 40, "zero1": 24}
    assert [t.get_text() for t in ax.texts] == ["40", "24"]
    assert "buffers (flat buckets, ...)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plots.state_each_rank({"zero1": [124, 124, 124], "zero-torch": [154, 132, 84]})
    plt.close("all")
    with pytest.raises(Exception, match="stage"):
        plots.holdings(4)
