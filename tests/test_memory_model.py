"""The shared memory formulas (labkit.memory_model) against the papers' own figures and against real PyTorch objects."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from labkit import memory_model as mm
from labkit._validate import ArgumentError

GB = 1e9


def test_bytes_per_parameter_for_each_precision_and_optimiser():
    assert mm.bytes_per_parameter("fp32", "adam") == {"weights": 4, "grads": 4, "optimizer": 8, "total": 16}
    assert mm.bytes_per_parameter("mixed-fp16", "adam") == {"weights": 2, "grads": 2, "optimizer": 12, "total": 16}
    assert mm.bytes_per_parameter("autocast-bf16", "adamw")["total"] == 16
    assert mm.bytes_per_parameter("bf16", "adam")["total"] == 8
    assert mm.bytes_per_parameter("fp32", "sgd")["total"] == 8
    assert mm.bytes_per_parameter("fp32", "momentum")["optimizer"] == 4
    assert mm.bytes_per_parameter("mixed-bf16", "sgd")["optimizer"] == 4  # the master copy alone


@pytest.mark.parametrize("optimizer,make", [
    ("adam", lambda p: torch.optim.Adam(p, lr=1e-3)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-3)),
    ("momentum", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)),
    ("sgd", lambda p: torch.optim.SGD(p, lr=1e-2)),
])
def test_fp32_state_bytes_match_what_torch_optimisers_keep(optimizer, make):
    """Weights, gradients and optimiser state counted from the real tensors after one step: within 1%
    (Adam's per-tensor ``step`` counters are the only extra)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = make(model.parameters())
    nn.functional.cross_entropy(model(torch.randn(8, 64)), torch.randint(0, 10, (8,))).backward()
    assert sum(len(s) for s in opt.state.values()) == 0  # no state before the first step
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    want = mm.bytes_per_parameter("fp32", optimizer)
    assert weights == want["weights"] * n and grads == want["grads"] * n
    assert abs(state - want["optimizer"] * n) <= 0.01 * want["optimizer"] * n  # exact 0 for plain SGD


def test_zero_stages_reproduce_the_papers_figure_1():
    """ZeRO (Rajbhandari et al. 2019), Figure 1: 7.5B parameters on 64 GPUs, 120 -> 31.4 -> 16.6 -> 1.9 GB."""
    got = [mm.zero_bytes_each_rank(7_500_000_000, 64, s)["total"] / GB for s in range(4)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]
    psi, n = 1000, 8
    assert mm.zero_bytes_each_rank(psi, n, 1)["total"] == 4 * psi + 12 * psi / n
    assert mm.zero_bytes_each_rank(psi, n, 2)["total"] == 2 * psi + 14 * psi / n
    assert mm.zero_bytes_each_rank(psi, n, 3)["total"] == 16 * psi / n
    # one rank: every stage is plain data parallelism
    assert {mm.zero_bytes_each_rank(psi, 1, s)["total"] for s in range(4)} == {16 * psi}


def test_playbook_figures():
    """The Ultra-Scale Playbook: about 16 bytes per parameter, so 1B parameters need 16 GB and 7B 112 GB."""
    assert mm.zero_bytes_each_rank(1_000_000_000, 1, 0)["total"] / GB == 16
    assert mm.zero_bytes_each_rank(7_000_000_000, 1, 0, "autocast-bf16")["total"] / GB == 112


@pytest.mark.parametrize("layers,width,heads,vocab", [(2, 32, 4, 100), (3, 48, 6, 257)])
def test_transformer_params_equals_a_real_transformers_count(layers, width, heads, vocab):
    """h·v + L(12h² + 13h) + 2h against torch's own encoder layers (attention with biases, a 4h MLP, two
    LayerNorms), a token embedding and a final LayerNorm, the head tied to the embedding."""
    blocks = [nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width) for _ in range(layers)]
    model = nn.ModuleList([nn.Embedding(vocab, width), *blocks, nn.LayerNorm(width)])
    assert sum(p.numel() for p in model.parameters()) == mm.transformer_params(layers, width, vocab)
    assert mm.transformer_params(layers, width, vocab, tied=False) == mm.transformer_params(layers, width, vocab) \
        + width * vocab
    assert mm.transformer_params(1, width, 1, ffn_width=width) < mm.transformer_params(1, width, 1)


def test_transformer_activation_forms_agree_with_each_other():
    s, b, h, a = 2048, 1, 4096, 32
    sbh = s * b * h
    assert mm.transformer_activations(s, b, h, a) == sbh * (34 + 5 * a * s / h)
    # tensor parallelism of 1 is no parallelism, with or without sequence parallelism
    assert mm.transformer_activations(s, b, h, a, tp=1, sp=True) == mm.transformer_activations(s, b, h, a)
    t = 8
    assert mm.transformer_activations(s, b, h, a, tp=t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert mm.transformer_activations(s, b, h, a, tp=t, sp=True) == pytest.approx(sbh * (34 / t + 5 * a * s / (h * t)))
    assert mm.transformer_activations(s, b, h, a, tp=t, sp=True, recompute="selective") == pytest.approx(34 * sbh / t)
    assert mm.transformer_activations(s, b, h, a, flash=True) == mm.transformer_activations(s, b, h, a,
                                                                                           recompute="selective")
    assert mm.transformer_activations(s, b, h, a, recompute="full") == 2 * sbh
    assert mm.transformer_activations(s, b, h, a, layers=4) == 4 * mm.transformer_activations(s, b, h, a)
    assert mm.transformer_activations(s, b, h, a, bytes_per_value=4) == 2 * mm.transformer_activations(s, b, h, a)
    # sequence parallelism with selective recompute: the paper's 5x less than no recompute, on its GPT-3-like shape
    ratio = mm.transformer_activations(s, b, 12288, 96, tp=8) / mm.transformer_activations(s, b, 12288, 96, tp=8,
                                                                                         sp=True, recompute="selective")
    assert 4 < ratio < 6


def test_pipeline_in_flight():
    assert [mm.pipeline_in_flight("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert [mm.pipeline_in_flight("gpipe", s, 4, 8) for s in range(4)] == [8, 8, 8, 8]
    assert mm.pipeline_in_flight("1f1b", 0, 4, 2) == 2  # fewer micro-batches than stages


def test_old_names_still_work_and_warn():
    """Issue 30's renames keep working one release, with a DeprecationWarning naming the new spelling."""
    with pytest.warns(DeprecationWarning, match="zero_bytes_each_rank"):
        old = mm.zero_bytes_per_rank
    assert old is mm.zero_bytes_each_rank
    with pytest.warns(DeprecationWarning, match="world_size="):
        assert mm.zero_bytes_each_rank(1000, world=8, stage=1) == mm.zero_bytes_each_rank(1000, 8, 1)
    with pytest.warns(DeprecationWarning, match=r"\(hidden=\) is now width="), \
            pytest.warns(DeprecationWarning, match="ffn_width="):
        assert mm.transformer_params(2, hidden=64, vocab=100, ffn=128) == mm.transformer_params(2, 64, 100, 128)
    with pytest.warns(DeprecationWarning, match="width="):
        assert mm.transformer_activations(64, 8, hidden=64, heads=4) == mm.transformer_activations(64, 8, 64, 4)
    with pytest.warns(DeprecationWarning, match="n_stages="), pytest.warns(DeprecationWarning, match="n_micro="):
        assert mm.pipeline_in_flight("1f1b", 0, stages=4, micro_batches=8) == 4


def test_lab05s_memory_balance_uses_these_formulas():
    from labkit.balance import LayerProfile, memory_costs

    p = LayerProfile(0, "Linear", 1.0, 1.0, param_bytes=100, activation_bytes=10, output_bytes=5)
    per_param = mm.bytes_per_parameter("fp32", "adam")["total"] / 4
    assert memory_costs([p]) == [100 * per_param + 10] == [410.0]


@pytest.mark.parametrize("call,match", [
    (lambda: mm.bytes_per_parameter("fp8"), r"precision must be one of .*'fp32'.*got 'fp8'"),
    (lambda: mm.bytes_per_parameter("fp32", "lion"), r"optimizer must be one of .*'adam'.*got 'lion'"),
    (lambda: mm.zero_bytes_each_rank(10, 2, 4), r"stage must be an int in \[0, 3\], got 4"),
    (lambda: mm.zero_bytes_each_rank(10, 0, 1), r"world_size must be an int >= 1, got 0"),
    (lambda: mm.zero_bytes_each_rank(0, 2, 1), r"params must be an int >= 1, got 0"),
    (lambda: mm.transformer_activations(128, 0, 64, 4), r"micro_batch must be an int >= 1, got 0"),
    (lambda: mm.transformer_activations(128, 1, 64, 5), r"width=64 is not a multiple of heads=5"),
    (lambda: mm.transformer_activations(128, 1, 64, 4, tp=3), r"tp=3 must divide heads=4 and width=64.*\[1, 2, 4\]"),
    (lambda: mm.transformer_activations(128, 1, 64, 4, recompute="some"), r"recompute must be one of"),
    (lambda: mm.pipeline_in_flight("zigzag", 0, 2, 2), r"schedule must be one of"),
    (lambda: mm.pipeline_in_flight("1f1b", 2, 2, 2), r"stage must be an int in \[0, 1\], got 2"),
])
def test_bad_input_names_the_argument_and_the_value(call, match):
    with pytest.raises(ArgumentError, match=match):
        call()
