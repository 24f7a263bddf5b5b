"""The planner on the simulator (issue 28, item 4): every layout ranked by predicted step time, the discarded ones
with their reasons, the 145.6B case."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from labkit._validate import ArgumentError
from labkit.capstone import published as P
from labkit.capstone.ranking import Ranked, grids, megatron_145b, rank_layouts, ranking_table
from labkit.capstone.simulator import Layout, Transformer, predict

SMALL = Transformer(layers=8, width=1024, heads=16, vocab=32000, seq=1024, micro_batch=1, global_batch=64)
BASE = Layout(recompute="selective", precision="mixed-bf16", dtype="bf16")


def test_grids_are_every_factorisation():
    assert sorted(grids(8)) == sorted((d, t, p) for d in (1, 2, 4, 8) for t in (1, 2, 4, 8) for p in (1, 2, 4, 8)
                                      if d * t * p == 8)
    assert len(grids(12)) == 18 and all(d * t * p * 2 == 24 for d, t, p in grids(24, cp=2))
    with pytest.raises(ArgumentError, match="cp must divide gpus=12, got cp=5"):
        grids(12, cp=5)


def test_each_layout_once_ranked_by_the_simulators_own_step_time():
    ranked = rank_layouts(SMALL, P.A100_SELENE, 16, base=BASE, schedules=("1f1b", "interleaved", "zb-h1"))
    keys = [(r.layout.dp, r.layout.tp, r.layout.pp, r.layout.zero, r.layout.schedule, r.layout.chunks) for r in ranked]
    assert len(keys) == len(set(keys))
    # every grid is there: 3 schedules (interleaved with 2 chunks), one when pp = 1; ZeRO 0 alone when dp = 1
    want = sum((1 if p == 1 else 3) * (1 if d == 1 else 4) for d, t, p in grids(16))
    assert len(ranked) == want
    feasible = [r for r in ranked if r.feasible]
    assert len(feasible) >= 10 and ranked[:len(feasible)] == feasible  # the feasible ones first
    steps = [r.step_seconds for r in feasible]
    assert steps == sorted(steps)
    for r in feasible[:6] + feasible[-3:]:  # the numbers are predict's, not a second model's
        again = predict(SMALL, P.A100_SELENE, r.layout, 16)
        assert r.step_seconds == again.step_seconds and r.memory_bytes == again.memory_bytes
    assert all(isinstance(r, Ranked) and r.result is None and math.isnan(r.step_seconds)
               for r in ranked[len(feasible):])


def test_discarded_layouts_say_why_with_numbers():
    ranked = rank_layouts(SMALL, P.A100_SELENE, 16, base=BASE)
    why = {(r.layout.dp, r.layout.tp, r.layout.pp): r.reasons for r in ranked if r.layout.zero == 0}
    assert any("tp must be <= gpus_per_node=8" in s and "tp=16" in s for s in why[(1, 16, 1)])
    assert any("n_micro must be >= pp=16" in s for s in why[(1, 1, 16)]) or \
        any("pp·chunks must be <= layers=8" in s for s in why[(1, 1, 16)])
    odd = rank_layouts(Transformer(layers=8, width=1200, heads=12, vocab=32000, seq=1024, micro_batch=1,
                                 global_batch=64), P.A100_SELENE, 12, base=BASE)
    assert any("tp must divide gpus_per_node=8, got tp=6" in s for r in odd if r.layout.tp == 6 for s in r.reasons)
    # memory: a card of 2 GiB holds the small model only when split; what is refused says by how much
    tiny_card = replace(P.A100_SELENE, memory_bytes=2 * 2 ** 30)
    ranked = rank_layouts(SMALL, tiny_card, 16, base=BASE, zero=(0, 3), headroom=0.25)
    full = [r for r in ranked if any(s.startswith("does not fit") for s in r.reasons)]
    assert full and all(r.memory_bytes > 1.5 * 2 ** 30 for r in full)
    assert "of the 1.5 GiB usable (2 GiB less 25% headroom)" in full[0].reasons[0]
    assert all(r.memory_bytes <= 1.5 * 2 ** 30 for r in ranked if r.feasible)
    assert any(r.layout.zero == 3 for r in ranked if r.feasible)  # ZeRO-3 is what makes dp alone fit


def test_uneven_layers_are_refused_unless_asked():
    ranked = rank_layouts(SMALL, P.A100_SELENE, 6, base=BASE)
    three = [r for r in ranked if r.layout.pp == 3]
    assert three and all(any("pp·chunks=3 does not divide layers=8" in s for s in r.reasons) for r in three)
    loose = rank_layouts(SMALL, P.A100_SELENE, 6, base=BASE, even_layers=False)
    assert any(r.feasible for r in loose if r.layout.pp == 3)


def test_megatron_145b_picks_the_published_layout_under_the_papers_options():
    ranked = megatron_145b()
    best = ranked[0]
    assert best.feasible and (best.layout.tp, best.layout.pp) == (8, 8) and best.layout.schedule == "interleaved"
    # the published row predicted directly gives the same step
    model, layout, gpus = P.megatron_run(P.MEGATRON_TABLE1[P.FIT_ROW])
    assert best.step_seconds == pytest.approx(predict(model, P.A100_SELENE, layout, gpus).step_seconds, rel=1e-12)
    assert "tp must be <= gpus_per_node=8" in " ".join(s for r in ranked for s in r.reasons)


def test_megatron_145b_with_zero_stages_ranks_every_stage():
    """With ZeRO allowed, sharding the optimiser state frees enough memory for less model parallelism; the
    simulator then prefers a smaller tp·pp (a prediction the paper did not test: Megatron-LM 2021 had no ZeRO)."""
    ranked = megatron_145b(zero=(0, 1, 2, 3))
    feasible = [r for r in ranked if r.feasible]
    assert {r.layout.zero for r in feasible} == {0, 1, 2, 3}
    published = next(r for r in feasible if (r.layout.tp, r.layout.pp, r.layout.zero) == (8, 8, 0)
                     and r.layout.schedule == "interleaved")
    assert feasible[0].step_seconds <= published.step_seconds
    assert feasible[0].layout.zero >= 1  # what wins needs the sharding to fit
    unsharded = replace(feasible[0].layout, zero=0)
    assert any(r.layout == unsharded and not r.feasible for r in ranked)


def test_table_and_bad_input():
    text = ranking_table(megatron_145b(), top=3)
    assert text.count("\n") == 4 and "interleaved×2" in text and "ok" in text
    with pytest.raises(ArgumentError, match="ranked must be a list of Ranked"):
        ranking_table("x")
    with pytest.raises(ArgumentError, match="top"):
        ranking_table([], top=0)
    with pytest.raises(ArgumentError, match="model must be a simulator.Transformer"):
        rank_layouts("gpt", P.A100_SELENE, 8)
    with pytest.raises(ArgumentError, match="base must be a simulator.Layout"):
        rank_layouts(SMALL, P.A100_SELENE, 8, base="1f1b")
    with pytest.raises(ArgumentError, match="schedules must be a non-empty selection"):
        rank_layouts(SMALL, P.A100_SELENE, 8, schedules=("pipedream",))
    with pytest.raises(ArgumentError, match="zero"):
        rank_layouts(SMALL, P.A100_SELENE, 8, zero=(4,))
    with pytest.raises(ArgumentError, match="headroom"):
        rank_layouts(SMALL, P.A100_SELENE, 8, headroom=1.0)
    with pytest.raises(ArgumentError, match="hardware constants missing"):
        rank_layouts(SMALL, replace(P.A100_SELENE, inter_beta=None), 8)
