"""``python -m labkit bench context_expert`` (lab 12): what the bench measures agrees with the formulas (bytes equal
``ring_bytes`` and ``all_to_all_bytes``, pair counts equal ``work_each_rank``, activation memory per rank 1/cp of one
process); timings are never asserted (a loaded machine must not fail these). One small run of the bench's launches
on 1, 2 and 4 ranks serves the table tests."""
from __future__ import annotations

import pytest
import torch

from labkit.context_expert import bench, ring
from labkit.context_expert.moe import capacity, route

RING = dict(seq=64, heads=2, head_dim=8, batch=1)
MOE = dict(tokens=96, width=8, ffn=16, experts=4, k=2, cf=1.25)
_CACHE: dict = {}


def _runs() -> dict:
    if "runs" not in _CACHE:
        _CACHE["runs"] = bench.measure(world_sizes=(2, 4), rounds=1, steps=1, ring_cfg=RING, moe_cfg=MOE,
                                       mem_seqs=(32, 64), timeout=240, log=lambda *a: None)
    return _CACHE["runs"]


@pytest.mark.slow
def test_ring_rows_bytes_and_pairs_equal_the_formulas():
    rows = bench.ring_rows(_runs(), RING)
    assert [(r["cp"], r["layout"]) for r in rows] == [(1, "sdpa, 1 proc"), (1, "ring, 1 rank"), (2, "contiguous"),
                                                      (2, "zigzag"), (4, "contiguous"), (4, "zigzag")]
    for r in rows[2:]:
        cp = r["cp"]
        assert r["= ring_bytes"] == "yes"
        want = ring.ring_bytes(1, 2, 64, 8, cp, 4)
        assert r["sent fwd kB"] * 1e3 == pytest.approx(want["forward"]) and \
            r["bwd kB"] * 1e3 == pytest.approx(want["backward"])
        work = ring.work_each_rank(64, cp, r["layout"])
        assert r["pairs per rank"] == " ".join(map(str, work))
        assert r["pairs max/min"] == (1 if r["layout"] == "zigzag" else cp)   # contiguous: the last rank does cp x
        assert r["compute max ms"] >= r["min ms"] > 0 and r["step ms"] > 0   # measured, not compared
        assert r["alone max/min"] >= 1
    # every rank of a launch sent the same bytes
    for cp in (2, 4):
        for lay in ring.LAYOUTS:
            assert len({str(x["ring"][lay]["sent"]) for x in _runs()[cp][0]}) == 1


@pytest.mark.slow
def test_memory_per_rank_is_one_over_cp():
    rows = bench.memory_rows(_runs())
    assert sorted((r["seq"], r["cp"]) for r in rows) == [(s, c) for s in (32, 64) for c in (1, 2, 4)]
    for r in rows:
        assert r["vs 1 proc"] == pytest.approx(1 / r["cp"], rel=0.05), r
        assert r["= ring_bytes"] == "yes"
        assert (r["ring sent kB"] == 0) == (r["cp"] == 1)


@pytest.mark.slow
def test_moe_all_to_all_bytes_counted_equal_the_formula():
    rows = bench.moe_rows(_runs())
    assert [r["ranks"] for r in rows] == [1, 2, 4]
    for r in rows[1:]:
        assert r["= all_to_all_bytes"] == "yes", r
        assert r["a2a fwd kB (rank 0)"] == r["bwd kB"] == r["formula kB"] > 0
        assert r["index kB"] > 0   # the split sizes and expert indices, counted apart
    for ws in (2, 4):
        for x in _runs()[ws][0]:
            m = x["moe"]
            assert m["counted"]["forward"] == m["counted"]["backward"] == m["formula"] == m["sent_attr"]
            # a rank's dispatch rows and the combine rows it sends back add up over the ranks
        assert sum(x["moe"]["rows"]["dispatch"] for x in _runs()[ws][0]) == \
            sum(x["moe"]["rows"]["combine"] for x in _runs()[ws][0])


def test_drop_rows_follow_route_and_capacity():
    g = torch.Generator().manual_seed(0)
    logits = {0.0: torch.randn(64, 4, generator=g) * 3, 0.01: torch.randn(64, 4, generator=g) * 0.1}
    rows = bench.drop_rows(logits, factors=(0.5, 1.0, 4.0))
    assert len(rows) == 2 * 2 * 3
    for r in rows:
        lg = logits[float(r["router"].split()[1])]
        assert r["capacity C"] == capacity(64, 4, r["k"], r["capacity factor"])
        assert r["dropped"] == route(lg, r["k"], r["capacity factor"]).dropped
        if r["capacity factor"] == 4.0:   # C = k·T: nothing can be dropped
            assert r["dropped"] == 0
    half = [r for r in rows if r["capacity factor"] == 0.5]
    assert all(r["dropped"] >= r["k"] * 64 / 2 for r in half)   # at most half the assignments fit


def test_count_all_to_all_counts_only_other_ranks_and_restores(monkeypatch):
    import torch.distributed as dist

    from labkit.context_expert.measure import count_all_to_all

    calls = []
    monkeypatch.setattr(dist, "all_to_all_single", lambda *a, **k: calls.append(a))
    before = dist.all_to_all_single
    with count_all_to_all(world_size=3, rank=1) as count:
        dist.all_to_all_single(torch.empty(6, 4), torch.zeros(6, 4), [2, 2, 2], [1, 3, 2])
        dist.all_to_all_single(torch.empty(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
        count.phase = "backward"
        dist.all_to_all_single(torch.empty(6, 4), torch.zeros(6, 4), [1, 3, 2], [2, 2, 2])
    assert count.bytes == {"forward": (1 + 2) * 4 * 4, "forward meta": 2 * 8, "backward": (2 + 2) * 4 * 4}
    assert len(calls) == 3 and dist.all_to_all_single is before


def test_torch_cp_comparison_says_why_it_is_skipped_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out: list = []
    assert bench.torch_cp_compare(log=out.append) == 0
    assert "SKIPPED: no CUDA GPU here" in out[0] and "flash, memory-efficient and cuDNN" in out[0]
    assert bench.main(["--torch-cp-only"]) == 0


def test_main_refuses_bad_arguments():
    for argv in (["--rounds", "0"], ["--seq", "100"], ["--steps", "0"], ["--balance-steps", "0"]):
        with pytest.raises(SystemExit):
            bench.main(argv)


@pytest.mark.slow
def test_main_quick_prints_every_table(capsys):
    assert bench.main(["--quick", "--rounds", "1", "--steps", "1", "--seq", "64", "--balance-steps", "10"]) == 0
    out = capsys.readouterr().out
    for text in ("1. Ring attention", "2. Activation memory", "3. Mixture of experts", "Tokens per expert",
                 "Dropped assignments", "= ring_bytes", "= all_to_all_bytes"):
        assert text in out, text
    assert " NO" not in out
