"""Lab 08's factors and one trial: losses and penalties against their definitions and torch's own, L2 versus
decoupled weight decay, augmentations, Factor and Recipe errors, a learner's factor through cloudpickle, and
run_trial's determinism."""
from __future__ import annotations

import math

import cloudpickle
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labkit._validate import ArgumentError
from labkit.ablation import factors as fx
from labkit.ablation import training as tr

torch.set_num_threads(1)


def _logits(n=12, c=5, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


# ----------------------------------------------------------------------------- losses
def test_cross_entropy_soft_one_hot_equals_hard_and_definition():
    z, y = _logits()
    hard = fx.cross_entropy(z, y)
    assert torch.allclose(hard, F.cross_entropy(z, y))
    assert torch.allclose(fx.cross_entropy(z, F.one_hot(y, 5).double()), hard, atol=1e-12)
    q = torch.softmax(torch.randn(12, 5, dtype=torch.float64), 1)
    p = torch.softmax(z, 1).numpy()
    expect = -np.mean([sum(q[i, c] * math.log(p[i, c]) for c in range(5)) for i in range(12)])
    assert float(fx.cross_entropy(z, q)) == pytest.approx(expect, rel=1e-10)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_torch(eps):
    z, y = _logits(seed=1)
    assert torch.allclose(fx.label_smoothing(z, y, eps), F.cross_entropy(z, y, label_smoothing=eps), atol=1e-12)
    assert torch.allclose(fx.label_smoothing(z, F.one_hot(y, 5).double(), eps),
                          F.cross_entropy(z, y, label_smoothing=eps), atol=1e-12)


def test_focal_definition_and_gamma_zero_is_cross_entropy():
    z, y = _logits(seed=2)
    assert torch.allclose(fx.focal_loss(z, y, gamma=0.0), F.cross_entropy(z, y), atol=1e-12)
    q = torch.softmax(torch.randn(12, 5, dtype=torch.float64), 1)
    assert torch.allclose(fx.focal_loss(z, q, gamma=0.0), fx.cross_entropy(z, q), atol=1e-12)
    p = torch.softmax(z, 1)
    expect = -torch.stack([(1 - p[i, y[i]]) ** 2 * torch.log(p[i, y[i]]) for i in range(12)]).mean()
    assert torch.allclose(fx.focal_loss(z, y, gamma=2.0), expect, atol=1e-12)
    assert fx.focal_loss(z, y, gamma=2.0) < F.cross_entropy(z, y)  # the focal factor only shrinks


@pytest.mark.parametrize("gamma,alpha", [(0.0, -1), (2.0, 0.25), (1.5, 0.6)])
def test_binary_focal_equals_torchvision(gamma, alpha):
    from torchvision.ops import sigmoid_focal_loss

    g = torch.Generator().manual_seed(3)
    logit = 3 * torch.randn(40, generator=g, dtype=torch.float64)
    y = (torch.rand(40, generator=g) < 0.3).double()
    ours = fx.binary_focal_loss(logit, y, gamma=gamma, alpha=alpha)
    assert torch.allclose(ours, sigmoid_focal_loss(logit, y, alpha=alpha, gamma=gamma, reduction="mean"), atol=1e-12)


def test_distillation_against_kl_div_and_alpha_zero():
    s, y = _logits(seed=4)
    t, _ = _logits(seed=5)
    T, alpha = 3.0, 0.6
    kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
    expect = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)
    assert torch.allclose(fx.distillation_loss(s, t, y, T=T, alpha=alpha), expect, atol=1e-12)
    assert torch.allclose(fx.distillation_loss(s, t, y, T=T, alpha=0.0), F.cross_entropy(s, y), atol=1e-12)
    assert fx.distillation_loss(t, t, y, T=T, alpha=1.0).abs() < 1e-12  # a student equal to its teacher


def test_distillation_T_squared_keeps_gradient_scale():
    s0, y = _logits(n=64, c=10, seed=6)
    t, _ = _logits(n=64, c=10, seed=7)
    norms = {}
    for T in (2.0, 4.0, 8.0):
        s = s0.clone().requires_grad_(True)
        fx.distillation_loss(s, t, y, T=T, alpha=1.0).backward()
        norms[T] = float(s.grad.norm())
    # with T^2 the soft gradient changes little from T = 2 to 8; without it, it would fall ~16-fold (1/T^2)
    assert 0.7 < norms[8.0] / norms[2.0] < 1.4, norms
    assert 0.8 < norms[8.0] / norms[4.0] < 1.25, norms


# ----------------------------------------------------------------------------- penalties
def _known_model():
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Conv2d(1, 1, 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
        m[0].bias.fill_(100.0)  # excluded: would dominate if counted
        m[2].weight.fill_(-4.0)
        m[2].bias.fill_(7.0)
    return m


def test_penalties_on_known_weights_exclude_biases():
    m = _known_model()
    assert float(fx.l1_penalty(m).detach()) == pytest.approx(1 + 2 + 3 + 0 + 4)
    assert float(fx.l2_penalty(m).detach()) == pytest.approx(0.5 * (1 + 4 + 9 + 0 + 16))
    assert float(fx.elastic_net(m, 0.25).detach()) == pytest.approx(0.25 * 10 + 0.75 * 15)
    assert float(fx.elastic_net(m, 1.0).detach()) == pytest.approx(float(fx.l1_penalty(m).detach()))
    fx.l2_penalty(m).backward()
    assert torch.equal(m[0].weight.grad, m[0].weight.detach()) and m[0].bias.grad is None


def _one_step(opt_cls, lam, in_loss, **kw):
    torch.manual_seed(0)
    m = nn.Linear(4, 3, bias=False).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    opt = opt_cls(m.parameters(), lr=0.1, weight_decay=0.0 if in_loss else lam, **kw)
    loss = F.cross_entropy(m(x), y) + (lam * fx.l2_penalty(m) if in_loss else 0.0)
    loss.backward()
    opt.step()
    return m.weight.detach().clone()


def test_l2_in_loss_equals_weight_decay_under_sgd_but_not_decoupled_under_adam():
    lam = 0.5
    # SGD: w - lr (g + lam w) either way
    assert torch.allclose(_one_step(torch.optim.SGD, lam, True), _one_step(torch.optim.SGD, lam, False), atol=1e-14)
    l2_adam = _one_step(torch.optim.Adam, lam, True)
    assert torch.allclose(l2_adam, _one_step(torch.optim.Adam, lam, False), atol=1e-12)  # torch's coupled L2
    adamw = _one_step(torch.optim.AdamW, lam, False)
    assert (l2_adam - adamw).abs().max() > 1e-3  # Loshchilov & Hutter: not the same under Adam
    # AdamW's exact relation: w (1 - lr lam) minus the plain Adam step
    torch.manual_seed(0)
    w0 = nn.Linear(4, 3, bias=False).double().weight.detach().clone()
    plain = _one_step(torch.optim.Adam, 0.0, False)
    assert torch.allclose(adamw, w0 * (1 - 0.1 * lam) + (plain - w0), atol=1e-12)


# ----------------------------------------------------------------------------- augmentations
def _images(n=16):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("aug", [fx.shift, fx.flip_shift, fx.strong])
def test_augmentations_deterministic_and_shape_preserving(aug):
    x = _images()
    a = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(2)))
    assert a.min() >= 0 and a.max() <= 1


def test_shift_moves_by_at_most_one_pixel_with_zero_fill():
    x = torch.zeros(50, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    a = fx.shift(x, torch.Generator().manual_seed(0))
    assert torch.equal(a.sum((1, 2, 3)), torch.ones(50))  # one pixel, moved, not lost
    pos = a[:, 0].flatten(1).argmax(1)
    r, c = pos // 8, pos % 8
    assert (r - 4).abs().max() == 1 and (c - 4).abs().max() == 1  # every direction reached, never further
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., :, 0] = 1.0
    moved = torch.cat([fx.shift(edge, torch.Generator().manual_seed(s)) for s in range(20)])
    assert set(moved.sum((1, 2, 3)).tolist()) >= {0.0, 8.0}  # a column pushed off the frame is gone (zero fill)


def test_flip_shift_mirrors_about_half():
    x = torch.zeros(400, 1, 8, 8)
    x[:, 0, 4, 1] = 1.0  # left side
    a = fx.flip_shift(x, torch.Generator().manual_seed(0))
    right = (a[:, 0].flatten(1).argmax(1) % 8 >= 4).float().mean()
    assert 0.4 < float(right) < 0.6


def test_mixup_convex_and_targets_sum_to_one():
    x = _images(10)
    y = torch.eye(10)  # sample i is class i, so the mixed target says who was mixed with whom
    xm, ym = fx.mixup(x, y, torch.Generator().manual_seed(3), alpha=0.4)
    assert torch.allclose(ym.sum(1), torch.ones(10)) and ym.min() >= 0
    xm2, ym2 = fx.mixup(x, y, torch.Generator().manual_seed(3), alpha=0.4)
    assert torch.equal(xm, xm2) and torch.equal(ym, ym2)
    checked = 0
    for i in range(10):
        lam = float(ym[i, i])
        if lam == 1.0:  # permuted onto itself
            assert torch.allclose(xm[i], x[i])
            continue
        j = int(torch.tensor([ym[i, k] if k != i else -1 for k in range(10)]).argmax())
        assert float(ym[i, j]) == pytest.approx(1 - lam, abs=1e-6)
        assert torch.allclose(xm[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6)
        checked += 1
    assert checked >= 5


# ----------------------------------------------------------------------------- Factor, Recipe, pickling
def test_factor_check_errors_name_factor_value_and_choices():
    with pytest.raises(ArgumentError, match=r"'augment'.*'rotate'.*'none', 'shift'"):
        fx.FACTORS["augment"].check("rotate")
    with pytest.raises(ArgumentError, match="'steps'.*>= 1"):
        fx.FACTORS["steps"].check(0)
    assert fx.FACTORS["steps"].check(1234) == 1234
    with pytest.raises(ArgumentError, match="'distill'"):
        fx.FACTORS["distill"].check({"T": 4})
    with pytest.raises(ArgumentError, match="alpha"):
        fx.FACTORS["distill"].check({"T": 4, "alpha": 1.5})
    with pytest.raises(ArgumentError, match="'lr'"):
        fx.FACTORS["lr"].check(-1.0)
    assert fx.FACTORS["reg"].check({"kind": "l2"}) == {"kind": "l2", "lam": fx.REG_STRENGTH["l2"]}
    with pytest.raises(ArgumentError, match="kind"):
        fx.FACTORS["reg"].check({"kind": "l3", "lam": 1.0})
    with pytest.raises(ArgumentError, match="'dropout'.*True"):  # True is not 1.0
        fx.Factor("dropout", [1.0, 0.0], apply=lambda r, v: None).check(True)


def test_recipe_from_config_applies_factors_and_refuses_unknown_keys():
    r = tr.Recipe.from_config({"reg": "weight_decay", "augment": "mixup", "distill": {"T": 2, "alpha": 0.5}})
    assert (r.optimizer, r.weight_decay, r.augment, r.mixup_alpha, r.distill) == ("adamw", 1e-2, "shift", 0.2,
                                                                                   (2.0, 0.5))
    r = tr.Recipe.from_config({"reg": {"kind": "l1", "lam": 0.5}})
    assert (r.penalty, r.penalty_strength, r.optimizer) == ("l1", 0.5, "adam")
    with pytest.raises(ArgumentError, match=r"unknown factor 'dropuot'.*augment, distill, init, loss, lr"):
        tr.Recipe.from_config({"dropuot": 0.3})
    with pytest.raises(ArgumentError, match="unknown factor"):
        tr.run_trial({"dropuot": 0.3}, 0)


def test_factor_source_is_stable_and_tells_builtins_from_user_code():
    assert fx.factor_source(fx.FACTORS["augment"]) == fx.factor_source(fx.FACTORS["augment"])
    assert f"v{fx.VERSION}" in fx.factor_source(fx.FACTORS["reg"])
    user = fx.Factor("width", [4, 8], apply=lambda r, v: setattr(r, "width", v))
    assert 'setattr(r, "width", v)' in fx.factor_source(user)
    ns = {"__name__": "__main__"}
    exec("f = lambda r, v: setattr(r, 'width', v)", ns)  # no source file: hashed by value
    src = fx.factor_source(fx.Factor("width", [4, 8], apply=ns["f"]))
    assert src.startswith("width:user:cloudpickle:") and src == fx.factor_source(fx.Factor("width", [4], ns["f"]))


def test_user_factor_round_trips_through_cloudpickle_and_changes_the_result():
    ns = {"__name__": "__main__"}  # as if typed in a notebook cell: cloudpickle copies it by value
    exec("from labkit.ablation.factors import Factor\n"
         "dropout = Factor('dropout', [0.0, 0.5], apply=lambda r, v: setattr(r, 'dropout', v))", ns)
    blob = cloudpickle.dumps(ns["dropout"])
    assert b"setattr" in blob or b"dropout" in blob
    f = cloudpickle.loads(blob)
    assert f.apply is not ns["dropout"].apply and f.values == (0.0, 0.5)
    runs = {v: tr.run_trial({"dropout": v, "steps": 12}, 0, factors={"dropout": f}, eval_every=12) for v in (0.0, 0.5)}
    assert runs[0.0]["accuracy"] != runs[0.5]["accuracy"] or runs[0.0]["loss"] != runs[0.5]["loss"]
    with pytest.raises(ArgumentError, match="'dropout'"):
        tr.run_trial({"dropout": 0.2}, 0, factors={"dropout": f})


# ----------------------------------------------------------------------------- one trial
def test_split_sizes_disjoint_and_stratified():
    s = tr.digits_split()
    sizes = {k: len(v[1]) for k, v in s.items()}
    assert sizes == {"L": 200, "U": 400, "P": 600, "test": 597}
    assert torch.equal(torch.bincount(s["L"][1]), torch.full((10,), 20))
    rows = {k: {tuple(img.flatten().tolist()) for img in v[0]} for k, v in s.items()}
    assert not rows["L"] & rows["test"] and not rows["P"] & rows["test"]  # no image shared


def test_run_trial_deterministic_and_above_chance():
    seen = []
    a = tr.run_trial({"steps": 40}, 3, eval_every=20, on_step=seen.append)
    b = tr.run_trial({"steps": 40}, 3, eval_every=20)
    assert a["accuracy"] == b["accuracy"] and a["loss"] == b["loss"] and a["curve"] == b["curve"]
    assert [p["step"] for p in a["curve"]] == [20, 40] and seen == a["curve"] and a["steps"] == 40
    assert a["accuracy"] > 0.4  # chance is 0.1
    c = tr.run_trial({"steps": 40}, 4, eval_every=20)
    assert c["curve"] != a["curve"]
    assert set(a) == {"accuracy", "loss", "curve", "seconds", "steps"}


@pytest.mark.slow
def test_every_shipped_value_runs(tmp_path):
    """A few steps of each non-baseline path (teacher, pre-trained body, pseudo-labels, penalties, mixup),
    with the teacher and body written to and read back from a cache folder."""
    for key in (f"teacher-w{tr.TEACHER_WIDTH}", "rotation-w8"):
        tr._CACHE.pop(key, None)
    cfg = {"distill": {"T": 4.0, "alpha": 0.7}, "init": "pretrained", "pseudo": "lab07", "augment": "mixup",
           "reg": "elastic", "loss": "smooth", "steps": 8}
    first = tr.run_trial(cfg, 0, eval_every=4, cache_dir=tmp_path)
    assert {p.name.split("-v")[0] for p in tmp_path.iterdir()} == {f"teacher-w{tr.TEACHER_WIDTH}", "rotation-w8"}
    for key in (f"teacher-w{tr.TEACHER_WIDTH}", "rotation-w8"):
        tr._CACHE.pop(key)  # built and cached by the first run
    again = tr.run_trial(cfg, 0, eval_every=4, cache_dir=tmp_path)  # from disk this time
    assert first["curve"] == again["curve"]
    for name in ("augment", "reg", "loss"):
        for v in fx.FACTORS[name].values:
            assert 0 <= tr.run_trial({name: v, "steps": 3}, 0)["accuracy"] <= 1


def _freeze_body(model):
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def test_model_hook_and_width_hooks_reach_the_model():
    seen = {}

    def spy(model):
        seen["convs"] = model[0][0].out_channels
        return _freeze_body(model)

    hook = fx.Factor("frozen", [False, True], apply=lambda r, v: setattr(r, "model_hook", spy if v else None))
    width = fx.Factor("width", [4, 8], apply=lambda r, v: setattr(r, "width", v))
    both = {"frozen": hook, "width": width}
    free = tr.run_trial({"frozen": False, "width": 4, "steps": 10}, 0, factors=both, eval_every=10)
    frozen = tr.run_trial({"frozen": True, "width": 4, "steps": 10}, 0, factors=both, eval_every=10)
    assert seen == {"convs": 4} and free["curve"] != frozen["curve"]


def test_the_trial_trains_the_shared_digits_cnn_and_the_old_name_warns():
    from labkit.models import digits_cnn

    torch.manual_seed(3)
    new = digits_cnn(8, dropout=0.2, classes=4)
    with pytest.warns(DeprecationWarning, match="digits_cnn"):
        torch.manual_seed(3)
        old = tr.make_cnn(8, 0.2, 4)  # the old positional dropout and classes, from the same generator state
    assert list(old.state_dict()) == list(new.state_dict())  # Sequential(body, head): the cached files' keys
    assert all(torch.equal(p, q) for p, q in zip(old.parameters(), new.parameters()))
    assert new[1][2].p == 0.2 and new[1][-1].out_features == 4
