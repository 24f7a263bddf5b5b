"""Lab 02: sharded sampling, the three from-scratch DDPs against single-process training and torch DDP."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

import labkit
from labkit import ddp
from labkit.ddp import (chunk_ranges, distributed_shards, local_shard, make_ddp, model_step,
                        plan_buckets)
from labkit.ddp.lab import (check_allreduce_prediction, check_average_hook, equivalence_rank,
                            feature_split_rank, mismatched_rank, timeline_rank)

TIGHT = 1e-12  # float64: only summation order separates the runs


# ----------------------------------------------------------------------------- pure logic
@pytest.mark.parametrize("n", [1, 5, 10, 11, 64])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_match_distributed_sampler(n, world_size, drop_last):
    if drop_last and n < world_size:
        with pytest.raises(ValueError, match="drop_last"):
            distributed_shards(n, world_size, drop_last=True)
        return
    for shuffle in (True, False):
        for epoch in (0, 1, 5):
            mine = distributed_shards(n, world_size, epoch, shuffle=shuffle, drop_last=drop_last, seed=7)
            for r in range(world_size):
                s = DistributedSampler(range(n), num_replicas=world_size, rank=r, shuffle=shuffle, seed=7,
                                       drop_last=drop_last)
                s.set_epoch(epoch)
                assert list(s) == mine[r]


def test_padding_dropping_and_set_epoch():
    padded = distributed_shards(10, 4, shuffle=False)
    assert [len(s) for s in padded] == [3] * 4 and sum(padded, []).count(0) == 2  # 0 and 1 are read twice
    dropped = distributed_shards(10, 4, shuffle=False, drop_last=True)
    assert sorted(sum(dropped, [])) == list(range(8))
    # the classic bug: without set_epoch the sampler yields the same order every epoch
    s = DistributedSampler(range(20), num_replicas=2, rank=0, shuffle=True)
    assert list(s) == list(s)
    s.set_epoch(1)
    assert list(s) != distributed_shards(20, 2, 0)[0]
    assert sorted(sum(distributed_shards(20, 2, 3), [])) == list(range(20))


def test_chunks_and_local_shard():
    assert chunk_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert torch.equal(local_shard(torch.arange(8), 1, 2), torch.arange(4, 8))
    with pytest.raises(ValueError, match="multiple of 3"):
        local_shard(torch.arange(8), 0, 3)
    with pytest.raises(ValueError, match="world_size <= n"):
        chunk_ranges(2, 3)
    with pytest.raises(TypeError):
        local_shard([1, 2], 0, 2)


def test_plan_buckets_and_errors():
    mib = 2 ** 20
    assert plan_buckets([mib, mib, mib], 2) == [[0, 1], [2]]
    assert plan_buckets([3 * mib, 10, 10], 1) == [[0], [1, 2]]  # an oversize tensor gets its own bucket
    assert plan_buckets([10] * 5, 1e-9) == [[i] for i in range(5)]
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bucket_mb"):
            plan_buckets([1], bad)
    with pytest.raises(TypeError, match="bucket_mb"):
        plan_buckets([1], "25")
    with pytest.raises(ValueError, match="unknown algorithm 'ring'"):
        make_ddp("ring", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="bucket_mb"):
        make_ddp("bucketed", nn.Linear(2, 2), 0)
    with pytest.raises(RuntimeError, match="labkit.launch"):
        make_ddp("naive", nn.Linear(2, 2))


def test_cost_model_overlap_helps():
    kw = dict(forward_s=0.01, backward_s=0.02, grad_bytes=40e6, world_size=4, bandwidth=2e9)
    t_no, ev_no = model_step(bucket_mb=5, overlap=False, **kw)
    t_ov, ev_ov = model_step(bucket_mb=5, overlap=True, **kw)
    assert t_ov < t_no
    assert min(e["start"] for e in ev_ov if e["kind"] == "allreduce") < 0.03  # starts during backward
    tiny, _ = model_step(bucket_mb=0.001, overlap=True, latency_s=1e-4, **kw)
    assert tiny > t_ov  # too many tiny buckets pay latency each time


def test_digits_match_sklearn():
    from sklearn.datasets import load_digits

    x, y = ddp.digits_tensors(torch.float64)
    d = load_digits()
    np.testing.assert_allclose(x.reshape(-1, 64).numpy(), d.data / 16.0)
    assert (y.numpy() == d.target).all()


# ----------------------------------------------------------------------------- distributed (gloo)
def _equivalence_all(ctx):
    out = {"default": equivalence_rank(ctx)}
    for mb in (1e-6, 0.002, 25.0):  # one tensor per bucket, a few buckets, a single bucket
        out[f"mb{mb}"] = equivalence_rank(ctx, algorithms=("bucketed", "overlapped", "torch"), bucket_mb=mb)
    for skip in (True, False):
        out[f"accum_skip{skip}"] = equivalence_rank(ctx, steps=2, accum=3, skip_sync=skip)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ddp_equals_single_process_and_torch_ddp(world_size):
    res = labkit.launch(_equivalence_all, world_size=world_size, pool=True, echo=False, timeout=200)
    for case in res[0]:
        for algo, r in res[0][case].items():
            if algo.startswith("_"):
                continue
            for rank_res in res:
                got = rank_res[case][algo]
                assert got["vs_reference"] < TIGHT, (case, algo, got["vs_reference"])
                assert got["vs_torch"] < TIGHT, (case, algo, got["vs_torch"])
                assert got["across_ranks"] == 0.0, (case, algo)
    assert res[0]["default"]["_reference_moved"] > 1e-3  # the runs really trained
    # each step reduces each gradient once; no_sync cuts the all-reduced bytes by the accumulation factor
    n_params = res[0]["default"]["naive"]["stats"]["allreduce_calls"] / 3
    assert n_params == 8
    assert res[0]["mb1e-06"]["bucketed"]["buckets"] == 8 and res[0]["mb25.0"]["bucketed"]["buckets"] == 1
    for algo in ("naive", "bucketed", "overlapped"):
        skip = res[0]["accum_skipTrue"][algo]["stats"]["allreduce_bytes"]
        sync = res[0]["accum_skipFalse"][algo]["stats"]["allreduce_bytes"]
        assert sync == 3 * skip > 0


def _bad_inputs(ctx):
    errors = {}
    m = ddp.small_cnn(4, 0)
    for name, fn in {
        "bucket": lambda: make_ddp("overlapped", m, -1),
        "algo": lambda: make_ddp("allgather", m),
        "module": lambda: make_ddp("naive", torch.zeros(3)),
        "frozen": lambda: make_ddp("naive", nn.Linear(2, 2).requires_grad_(False)),
        "mismatch": lambda: make_ddp("bucketed", ddp.small_cnn(4 + ctx.rank, 0)),
        "shards": lambda: timeline_rank(ctx, shard_sizes=[8]),
    }.items():
        try:
            fn()
            errors[name] = None
        except Exception as e:  # noqa: BLE001 - we record which error each bad input gives
            errors[name] = (type(e).__name__, str(e))
    return errors


@pytest.mark.timeout(120)
def test_bad_inputs_get_clear_errors_on_ranks():
    res = labkit.launch(_bad_inputs, world_size=2, pool=True, echo=False, timeout=60)
    for e in res:
        assert e["bucket"][0] == "ValueError" and "bucket_mb" in e["bucket"][1]
        assert e["algo"][0] == "ValueError" and "'naive'" in e["algo"][1]
        assert e["module"][0] == "TypeError" and "nn.Module" in e["module"][1]
        assert e["frozen"][0] == "ValueError"
        assert e["mismatch"][0] == "ValueError" and "differs across ranks" in e["mismatch"][1]
        assert e["shards"][0] == "ValueError" and "one size per rank" in e["shards"][1]


@pytest.mark.timeout(120)
def test_timelines_show_overlap_and_stragglers():
    def events(algo, **kw):
        return labkit.launch(timeline_rank, world_size=2, kwargs=dict(algorithm=algo, bucket_mb=0.01, **kw),
                             pool=True, echo=False, timeout=60)

    for r in events("overlapped"):
        bwd_end = max(e["end"] for e in r["events"] if e["kind"] == "backward")
        first_ar = min(e["start"] for e in r["events"] if e["kind"] == "allreduce")
        assert r["buckets"] > 1 and first_ar < bwd_end  # communication started while backward ran
    for r in events("bucketed"):
        for step in range(3):
            bwd = [e for e in r["events"] if e["kind"] == "backward"][step]
            nxt = [e for e in r["events"] if e["kind"] == "forward"][step + 1]["start"] if step < 2 else 1e99
            ars = [e for e in r["events"] if e["kind"] == "allreduce" and bwd["end"] <= e["start"] < nxt]
            assert len(ars) == r["buckets"]  # every all-reduce of this step after its backward
    slow = events("bucketed", slow_rank=1, delay_s=0.1)
    # rank 0 waits for the straggler inside its all-reduces: ~100 ms per step, 3 steps
    assert slow[0]["comm_seconds"] - slow[1]["comm_seconds"] > 0.15
    skew = events("naive", shard_sizes=[256, 8], width=32)
    assert skew[1]["comm_seconds"] > skew[0]["comm_seconds"]  # the small shard waits for the big one


@pytest.mark.timeout(120)
def test_feature_split_needs_forward_allreduce():
    res = labkit.launch(feature_split_rank, world_size=2, pool=True, echo=False)
    for r in res:
        assert r["error"] < 1e-12 and r["partial_error"] > 1.0


def _hook_good(p):
    import torch.distributed as dist

    dist.all_reduce(p.grad)
    p.grad /= dist.get_world_size()


def _hook_sum_only(p):
    import torch.distributed as dist

    dist.all_reduce(p.grad)


def _hook_stub(p):
    raise NotImplementedError


def _count_calls(sizes, mb):
    return len(plan_buckets(sizes, mb))


@pytest.mark.timeout(150)
def test_exercise_checks():
    assert check_average_hook(_hook_good).passed
    bad = check_average_hook(_hook_sum_only)
    assert bad.attempted and not bad.passed and "divide" in bad.summary()
    stub = check_average_hook(_hook_stub)
    assert not stub.attempted and not stub.passed
    assert check_allreduce_prediction(_count_calls, bucket_mbs=(0.001, 0.05, 1.0)).passed
    wrong = check_allreduce_prediction(lambda s, mb: 1, bucket_mbs=(0.001, 1.0))
    assert wrong.attempted and not wrong.passed and len(wrong.failed_cases) == 1


def test_data_parallel_on_cpu_just_runs_the_module():
    from labkit.ddp.lab import data_parallel_demo

    out = data_parallel_demo()
    assert out["same_as_module"]
    if out["gpus"] == 0:
        assert out["device_ids"] == []


@pytest.mark.timeout(200)
def test_bench_quick_prints_ratio(capsys):
    from labkit.ddp.bench import measure, ratio

    rows = measure([2], steps=3, repeats=1, width=8, local_batch=16, pool=True)
    assert {r["version"] for r in rows} == {"naive (per tensor)", "bucketed", "overlapped (hooks)", "torch DDP"}
    assert ratio(rows) > 0 and all(r["steps/s"] > 0 for r in rows)
    assert ratio(rows, "torch") == 1.0


@pytest.mark.timeout(120)
def test_mismatched_collective_ends_in_timeout():
    with pytest.raises(labkit.LaunchTimeout) as info:
        labkit.launch(mismatched_rank, world_size=2, pool=True, echo=False, timeout=3)
    assert info.value.unfinished == [0]


# ----------------------------------------------------------------------------- frozen, tied, unused (vs torch DDP)
class _Odd(nn.Module):
    """Frozen layer, frozen bias, tied weights, a parameter used in some steps only (and on some ranks only)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)  # a different start on every rank: the wrapper must broadcast rank 0's
        self.inp = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6).requires_grad_(False)        # a frozen layer
        self.mid = nn.Linear(6, 6)
        self.mid.bias.requires_grad_(False)                         # a frozen bias
        self.out = nn.Linear(6, 6, bias=False)
        self.out.weight = self.inp.weight                           # tied weights
        self.extra = nn.Linear(6, 6)                                # used in some steps only
        self.calls, self.rank = 0, 0

    def forward(self, x):
        step, self.calls = self.calls, self.calls + 1
        h = torch.tanh(self.mid(torch.tanh(self.frozen(self.inp(x)))))
        if step == 0 or (step == 2 and self.rank == 0):  # step 1: no rank uses it; step 2: rank 0 only
            h = h + self.extra(h)
        return self.out(h)


def _odd_rank(ctx, steps=4):
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(steps, 4 * ctx.world_size, 6, generator=g), torch.randn(steps, 4 * ctx.world_size, 6, generator=g)
        mine = [[(local_shard(x[s], ctx.rank, ctx.world_size), local_shard(y[s], ctx.rank, ctx.world_size))]
                for s in range(steps)]
        out = {}
        for algo in ALGORITHMS_ALL:
            for unused in (True, False):
                if algo == "torch" and not unused:
                    continue  # torch's DDP refuses unused parameters without find_unused_parameters
                model = _Odd(seed=ctx.rank)
                model.rank = ctx.rank
                w = make_ddp(algo, model, 1e-4, find_unused_parameters=unused)
                opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
                labkit.ddp.train_steps(w, opt, mine, loss_fn=nn.functional.mse_loss)
                out[(algo, unused)] = {n: p.detach().clone() for n, p in model.named_parameters()}
        rank0 = _Odd(seed=0)
        out["rank0_frozen"] = {n: p.detach().clone() for n, p in rank0.named_parameters() if not p.requires_grad}
        out["tied"] = model.out.weight is model.inp.weight
        return out
    finally:
        torch.set_default_dtype(torch.float32)


ALGORITHMS_ALL = ("naive", "bucketed", "overlapped", "torch")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 3])
def test_wrappers_match_torch_ddp_frozen_tied_unused(world_size):
    res = labkit.launch(_odd_rank, world_size=world_size, pool=True, echo=False, timeout=200)
    for r in res:
        assert r["tied"]
        ref = r[("torch", True)]
        for name, want in r["rank0_frozen"].items():  # frozen values are rank 0's everywhere (broadcast)
            assert torch.equal(ref[name], want), name
            for algo in ALGORITHMS_ALL[:3]:
                assert torch.equal(r[(algo, True)][name], want), (algo, name)
        for algo in ALGORITHMS_ALL[:3]:
            for name, p in r[(algo, True)].items():
                assert (p - ref[name]).abs().max() < 1e-12, (algo, name)
            # without find_unused_parameters an unused parameter is reduced as zeros: momentum still moves it in
            # the step where no rank used it, so `extra` drifts from torch's DDP; everything else still agrees
            z = r[(algo, False)]
            assert (z["extra.weight"] - ref["extra.weight"]).abs().max() > 1e-4, algo
            for name in ("frozen.weight", "frozen.bias", "mid.bias"):
                assert torch.equal(z[name], ref[name]), (algo, name)
    for key in res[0]:
        if isinstance(key, tuple):
            for name, p in res[0][key].items():
                for other in res[1:]:
                    assert torch.equal(p, other[key][name]), (key, name)  # replicas agree across ranks
