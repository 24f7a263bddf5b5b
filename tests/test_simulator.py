"""The step-time simulator (labkit.capstone.simulator) and the published runs it is checked against (pure, fast).

Small cases are checked by hand-computed values: FLOPs, kernel seconds, alpha-beta message times, the pipeline
against lab 04's ``simulate`` and its closed forms, memory against lab 09's formulas. Then Narayanan et al. 2021:
all ten rows of Table 1 within ±15% with one set of constants fitted on one row, Table 2's rows, the trends of
Figures 11 and 13, and the bad inputs.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from labkit._validate import ArgumentError
from labkit.capstone import published as P
from labkit.capstone import simulator as S
from labkit.collectives.cost import predict_time
from labkit.memory_model import transformer_activations, transformer_params, zero_bytes_each_rank
from labkit.pipeline.schedules import bubble_fraction, make_schedule, simulate, zb_h1_bubble

# a toy GPU: round numbers so that every time below can be worked out by hand
TOY = S.Hardware(name="toy", gpus_per_node=2, peak_flops={"bf16": 1e6}, memory_bytes=1e9, hbm_bytes_per_s=1e5,
                 intra_alpha=1e-3, intra_beta=1e-6, inter_alpha=1e-2, inter_beta=1e-5, gemm_efficiency=0.5,
                 attention_efficiency=0.25, memory_efficiency=0.5)
TINY = S.Transformer(layers=2, width=8, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=4)


def test_flops_by_hand():
    # per layer forward 24·B·s·h² + 4·B·s²·h = 24·16·64 + 4·4·16·8 = 26624; 2 layers × 4 passes; logits 6·B·s·h·V
    assert S.megatron_flops(4, 4, 2, 8, 16) == pytest.approx(2 * 4 * 26624 + 6 * 4 * 4 * 8 * 16) == 225280
    assert S.megatron_flops(4, 4, 2, 8, 16, recompute=False) == pytest.approx(2 * 3 * 26624 + 12288)
    assert S.model_flops(TINY, recompute=True) == pytest.approx(S.megatron_flops(4, 4, 2, 8, 16))
    w = S.layer_work(TINY, S.Layout())
    assert w["gemm_flops"] == 2 * 4 * (4 * 64 + 2 * 8 * 32) == 6144  # T = 4 tokens, f = 32
    assert w["attention_flops"] == 4 * 4 * 4 * 8 == 512
    assert w["memory_bytes"] == 22 * 4 * 8 + 4 * 4 * 32 + 13 * 2 * 4 * 4 == 1632
    assert w["logits_flops"] == 2 * 4 * 8 * 16
    half = S.layer_work(TINY, S.Layout(tp=2, dp=1))
    assert half["gemm_flops"] == 3072 and half["attention_flops"] == 256


def test_kernel_seconds_by_hand():
    fwd = 6144 / (1e6 * 0.5) + 512 / (1e6 * 0.25) + 1632 / (1e5 * 0.5)
    k = S.kernel_seconds(TINY, TOY, S.Layout())
    assert k["layer_forward"] == pytest.approx(fwd) == pytest.approx(0.046976)
    assert k["layer_backward"] == pytest.approx(2 * fwd)
    assert S.kernel_seconds(TINY, TOY, S.Layout(recompute="full"))["layer_backward"] == pytest.approx(3 * fwd)
    sel = S.kernel_seconds(TINY, TOY, S.Layout(recompute="selective"))["layer_backward"]
    assert sel == pytest.approx(2 * fwd + 512 / 2.5e5 + 13 * 2 * 16 / 5e4)  # the attention core once more


def test_alpha_beta_messages_by_hand():
    c = S.comm_seconds(TINY, TOY, S.Layout(tp=2))
    # one all-reduce of T·h = 32 two-byte values on 2 ranks: 2(n-1) alphas, 2(n-1)/n · 64 bytes
    one = 2 * 1e-3 + 64 * 1e-6
    assert one == pytest.approx(predict_time("ring", 64, 2, 1e-3, 1e-6))
    assert c["tp_layer_forward"] == pytest.approx(2 * one) and c["tp_layer_backward"] == pytest.approx(2 * one)
    assert S.comm_seconds(TINY, TOY, S.Layout(tp=2, recompute="full"))["tp_layer_backward"] == pytest.approx(4 * one)
    # data parallel over 4 GPUs, 2 a node: reduce-scatter in the node, ring across the 2 nodes on half, all-gather
    grads = 2 * transformer_params(2, 8, 16, positions=4)  # 2 bytes a gradient, the whole model on one stage
    c = S.comm_seconds(TINY, TOY, S.Layout(dp=4))
    assert c["dp"] == pytest.approx(2 * 1e-3 + grads * 1e-6 + 2 * 1e-2 + grads / 2 * 1e-5)
    assert c["links"]["dp"] == "inter"
    assert S.comm_seconds(TINY, TOY, S.Layout(dp=2))["dp"] == pytest.approx(predict_time("ring", grads, 2, 1e-3, 1e-6))
    # pipeline across nodes with scatter/gather: 64/t bytes over the card, then an all-gather over NVLink
    c = S.comm_seconds(TINY, TOY, S.Layout(tp=2, pp=2))
    assert c["links"]["pp"] == "inter"
    assert c["p2p"] == pytest.approx(1e-2 + 32 * 1e-5 + predict_time("all_gather", 64, 2, 1e-3, 1e-6))
    # ZeRO-3 over 2 ranks of one node: each gather or reduce-scatter of a layer's weights is half an all-reduce
    layer = 2 * TINY.layer_params
    c = S.comm_seconds(TINY, TOY, S.Layout(dp=2, zero=3))
    assert c["zero3_layer_forward"] == pytest.approx(1e-3 + layer / 2 * 1e-6)
    assert c["zero3_layer_backward"] == pytest.approx(2 * c["zero3_layer_forward"])
    assert S.comm_seconds(TINY, TOY, S.Layout(dp=2, zero=3, recompute="full"))["zero3_layer_backward"] == \
        pytest.approx(3 * c["zero3_layer_forward"])
    # ring attention: 2(cp-1) chunks of T·h/t values (T = b·s/cp) forward, twice that backward
    c = S.comm_seconds(TINY, TOY, S.Layout(cp=2))
    assert c["cp_layer_forward"] == pytest.approx(2 * (1e-3 + 32 * 1e-6)) and c["links"]["cp"] == "intra"
    assert c["cp_layer_backward"] == pytest.approx(2 * c["cp_layer_forward"])


def test_stage_params_add_up_to_the_model():
    assert S._stage_params(TINY, S.Layout(), 0) == transformer_params(2, 8, 16, positions=4)


def test_the_pipeline_is_lab_04s_simulate_and_its_closed_forms():
    model = S.Transformer(layers=8, width=8, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=8)
    for layout in (S.Layout(pp=4), S.Layout(pp=4, schedule="gpipe"), S.Layout(pp=2, schedule="interleaved", chunks=2),
                   S.Layout(pp=4, schedule="zb-h1")):
        r = S.predict(model, TOY, layout, world_size=layout.pp)
        sim = simulate(make_schedule(layout.schedule, layout.pp, 8, layout.chunks), r.parts["stage_forward"],
                       r.parts["stage_backward"], comm=r.parts["comm"]["p2p"])
        assert r.parts["pipeline"] == pytest.approx(sim["makespan"]) and r.bubble == pytest.approx(sim["bubble"])
        lanes = {e["lane"] for e in r.events}
        assert lanes == set(range(layout.pp)) | {f"{k} send" for k in range(layout.pp)}
        sends = [e for e in r.events if e["kind"] == "send"]
        # every message but the first stage's backwards and the last's forwards: 2 (S-1) m of them
        assert len(sends) == 2 * (layout.pp * layout.chunks - 1) * 8
        assert all(e["end"] - e["start"] == pytest.approx(r.parts["comm"]["p2p"]) for e in sends)
        assert r.step_seconds == pytest.approx(r.parts["pipeline"] + r.parts["dp_exposed"] + r.parts["optimizer"])
    # equal stages and free messages: the closed forms (p-1)/(vm+p-1) and ZB-H1's
    for name, p, m, v in (("1f1b", 4, 8, 1), ("gpipe", 4, 8, 1), ("interleaved", 4, 8, 2), ("interleaved", 4, 12, 3)):
        got = S.pipeline_makespan(name, p, m, v, [1.0] * (p * v), [2.0] * (p * v))
        assert got["bubble"] == pytest.approx(bubble_fraction(p, m, v))
    got = S.pipeline_makespan("zb-h1", 4, 8, 1, [1.0] * 4, [2.0] * 4)
    assert got["bubble"] == pytest.approx(zb_h1_bubble(4, 8, 1.0, 2.0))


def test_many_micro_batches_are_extrapolated_exactly():
    fw, bw = [1.3, 1.0, 1.0, 1.6], [2.6, 2.0, 2.0, 3.5]
    for name, m, v in (("1f1b", 70, 1), ("interleaved", 72, 2), ("zb-h1", 81, 1), ("gpipe", 67, 1)):
        p = 4 if v == 1 else 2
        got = S.pipeline_makespan(name, p, m, v, fw[:p * v], bw[:p * v], comm=0.05)
        full = simulate(make_schedule(name, p, m, v), fw[:p * v], bw[:p * v], comm=0.05)
        assert got["simulated_micro"] < m
        assert got["makespan"] == pytest.approx(full["makespan"], rel=1e-12)


def test_memory_is_lab_09s_formulas():
    model = S.Transformer(layers=8, width=64, heads=4, vocab=128, seq=32, micro_batch=2, global_batch=32)
    layout = S.Layout(dp=2, tp=2, pp=2, zero=1, recompute="full", precision="mixed-bf16")
    r = S.predict(model, replace(TOY, gpus_per_node=8), layout, world_size=8)
    params = round(S._stage_params(model, layout, 0))
    assert r.memory["states"] == zero_bytes_each_rank(params, 2, 1, "mixed-bf16")["total"]
    # 1F1B holds p micro-batches on stage 0
    assert r.memory["activations"] == 2 * transformer_activations(32, 2, 64, 4, 4, 2, False, "full")
    assert r.memory["working"] == transformer_activations(32, 2, 64, 4, 1, 2, False, "none")
    assert r.memory_bytes == r.memory["total"]
    z3 = S.predict(model, replace(TOY, gpus_per_node=8), replace(layout, zero=3), world_size=8)
    assert z3.memory["states"] == zero_bytes_each_rank(params, 2, 3, "mixed-bf16")["total"] < r.memory["states"]


def test_what_the_papers_vary_moves_the_prediction_the_right_way():
    row = P.MEGATRON_TABLE1[P.FIT_ROW]
    model, layout, n = P.megatron_run(row)
    base = S.predict(model, P.A100_SELENE, layout, n)
    plain = S.predict(model, P.A100_SELENE, replace(layout, schedule="1f1b", chunks=1), n)
    assert plain.bubble > base.bubble and plain.step_seconds > base.step_seconds  # interleaving shrinks the bubble
    zb = S.predict(model, P.A100_SELENE, replace(layout, schedule="zb-h1", chunks=1), n)
    assert zb.bubble < plain.bubble
    sel = S.predict(model, P.A100_SELENE, replace(layout, recompute="selective"), n)
    assert sel.step_seconds < base.step_seconds and sel.memory_bytes > base.memory_bytes
    assert sel.mfu > base.mfu and base.tflops_per_gpu > base.mfu * 312  # 96·... counts the recomputed forward
    nosg = S.predict(model, P.A100_SELENE, replace(layout, scatter_gather=False), n)
    assert nosg.parts["comm"]["p2p"] > base.parts["comm"]["p2p"]
    over = S.predict(model, P.A100_SELENE, replace(layout, overlap_dp=True), n)
    assert over.parts["dp_exposed"] < base.parts["dp_exposed"]
    z3 = S.predict(model, P.A100_SELENE, replace(layout, zero=3), n)
    assert z3.step_seconds > base.step_seconds and z3.memory_bytes < base.memory_bytes
    assert base.tokens_per_s == pytest.approx(2304 * 2048 / base.step_seconds)


def test_megatron_table1_within_15_percent_with_one_fitted_row():
    table = P.megatron_table()
    assert len(table) == 10
    bad = [(r["params B"], round(r["predicted"]), r["published"]) for r in table if abs(r["error"]) > 0.15]
    assert not bad, P.format_megatron_table()
    assert [i for i, r in enumerate(table) if r["fit"]] == [P.FIT_ROW]
    assert abs(table[P.FIT_ROW]["error"]) < 0.005  # the fitted row is met
    assert all(r["memory GiB"] < 80 for r in table)  # every published layout fits on an 80 GB card
    assert "error" in P.format_megatron_table().splitlines()[0]


def test_the_fitted_constant_is_reproducible():
    assert P.fit_gemm_efficiency(tol=1e-3) == pytest.approx(P.A100_SELENE.gemm_efficiency, abs=2e-3)


def test_megatron_table2_strong_scaling_with_the_same_constants():
    table = P.megatron_table(rows=P.MEGATRON_TABLE2)
    assert all(abs(r["error"]) < 0.15 for r in table), P.format_megatron_table(rows=P.MEGATRON_TABLE2)
    for first, last in ((0, 2), (3, 5)):  # more GPUs for the same batch: fewer micro-batches, a bigger bubble
        assert table[first]["predicted"] > table[last]["predicted"]


def test_figure11_trend_throughput_falls_as_pp_grows_faster_at_a_small_batch():
    got = P.figure11_trend()
    for batch in (8, 128):
        assert all(a > b for a, b in zip(got[batch], got[batch][1:])), got
    drop = {b: 1 - got[b][-1] / got[b][0] for b in got}
    assert drop[8] > 2 * drop[128] and drop[8] > 0.3


def test_figure13_trend_moving_degree_from_tp_to_pp_costs_throughput():
    got = P.figure13_trend(batch=128)
    assert got[(2, 32)] < got[(4, 16)] < got[(8, 8)]


def test_bad_inputs_name_what_to_pass():
    model = S.Transformer(layers=8, width=64, heads=8, vocab=128, seq=32, micro_batch=1, global_batch=8)
    hw = replace(TOY, gpus_per_node=8)
    with pytest.raises(ArgumentError, match=r"dp·tp·pp·cp must equal world_size=16.*= 8"):
        S.predict(model, hw, S.Layout(dp=2, tp=2, pp=2), world_size=16)
    with pytest.raises(ArgumentError, match=r"tp must be <= gpus_per_node=8.*tp=16"):
        S.predict(S.Transformer(8, 64, 16, 128, 32, 1, 8), hw, S.Layout(tp=16), world_size=16)
    with pytest.raises(ArgumentError, match=r"n_micro must be >= pp=4 .*1f1b.*n_micro=2"):
        S.predict(model, hw, S.Layout(dp=4, pp=4), world_size=16)
    S.predict(model, hw, S.Layout(dp=4, pp=4, schedule="gpipe"), world_size=16)  # GPipe runs with m < p
    with pytest.raises(ArgumentError, match=r"multiple of pp=4 for the interleaved"):
        S.predict(S.Transformer(8, 64, 8, 128, 32, 1, 6), hw, S.Layout(pp=4, schedule="interleaved", chunks=2), 4)
    with pytest.raises(ArgumentError, match=r"hardware constants missing .*peak_flops.*inter_alpha"):
        S.predict(model, S.Hardware(name="bare"), S.Layout(), world_size=1)
    with pytest.raises(ArgumentError, match=r"hardware constants missing .*peak_flops\['fp16'\]"):
        S.predict(model, hw, S.Layout(dtype="fp16"), world_size=1)
    with pytest.raises(ArgumentError, match=r"chunks=2 needs schedule='interleaved'"):
        S.Layout(chunks=2)
    with pytest.raises(ArgumentError, match=r"zero must be"):
        S.Layout(zero=4)
    with pytest.raises(ArgumentError, match=r"gemm_efficiency must be"):
        S.predict(model, replace(hw, gemm_efficiency=1.5), S.Layout(), world_size=1)
    with pytest.raises(ArgumentError, match=r"model must be a simulator.Transformer"):
        S.predict("gpt", hw, S.Layout(), world_size=1)


def test_uneven_chunks_and_other_shapes():
    assert S.chunk_layers(8, 4) == [2, 2, 2, 2]
    assert S.chunk_layers(126, 32) == [3] + [4] * 30 + [3]  # Llama 3: one layer fewer on the first and last chunks
    assert S.chunk_layers(10, 4) == [2, 3, 3, 2] and sum(S.chunk_layers(105, 70)) == 105
    gpt = S.Transformer(layers=2, width=8, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=4)
    assert gpt.matmul_params == 12 * 64 and gpt.params == transformer_params(2, 8, 16, positions=4)
    # grouped-query attention and a gated MLP: Q and the output h², K and V h·(kv·h/heads) each, three h·f matrices
    llama = S.Transformer(layers=2, width=8, heads=4, kv_heads=2, ffn_width=24, gated_mlp=True, vocab=16, seq=4,
                          micro_batch=1, global_batch=4, tied=False, positions=0)
    assert llama.matmul_params == 64 + 2 * 8 * 4 + 64 + 3 * 8 * 24
    per_layer_token = 2 * llama.matmul_params + 4 * 4 * 8  # weights, then attention 4·s·h
    assert S.model_flops(llama) == pytest.approx(3 * 4 * 4 * 2 * per_layer_token + 6 * 16 * 8 * 16)
    model, _, _ = P.llama3_run(P.LLAMA3_TABLE4[0])
    assert model.params == pytest.approx(405e9, rel=0.01)


def test_llama3_on_h100_with_the_same_efficiencies():
    table = P.llama3_table()
    assert all(abs(r["error"]) < 0.15 for r in table), table
    assert table[1]["predicted"] < table[0]["predicted"]  # the paper's 41% on 16K GPUs against 43% on 8K: fewer
    assert table[1]["bubble"] > table[0]["bubble"]        # micro-batches per DP group, a bigger bubble
    for name in ("gemm_efficiency", "attention_efficiency", "memory_efficiency"):
        assert getattr(P.H100_LLAMA3, name) == getattr(P.A100_SELENE, name)


def test_figure12_and_18_trend_interleaving_helps_less_as_the_batch_grows():
    got = P.figure12_trend()
    gain = [i / o - 1 for i, o in zip(got["interleaved"], got["1f1b"])]
    assert all(g > 0 for g in gain) and all(a > b for a, b in zip(gain, gain[1:])), got
    assert all(sg > no for sg, no in zip(got["interleaved"], got["interleaved, no scatter/gather"]))


def test_blocking_messages_hold_the_sender():
    model = S.Transformer(layers=8, width=8, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=8)
    free = S.predict(model, TOY, S.Layout(pp=4), world_size=4)
    held = S.predict(model, TOY, S.Layout(pp=4, blocking_p2p=True), world_size=4)
    p2p = free.parts["comm"]["p2p"]
    assert held.parts["stage_forward"][:3] == pytest.approx([f + p2p for f in free.parts["stage_forward"][:3]])
    assert held.parts["stage_backward"][0] == pytest.approx(free.parts["stage_backward"][0])
    assert held.step_seconds > free.step_seconds


def test_the_stated_settings_of_the_megatron_rows():
    runs = [P.megatron_run(row) for row in P.MEGATRON_TABLE1]
    assert [layout.chunks for _, layout, _ in runs] == [1, 1, 1, 1, 2, 3, 2, 2, 3, 2]
    assert all(layout.schedule == ("interleaved" if layout.pp > 1 else "1f1b") for _, layout, _ in runs)
    assert all(layout.recompute == "full" and layout.scatter_gather and layout.blocking_p2p and not layout.overlap_dp
               and model.micro_batch == 1 and model.seq == 2048 and model.vocab == 51200 for model, layout, _ in runs)
    # the parameter counts come out as the table's (its equation 2)
    for (model, _, _), row in zip(runs, P.MEGATRON_TABLE1):
        assert model.params / 1e9 == pytest.approx(row["params_b"], rel=0.03)


def test_experts_and_expert_parallelism_by_hand():
    """A mixture of experts: FLOPs of top_k experts per token, every expert stored and split over ep, two
    all-to-alls each way per layer with an all-gather's terms, the experts' gradients reduced over dp/ep."""
    h, f, E, k = 8, 32, 4, 2
    moe = S.Transformer(layers=2, width=h, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=8, experts=E,
                        top_k=k)
    dense = S.Transformer(layers=2, width=h, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=8)
    assert moe.expert_ffn_width == f and moe.active_ffn_width == k * f
    # per layer: every expert's two matrices and biases, the router; the attention and LayerNorms as dense
    assert moe.layer_params - dense.layer_params == E * (2 * h * f + f + h) + h * E - (2 * h * f + f + h)
    assert moe.params - dense.params == 2 * (moe.layer_params - dense.layer_params)
    assert moe.matmul_params - dense.matmul_params == (k - 1) * 2 * h * f + h * E
    one = S.Transformer(layers=2, width=h, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=8, experts=1)
    assert one.matmul_params == dense.matmul_params + h  # one expert, top-1: a dense MLP and a one-column router
    # all-to-alls: T·k·h values of 2 bytes each way, over the ep group; inside a node of 2 (TOY), across at ep = 4
    T = 4
    rows = T * k * h * 2
    c = S.comm_seconds(moe, TOY, S.Layout(dp=2, ep=2))
    assert c["ep_layer_forward"] == pytest.approx(2 * (1 * 1e-3 + rows / 2 * 1e-6))
    assert c["ep_layer_backward"] == pytest.approx(c["ep_layer_forward"])
    assert c["links"]["ep"] == "intra"
    c4 = S.comm_seconds(moe, TOY, S.Layout(dp=4, ep=4, recompute="full"))
    assert c4["links"]["ep"] == "inter"
    assert c4["ep_layer_forward"] == pytest.approx(2 * (3 * 1e-2 + rows * 3 / 4 * 1e-5))
    assert c4["ep_layer_backward"] == pytest.approx(2 * c4["ep_layer_forward"])
    assert S.comm_seconds(moe, TOY, S.Layout(dp=2))["ep_layer_forward"] == 0.0
    # storage: the experts split over ep, the rest not
    split = S.memory_each_gpu(moe, S.Layout(dp=4, ep=4), 1)["states"]
    whole = S.memory_each_gpu(moe, S.Layout(dp=4, ep=1), 1)["states"]
    per_param = 16  # mixed-bf16 Adam, ZeRO 0: 2 weights, 2 gradients, 12 optimiser (fp32 master, m, v)
    assert whole - split == pytest.approx(per_param * 2 * moe.expert_params * (1 - 1 / 4), rel=1e-9)
    # the experts' gradients go over dp/ep = 1 GPU: nothing; the dense ones over all 4
    grads_dense = 2 * (moe.params - 2 * moe.expert_params)
    c = S.comm_seconds(moe, TOY, S.Layout(dp=4, ep=4))
    assert c["dp"] == pytest.approx(2 * 1e-3 + grads_dense * 1e-6 + 2 * 1e-2 + grads_dense / 2 * 1e-5)
    # predict carries the all-to-alls into the layers' time
    a = S.predict(moe, TOY, S.Layout(dp=4, ep=4), 4)
    b = S.predict(moe, TOY, S.Layout(dp=4, ep=1), 4)
    assert a.parts["stage_forward"][0] - b.parts["stage_forward"][0] == pytest.approx(2 * c4["ep_layer_forward"])


def test_experts_bad_input():
    with pytest.raises(ArgumentError, match="top_k must be an int in \\[1, 4\\], got 5"):
        S.Transformer(layers=2, width=8, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=8, experts=4, top_k=5)
    with pytest.raises(ArgumentError, match="experts must be"):
        S.Transformer(layers=2, width=8, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=8, experts=-1)
    moe = S.Transformer(layers=2, width=8, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=8, experts=6)
    with pytest.raises(ArgumentError, match="ep must divide experts=6 and dp=4 .* got ep=4"):
        S.predict(moe, TOY, S.Layout(dp=4, ep=4), 4)
    with pytest.raises(ArgumentError, match="ep=2 needs a mixture of experts"):
        S.predict(TINY, TOY, S.Layout(dp=2, ep=2), 2)
