"""The device discipline (issue 25): a GPU's placement rules emulated on the CPU (labkit/runtime/placement.py).

The suite runs every rank under the check (the root conftest sets LABKIT_DEVICE_CHECK=1 and hides GPUs), so each
rank function a test or a notebook launches is held to the rules NCCL and CUDA enforce. These tests show the
rules themselves: what fails (a CPU tensor reaching a collective, a CPU input meeting a model on ctx.device, numpy
of a device tensor), what passes (the idioms a GPU accepts), and the three findings of the issue that only a GPU
showed before: notebook 00's graded rank function (1), ``nn.DataParallel``'s demo (2), and the suite on a GPU
machine (6).
"""
import os

import pytest
import torch

import labkit
from labkit import RankError
from labkit.runtime.placement import DeviceDiscipline, DevicePlacementError, applies_to, enabled, is_host

LABKIT_DEVICE_CHECK = True  # this module's own rank functions are held to the check too (labkit.runtime.placement)


# ------------------------------------------------------------------------------------------- in one process
def test_suite_runs_under_the_check_with_gpus_hidden():
    """Finding 6: a teacher's `bash labkit.sh test` on a GPU server picked NCCL for 1-rank launches of CPU tensors.
    The suite now hides the GPUs (unless LABKIT_TEST_CUDA=1) and runs the device check."""
    from labkit.runtime.launcher import choose_backend

    assert enabled(), "the root conftest.py must set LABKIT_DEVICE_CHECK=1 for the whole suite"
    if os.environ.get("LABKIT_TEST_CUDA") != "1":
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
        assert choose_backend(1)[0] == "gloo" and choose_backend(4)[0] == "gloo"


def test_which_rank_functions_are_held_to_it():
    from labkit.runtime.lab import hello_rank

    assert applies_to(hello_rank) and applies_to(forgot_device_rank)  # labkit's; an opted-in test module's

    def in_a_notebook(ctx):
        return None

    in_a_notebook.__module__ = "__main__"
    assert applies_to(in_a_notebook)
    in_a_notebook.__module__ = "test_launch"  # a harness that hands labkit CPU data on purpose
    assert not applies_to(in_a_notebook)


def test_host_input_to_device_model_fails_and_says_where():
    with DeviceDiscipline() as dev:
        assert str(dev) == "cpu:0"
        model = torch.nn.Linear(3, 2).to(dev)
        x = torch.randn(4, 3)  # no device: on a GPU machine this is a CPU tensor
        with pytest.raises(DevicePlacementError, match=r"linear: a host tensor of shape \(4, 3\)") as e:
            model(x)
        assert "test_device_check.py" in str(e.value) and ".to(ctx.device)" in str(e.value)
        assert model(x.to(dev)).shape == (4, 2)  # moved: fine


def test_host_model_with_device_input_fails():
    with DeviceDiscipline() as dev:
        model = torch.nn.Linear(3, 2)  # forgot .to(dev)
        with pytest.raises(DevicePlacementError, match="linear"):
            model(torch.randn(4, 3, device=dev))


def test_idioms_a_gpu_accepts_pass():
    with DeviceDiscipline() as dev:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)).to(dev)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3, generator=g).to(dev)  # drawn on the CPU, then moved
        y = model(x)
        assert y.device == dev and not is_host(y)
        y.sum().backward()
        w = model[0].weight
        assert w.grad.device == dev
        z = torch.zeros(3, device=y.device)  # follows a device tensor
        assert not is_host(z)
        assert (y * torch.tensor(2.0)).shape == y.shape  # a CPU scalar meets a device tensor: CUDA allows it
        idx = torch.tensor([0, 2])  # CPU indices into a device tensor: CUDA allows it
        assert y[idx].shape == (2, 1)
        assert y.detach().cpu().numpy().shape == (8, 1)
        assert isinstance(y.sum().item(), float) and len(y.flatten().tolist()) == 8


def test_moves_copy_as_on_a_gpu():
    with DeviceDiscipline() as dev:
        h = torch.ones(3)
        d = h.to(dev)
        assert is_host(h) and not is_host(d) and d.data_ptr() != h.data_ptr()
        back = d.cpu()
        assert is_host(back) and not is_host(d)


def test_numpy_of_a_device_tensor_fails():
    with DeviceDiscipline() as dev:
        with pytest.raises(DevicePlacementError, match=r"Call \.cpu\(\) first"):
            torch.ones(2, device=dev).numpy()
        with pytest.raises(DevicePlacementError):
            import numpy as np

            np.asarray(torch.ones(2, device=dev))
        assert torch.from_numpy(torch.ones(2).numpy()).sum().item() == 2.0


def test_data_parallel_demo_places_module_and_batch_on_the_first_gpu(monkeypatch):
    """Finding 2: on one GPU, nn.DataParallel hands the module its input on cuda:0, and on two it refuses a module
    that is not on cuda:0. A stand-in DataParallel that enforces that, on the stand-in device, fails the demo as it
    was (module and batch on the CPU) and passes it now."""
    from labkit.ddp import lab as ddp_lab

    class StrictDataParallel(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.device_ids = module, [0]
            bad = [n for n, p in module.named_parameters() if is_host(p)]
            if bad:
                raise RuntimeError(f"module must have its parameters on device_ids[0] (cuda:0): {bad[0]} is not")

        def forward(self, x):
            if is_host(x):
                raise RuntimeError("DataParallel scatters its input to cuda:0; the module got a CPU tensor")
            return self.module(x)

    monkeypatch.setattr(ddp_lab.nn, "DataParallel", StrictDataParallel)
    with DeviceDiscipline() as dev:
        out = ddp_lab.data_parallel_demo(batch=8, device=dev)
    assert out["same_as_module"] and out["max_difference"] == 0.0


# ------------------------------------------------------------------------------------------- on real ranks
def forgot_device_rank(ctx):
    """Notebook 00's graded rank function as it was (finding 1): the tensor is made on the CPU."""
    import torch.distributed as dist

    t = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def right_device_rank(ctx):
    import torch.distributed as dist

    t = torch.tensor([ctx.rank + 1.0], device=ctx.device)
    dist.all_reduce(t)
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(parts, t)
    objs = [None] * ctx.world_size
    dist.all_gather_object(objs, {"rank": ctx.rank})  # torch's own buffers, on its group's device
    return t.item(), str(ctx.device), [o["rank"] for o in objs]


def argument_rank(ctx, data):
    """A tensor handed to the rank by the parent is in host memory, as on a GPU server."""
    import torch.distributed as dist

    dist.all_reduce(data)
    return data.tolist()


def test_a_cpu_tensor_reaching_a_collective_fails_on_the_ranks():
    with pytest.raises(RankError, match=r"DevicePlacementError: dist.all_reduce: a host tensor of shape \(1,\)") as e:
        labkit.launch(forgot_device_rank, 2, echo=False, quiet=True, timeout=120)
    assert "forgot_device_rank" in str(e.value) and "No backend type associated with device type cpu" in str(e.value)


def test_the_right_placement_runs_on_the_ranks():
    got = labkit.launch(right_device_rank, 2, echo=False, quiet=True, timeout=120)
    assert [g[0] for g in got] == [3.0, 3.0]
    assert {g[1] for g in got} == {"cpu:0"}  # ctx.device is the stand-in under the check
    assert got[0][2] == [0, 1]


def test_a_launch_argument_counts_as_host_memory():
    with pytest.raises(RankError, match="the launch's arguments"):
        labkit.launch(argument_rank, 2, args=(torch.ones(2),), echo=False, quiet=True, timeout=120)


def test_the_lab_rank_functions_the_issue_named_now_pass():
    """Finding 1's rank functions, each once on 2 ranks under the check (the tour and the notebooks run the rest)."""
    from labkit.runtime.lab import max_and_sum_rank

    assert labkit.launch(max_and_sum_rank, 2, echo=False, quiet=True, timeout=120) == [(2.0, 3.0), (2.0, 3.0)]


def gloo_side_group_rank(ctx):
    """A gloo group asked for by name (as notebook 01 makes for its short timeout) takes CPU tensors on a GPU server
    too; the default group (NCCL there) still does not."""
    import torch.distributed as dist

    side = dist.new_group(backend="gloo")
    t = torch.ones(3)
    dist.all_reduce(t, group=side)
    try:
        dist.all_reduce(torch.ones(3))
    except DevicePlacementError:
        return t.tolist(), "refused on the default group"
    return t.tolist(), "accepted"


def test_a_gloo_group_by_name_takes_cpu_tensors():
    got = labkit.launch(gloo_side_group_rank, 2, echo=False, quiet=True, timeout=120)
    assert got == [([2.0, 2.0, 2.0], "refused on the default group")] * 2


def tf32_rank(ctx):
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_ranks_compute_in_full_float32_and_no_tf32_restores():
    """Finding 5: cuDNN convolutions use TF32 by default on a GPU, and the float32 equalities at 1e-5 against a CPU
    reference would not hold. Ranks start with TF32 off; labkit.devices.no_tf32 switches it off for a block."""
    from labkit.devices import no_tf32

    assert labkit.launch(tf32_rank, 2, echo=False, quiet=True, timeout=120) == [(False, False)] * 2
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with no_tf32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
