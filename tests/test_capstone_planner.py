"""Lab 11's parallelism planner (labkit.capstone.planner): the byte and time formulas on a case small enough to work
out by hand, every reason a grid is ruled out, bad input, and a check against published Megatron-LM configurations.

The published configurations are rows of Table 1 of Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM" (arXiv 2104.04473): GPT models on DGX A100 nodes (8 x A100 80 GB,
NVLink inside a node, 8 x 200 Gb/s InfiniBand per node), sequence length 2048, vocabulary 51,200, mixed precision
with Adam, activation recomputation (the paper's FLOP count, 96·B·s·l·h² (1 + s/6h + V/16lh), includes the
recomputed forward), no ZeRO (ZeRO-3 appears only as the baseline of its Table 2). The rows below were taken from
memory of the paper and checked against public notes that reproduce Table 1 (found with the kit's code search;
NVIDIA/Megatron-LM's README confirms the vocabulary, the sequence length and the 8 x 80 GB nodes). Table 1 does
not list the micro-batch size; 1 is used here. The parameter counts are the paper's
P = 12lh²(1 + 13/12h + (V + s)/12lh), i.e. learned position embeddings (positions = 2048) and a tied head.
"""
import ast
import inspect

import pytest

from labkit._validate import ArgumentError
from labkit.capstone import planner
from labkit.capstone.planner import Candidate, Cluster, Model, evaluate, plan, rule_out, table


# ------------------------------------------------------------------------------------------------ a tiny hand case
def tiny(**kw):
    args = dict(layers=4, width=8, heads=2, seq=4, vocab=16, global_batch=8, micro_batch=1)
    return Model(**{**args, **kw})


def tiny_cluster(**kw):
    args = dict(gpus=8, gpus_per_node=4, gpu_memory_gb=1.0, intra_node_GBps=100.0, inter_node_GBps=10.0,
                peak_tflops=1.0, mfu=0.5)
    return Cluster(**{**args, **kw})


def test_tiny_case_by_hand():
    m, c = tiny(), tiny_cluster()
    # 4 layers of 12h² + 13h = 872, embedding h·v = 128, final LayerNorm 2h = 16
    assert m.params == 128 + 4 * 872 + 16 == 3632
    cand = evaluate(2, 2, 2, m, c)
    assert cand.n_micro == 4                       # 8 sequences / (dp 2 x micro-batch 1)
    # first stage: (3632 - 128)/(tp·pp) + 128/tp = 876 + 64 parameters
    assert cand.memory["params_per_gpu"] == 940
    # mixed-bf16 Adam: 2 + 2 + 12 bytes a parameter
    assert cand.memory["weights"] * 1e9 == pytest.approx(1880)
    assert cand.memory["grads"] * 1e9 == pytest.approx(1880)
    assert cand.memory["optimizer"] * 1e9 == pytest.approx(11280)
    # activations: sbh(10 + 24/t + 5as/(ht)) = 32 x 24.5 = 784 a layer, 2 layers a stage, 2 micro-batches in flight
    assert cand.memory["in_flight"] == 2
    assert cand.memory["activations"] * 1e9 == pytest.approx(3136)
    assert cand.memory["working"] == 0
    assert cand.memory_gb * 1e9 == pytest.approx(1880 + 1880 + 11280 + 3136)
    # bytes sent per GPU and step; b·s·h·2 bytes = 64
    assert cand.comm_bytes["tp"] == pytest.approx(2 * 4 * 4 * 64 * 2 * (2 - 1) / 2)  # layers/pp · m · 4 · bsh · ring
    assert cand.comm_bytes["pp"] == pytest.approx(4 * 64)        # pp = 2: each stage sends one direction
    assert cand.comm_bytes["dp"] == pytest.approx(2 * (2 - 1) / 2 * 1880)  # ring all-reduce of the gradients
    # placement (rank (d·pp + p)·tp + t, 4 GPUs a node): tp {0,1} and pp {0,2} inside a node, dp {0,4} across
    assert cand.links == {"tp": "intra", "pp": "intra", "dp": "inter"}
    assert cand.comm_seconds["tp"] == pytest.approx(2048 / 100e9)
    assert cand.comm_seconds["pp"] == pytest.approx(256 / 100e9)
    assert cand.comm_seconds["dp"] == pytest.approx(1880 / 10e9)
    # compute 6·N·tokens/(gpus·peak·mfu); bubble (p-1)/(m+p-1) = 1/5
    assert cand.compute_seconds == pytest.approx(6 * 3632 * 8 * 4 / (8 * 1e12 * 0.5))
    assert cand.bubble == pytest.approx(0.2)
    assert cand.step_seconds == pytest.approx(cand.compute_seconds / 0.8 + (2048 + 256) / 100e9 + 1880 / 10e9)
    assert cand.feasible and cand.reasons == []


def test_full_recompute_zero_and_overlap_by_hand():
    m = tiny(recompute="full", zero=1)
    cand = evaluate(2, 2, 2, m, tiny_cluster())
    assert cand.comm_bytes["tp"] == pytest.approx(2 * 4 * 6 * 64 * 2 * (2 - 1) / 2)  # recomputed forward: +2
    assert cand.compute_seconds == pytest.approx(8 * 3632 * 8 * 4 / (8 * 1e12 * 0.5))
    assert cand.memory["optimizer"] * 1e9 == pytest.approx(11280 / 2)       # ZeRO-1 over dp = 2
    assert cand.memory["activations"] * 1e9 == pytest.approx(2 * 32 * 2 * 2)  # 2sbh a layer, 2 layers, 2 in flight
    assert cand.memory["working"] * 1e9 == pytest.approx(784)                 # one layer rebuilt for its backward
    overlapped = evaluate(2, 2, 2, m, tiny_cluster(), overlap_dp=True)
    assert cand.step_seconds - overlapped.step_seconds == pytest.approx(cand.comm_seconds["dp"])


def test_pipeline_middle_stages_send_both_ways_and_bubble():
    m = tiny(global_batch=8)
    cand = evaluate(2, 4, 1, m, tiny_cluster())
    assert cand.n_micro == 4
    assert cand.comm_bytes["pp"] == pytest.approx(2 * 4 * 64)
    assert cand.comm_bytes["tp"] == 0
    assert cand.bubble == pytest.approx(3 / 7)
    assert any("bubble 43% > max_bubble 25%" in r and "m=4" in r for r in cand.reasons)
    assert rule_out(2, 4, 1, m, tiny_cluster(), max_bubble=0.5) == []
    assert evaluate(8, 1, 1, m, tiny_cluster()).bubble == 0


def test_placement_follows_tp_then_pp_then_dp():
    m = tiny(layers=8, width=16, heads=4, global_batch=16)
    c = tiny_cluster(gpus=16, gpus_per_node=8, gpu_memory_gb=80.0)
    assert evaluate(2, 2, 4, m, c).links == {"tp": "intra", "pp": "intra", "dp": "inter"}
    assert evaluate(1, 4, 4, m, c).links["pp"] == "inter"        # a pipeline of 4 stages x tp 4 spans 2 nodes
    assert evaluate(16, 1, 1, m, c).links["dp"] == "inter"
    assert evaluate(2, 1, 8, tiny(layers=8, width=16, heads=8, global_batch=16), c).links == {
        "tp": "intra", "pp": "intra", "dp": "inter"}
    one = tiny_cluster(gpus=8, gpus_per_node=8, gpu_memory_gb=80.0)
    assert set(evaluate(2, 2, 2, tiny(), one).links.values()) == {"intra"}


# ------------------------------------------------------------------------------------------- reasons to rule out
def test_reasons_each_name_their_numbers():
    c = tiny_cluster(gpu_memory_gb=80.0)
    assert any("tp=4 does not divide heads=2" in r for r in rule_out(2, 1, 4, tiny(), c))
    assert any("pp=8 > layers=4" in r for r in rule_out(1, 8, 1, tiny(), c))
    assert any("pp=4 does not divide layers=6" in r for r in rule_out(2, 4, 1, tiny(layers=6), c))
    assert any("global_batch=12 does not split into dp=8" in r for r in rule_out(8, 1, 1, tiny(global_batch=12), c))
    wide = tiny(layers=8, width=32, heads=16, global_batch=16)
    far = rule_out(1, 1, 16, wide, tiny_cluster(gpus=16, gpus_per_node=8, gpu_memory_gb=80.0))
    assert any("tensor parallel across nodes: tp=16 > 8 GPUs per node" in r for r in far)
    odd = tiny(layers=8, width=24, heads=6, global_batch=16)
    straddle = rule_out(4, 1, 3, odd, tiny_cluster(gpus=12, gpus_per_node=4, gpu_memory_gb=80.0))
    assert any("tp=3 does not divide the 4 GPUs per node" in r for r in straddle)


def test_does_not_fit_gives_need_and_budget():
    c = tiny_cluster(gpu_memory_gb=1.6e-5, headroom=0.0)      # 16,000 bytes: the 18,176 needed do not fit
    (reason,) = rule_out(2, 2, 2, tiny(), c)
    assert reason.startswith("does not fit: needs 0.0 GB per GPU of the 0.0 GB usable")
    assert "940 parameters" in reason or "9.4e-07B parameters" in reason
    assert rule_out(2, 2, 2, tiny(), tiny_cluster(gpu_memory_gb=2e-5, headroom=0.0)) == []
    # the headroom is taken off the card: 20,000 bytes less 10% is 18,000 < 18,176
    assert rule_out(2, 2, 2, tiny(), tiny_cluster(gpu_memory_gb=2e-5, headroom=0.1))[0].startswith("does not fit")


def test_grid_that_does_not_multiply_to_the_gpus_is_refused():
    with pytest.raises(ArgumentError, match=r"dp=3 × pp=1 × tp=1 = 3 ranks, but the world has 8"):
        rule_out(3, 1, 1, tiny(), tiny_cluster())
    with pytest.raises(ArgumentError, match="dp must be an int >= 1"):
        evaluate(0, 8, 1, tiny(), tiny_cluster())


def test_plan_ranks_feasible_first_by_step_time_and_lists_every_grid():
    m, c = tiny(layers=8, width=16, heads=4, global_batch=32), tiny_cluster(gpus=16, gpus_per_node=8,
                                                                            gpu_memory_gb=80.0)
    out = plan(m, c)
    grids = [(x.dp, x.pp, x.tp) for x in out]
    assert len(grids) == len(set(grids)) == 15            # ordered factorisations of 16 = 2^4 into 3: C(6, 2)
    assert all(d * p * t == 16 for d, p, t in grids)
    flags = [x.feasible for x in out]
    assert flags == sorted(flags, reverse=True) and any(flags) and not all(flags)
    feasible = [x.step_seconds for x in out if x.feasible]
    assert feasible == sorted(feasible)
    text = table(out, top=3)
    lines = text.splitlines()
    assert len(lines) == 2 + 3 and lines[0].split()[:3] == ["dp", "pp", "tp"] and "step s" in lines[0]
    assert "ok" in lines[2]
    assert "tensor parallel across nodes" in table(out[-1:])


def test_planner_does_not_import_torch():
    tree = ast.parse(inspect.getsource(planner))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("torch" in n for n in names)
    assert len(inspect.getsource(planner).splitlines()) < 400


def test_old_names_still_work_and_warn():
    """Issue 30's renames in the planner keep working one release, with a DeprecationWarning."""
    with pytest.warns(DeprecationWarning, match=r"Model\(hidden=\) is now width="), \
            pytest.warns(DeprecationWarning, match=r"Model\(ffn=\) is now ffn_width="):
        old = Model(layers=4, hidden=8, heads=2, seq=4, vocab=16, global_batch=8, ffn=32)
    assert old == tiny(ffn_width=32)
    with pytest.warns(DeprecationWarning, match=r"Model.hidden is now Model.width"):
        assert old.hidden == 8
    with pytest.warns(DeprecationWarning, match=r"Model.ffn is now Model.ffn_width"):
        assert tiny().ffn == 32  # resolved to 4 x width, as before
    cand = evaluate(2, 2, 2, tiny(), tiny_cluster())
    with pytest.warns(DeprecationWarning, match=r"Candidate.micro_batches is now Candidate.n_micro"):
        assert cand.micro_batches == cand.n_micro == 4
    with pytest.warns(DeprecationWarning, match=r"Candidate\(micro_batches=\) is now n_micro="):
        assert Candidate(2, 2, 2, micro_batches=4).n_micro == 4


# ---------------------------------------------------------------------------------------------------- bad input
MODEL_BAD = [("layers", 0), ("width", "8"), ("heads", 3), ("seq", -1), ("vocab", 1.5), ("global_batch", 0),
             ("micro_batch", 16), ("ffn_width", 0), ("params", 0), ("positions", -1), ("tied", "yes"),
             ("precision", "fp8"), ("optimizer", "lamb"), ("recompute", "some"), ("flash", 1), ("sp", None),
             ("zero", 2)]


@pytest.mark.parametrize("name,value", MODEL_BAD)
def test_bad_model_input_names_argument_and_value(name, value):
    with pytest.raises(ArgumentError) as e:
        tiny(**{name: value})
    msg = str(e.value)
    assert name in msg and (repr(value) in msg or f"got {value}" in msg), msg
    assert isinstance(e.value, ValueError)


CLUSTER_BAD = [("gpus", 0), ("gpus_per_node", 0), ("gpus", 12), ("gpu_memory_gb", 0), ("intra_node_GBps", -1.0),
               ("inter_node_GBps", float("nan")), ("peak_tflops", "312"), ("mfu", 1.5), ("mfu", 0),
               ("headroom", 1.0)]


@pytest.mark.parametrize("name,value", CLUSTER_BAD)
def test_bad_cluster_input_names_argument_and_value(name, value):
    with pytest.raises(ArgumentError) as e:
        tiny_cluster(**({name: value} if name != "gpus" or value != 12 else {"gpus": 12, "gpus_per_node": 8}))
    assert name in str(e.value) and repr(value) in str(e.value)


def test_bad_call_arguments():
    with pytest.raises(ArgumentError, match="model must be a planner.Model, got dict"):
        rule_out(8, 1, 1, {"layers": 4}, tiny_cluster())
    with pytest.raises(ArgumentError, match="cluster must be a planner.Cluster, got int"):
        evaluate(8, 1, 1, tiny(), 8)
    with pytest.raises(ArgumentError, match="cluster must be a planner.Cluster"):
        plan(tiny(), None)
    with pytest.raises(ArgumentError, match=r"max_bubble must be a number in \[0, 1\], got 2"):
        rule_out(8, 1, 1, tiny(), tiny_cluster(), max_bubble=2)
    with pytest.raises(ArgumentError, match="overlap_dp must be True or False, got 'no'"):
        evaluate(8, 1, 1, tiny(), tiny_cluster(), overlap_dp="no")
    with pytest.raises(ArgumentError, match="top must be an int >= 1, got 0"):
        table(plan(tiny(), tiny_cluster()), top=0)
    with pytest.raises(ArgumentError, match="candidates must be a list of Candidate, got str"):
        table("dp=8")
    assert table([]) == "(no rows)"
    assert isinstance(plan(tiny(), tiny_cluster())[0], Candidate)


# ---------------------------------------------------------------------- published Megatron-LM configurations
# Narayanan et al. 2021, Table 1: billions of parameters, layers, width, heads, tp, pp, GPUs, global batch
MEGATRON = [(39.1, 48, 8192, 64, 8, 2, 512, 1536),
            (76.1, 60, 10240, 80, 8, 4, 1024, 1792),
            (145.6, 80, 12288, 96, 8, 8, 1536, 2304),
            (1008.0, 128, 25600, 160, 8, 64, 3072, 3072)]
A100_NODES = dict(gpus_per_node=8, gpu_memory_gb=80.0, intra_node_GBps=300.0, inter_node_GBps=25.0,
                  peak_tflops=312.0, mfu=0.5)


def megatron(layers, width, heads, batch):
    return Model(layers=layers, width=width, heads=heads, seq=2048, vocab=51200, positions=2048,
                 global_batch=batch, micro_batch=1, precision="mixed-fp16", optimizer="adam", recompute="full")


@pytest.mark.parametrize("billions,layers,width,heads,tp,pp,gpus,batch", MEGATRON)
def test_published_megatron_configuration(billions, layers, width, heads, tp, pp, gpus, batch):
    model, cluster = megatron(layers, width, heads, batch), Cluster(gpus=gpus, **A100_NODES)
    assert model.params / 1e9 == pytest.approx(billions, rel=2e-3)
    out = plan(model, cluster)
    mine = next(c for c in out if (c.tp, c.pp) == (tp, pp))
    assert mine.feasible, mine.reasons
    assert rule_out(mine.dp, pp, tp, model, cluster) == []
    feasible = [(c.tp, c.pp) for c in out if c.feasible]
    assert (tp, pp) in feasible[:3], feasible[:5]
    # less model parallelism than published: every grid that is not ruled out for its shape is out for memory
    structural = ("does not divide", "across nodes", "> layers")
    fewer = [c for c in out if c.tp * c.pp < tp * pp and not any(s in r for r in c.reasons for s in structural)]
    assert fewer, "some grid with less model parallelism should be shaped well enough to be judged on memory"
    for c in fewer:
        assert any(r.startswith("does not fit") for r in c.reasons), (c.dp, c.pp, c.tp, c.memory_gb)
    # tensor parallelism wider than a DGX node is always refused
    wide = [c for c in out if c.tp > 8]
    assert wide and all(any("tensor parallel across nodes" in r for r in c.reasons) for c in wide)
    assert all(c.tp <= 8 for c in out if c.feasible)
