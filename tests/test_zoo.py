"""The zoo (issue 26, item 5): labkit's tools on models labkit did not write, each against PyTorch's or
scikit-learn's own counterpart.

The models: torchvision's ResNet-18 (BatchNorm buffers; also with its backbone frozen), ``nn.TransformerEncoder``
(2 layers), :class:`ZooGPT` (a GPT as people write it: tied embeddings, causal ``F.scaled_dot_product_attention``)
and an MLP trained with two parameter groups. The checks:

- lab 09's calculator (``labkit.hardware.estimate``) within 10% of PyTorch's ``MemTracker`` (via
  ``labkit.hardware.measure``);
- lab 02's data-parallel wrappers against torch's ``DistributedDataParallel`` (gradients, parameters and BatchNorm
  statistics after two steps on 2 gloo ranks);
- lab 10's ZeRO-1/2 against torch's ``ZeroRedundancyOptimizer`` and the unsharded AdamW, and ZeRO-3 against
  torch's FSDP2 (``fully_shard``) on the tied GPT and the frozen-backbone ResNet-18;
- lab 06's ``KMeans`` and lab 07's ``GaussianEM`` against scikit-learn on features a zoo model extracts.

``python tests/test_zoo.py`` prints the calculator's tables (``benchmarks/README.md`` keeps them): the zoo, and
``nn.TransformerEncoderLayer`` at 64 to 512 tokens.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import labkit
from labkit.hardware import peak_rows

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ZooGPT(nn.Module):
    """A GPT-2-style language model as people write it: token and position embeddings, pre-LN blocks with causal
    ``F.scaled_dot_product_attention``, and the output head tied to the token embedding."""

    def __init__(self, vocab=96, width=64, heads=4, layers=2, seq=128, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(width), "qkv": nn.Linear(width, 3 * width), "proj": nn.Linear(width, width),
            "ln2": nn.LayerNorm(width), "fc": nn.Linear(width, 4 * width), "out": nn.Linear(4 * width, width)})
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            drop = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
            x = x + blk["proj"](y.transpose(1, 2).reshape(b, t, -1))
            x = x + blk["out"](F.gelu(blk["fc"](blk["ln2"](x))))
        return self.lm_head(self.ln_f(x))


def resnet18(frozen: bool = False, dtype=torch.float32):
    """torchvision's ResNet-18 for 10 classes (no weights downloaded); ``frozen``: only the head ``fc`` trains."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).to(dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name.startswith("fc."))
    return model


def encoder(dropout: float = 0.1):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 8, 128, dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)


def two_groups(model):
    """What an optimiser gets for the MLP: weights decayed at the default rate, biases undecayed at twice the rate."""
    return [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")]},
            {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "lr": 0.02,
             "weight_decay": 0.0}]


def gpt(dropout: float = 0.0, dtype=torch.float32):
    torch.manual_seed(0)
    return ZooGPT(dropout=dropout).to(dtype)


def calculator_zoo() -> dict:
    """``name: (model, sample)`` for the calculator's table, fp32 Adam as ``labkit.hardware.Setup()`` trains."""
    torch.manual_seed(0)
    images, tokens = torch.randn(4, 3, 64, 64), torch.randint(0, 96, (4, 128))
    return {"ResNet-18, 4 x 3 x 64 x 64": (resnet18(), images),
            "ResNet-18, frozen backbone": (resnet18(frozen=True), images),
            "TransformerEncoder, 2 layers, 4 x 128 x 64, dropout 0.1": (encoder(0.1), torch.randn(4, 128, 64)),
            "TransformerEncoder, 2 layers, 4 x 128 x 64, no dropout": (encoder(0.0), torch.randn(4, 128, 64)),
            "ZooGPT (tied, causal SDPA), 4 x 128 tokens": (gpt(), tokens),
            "ZooGPT, dropout 0.1 (math kernel)": (gpt(0.1), tokens),
            "MLP 32-64-64-10, batch 64": (mlp(), torch.randn(64, 32))}


@pytest.fixture(scope="module")
def on_two_ranks():
    """``on_two_ranks(fn)``: ``fn``'s results on 2 gloo ranks, launched once per module."""
    done: dict = {}

    def run(fn):
        if fn not in done:
            done[fn] = labkit.launch(fn, world_size=2, pool=True, echo=False, timeout=300)
        return done[fn]
    return run


# --------------------------------------------------------------------------- lab 09: the calculator
@pytest.fixture(scope="module")
def calculator_rows():
    return peak_rows(calculator_zoo())


def test_calculator_within_ten_percent_of_memtracker_on_the_zoo(calculator_rows):
    for r in calculator_rows:
        assert r["method"] == "MemTracker", r      # the frozen backbone too: no fall-back to the profiler
        assert abs(r["ratio"] - 1) < 0.10, r
        assert r["activations ratio"] == pytest.approx(1, abs=1e-6), r   # equal to autograd's ledger
        assert not any("no rule" in n or "from its ledger" in n for n in r["notes"]), r


# --------------------------------------------------------------------------- lab 02: data parallelism
DDP_STEPS = 2


def _batches(name: str, ctx, dtype):
    """Each step's global batch (the same on every rank), and this rank's half of it."""
    g = torch.Generator().manual_seed(1)
    n = 2 * ctx.world_size
    out = []
    for _ in range(DDP_STEPS):
        if name == "resnet18":
            x, y = torch.randn(n, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)
        else:
            x = torch.randint(0, 96, (n, 32), generator=g)
            y = torch.randint(0, 96, (n, 32), generator=g)
        mine = slice(ctx.rank * 2, ctx.rank * 2 + 2)
        out.append([(x[mine].to(ctx.device), y[mine].to(ctx.device))])
    return out


def _state(model) -> dict:
    """Parameters, their gradients and the buffers (BatchNorm's running statistics), detached, on the CPU."""
    out = {f"param {n}": p.detach().cpu().clone() for n, p in model.named_parameters()}
    out.update({f"grad {n}": p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None})
    out.update({f"buffer {n}": b.detach().cpu().clone() for n, b in model.named_buffers() if b.is_floating_point()})
    return out


def _ddp_rank(ctx) -> dict:
    """Two SGD steps of each labkit wrapper and of torch's DistributedDataParallel on ResNet-18 and ZooGPT."""
    from torch.nn.parallel import DistributedDataParallel

    from labkit.ddp import make_ddp, train_steps
    from labkit.hardware.walk import ce_loss

    dt = torch.float64
    out = {}
    for name, build in (("resnet18", lambda: resnet18(dtype=dt)), ("gpt", lambda: gpt(dtype=dt))):
        data = _batches(name, ctx, dt)
        for algo in ("naive", "bucketed", "overlapped", "torch DDP"):
            model = build().to(ctx.device)
            net = DistributedDataParallel(model) if algo == "torch DDP" else make_ddp(algo, model, 0.5)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            train_steps(net, opt, data, loss_fn=ce_loss)
            out[(name, algo)] = _state(model)
        out[(name, "tied")] = model.lm_head.weight is model.wte.weight if name == "gpt" else None
    return out


@pytest.mark.parametrize("name", ["resnet18", "gpt"])
def test_labkit_ddp_equals_torch_ddp_on_the_zoo(on_two_ranks, name):
    ddp_runs = on_two_ranks(_ddp_rank)
    for r in ddp_runs:
        want = r[(name, "torch DDP")]
        assert any(k.startswith("grad ") for k in want) and (name != "resnet18" or any("running_mean" in k
                                                                                       for k in want))
        for algo in ("naive", "bucketed", "overlapped"):
            got = r[(name, algo)]
            assert got.keys() == want.keys(), (algo, set(got) ^ set(want))
            for k, v in want.items():
                scale = max(float(v.abs().max()), 1e-12)
                assert float((got[k] - v).abs().max()) / scale < 1e-10, (name, algo, k)
    if name == "gpt":
        assert all(r[("gpt", "tied")] for r in ddp_runs)
    for k, v in ddp_runs[0][(name, "bucketed")].items():   # the replicas agree across ranks (not BatchNorm's
        if not k.startswith("buffer"):                       # statistics: each rank's last forward updates its own)
            assert torch.equal(v, ddp_runs[1][(name, "bucketed")][k]), k


# --------------------------------------------------------------------------- lab 10: ZeRO-1/2
ZERO_STEPS = 4
ADAMW = dict(lr=0.01, weight_decay=0.1)


def _zero_data(name, ctx):
    g = torch.Generator().manual_seed(2)
    n = 4 * ctx.world_size
    for _ in range(ZERO_STEPS):
        if name == "gpt":
            x, y = torch.randint(0, 96, (n, 16), generator=g), torch.randint(0, 96, (n, 16), generator=g)
        else:
            x, y = torch.randn(n, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)
        yield x.to(ctx.device), y.to(ctx.device)


def _zero_rank(ctx) -> dict:
    """ZeRO-1 (and its naive form) and ZeRO-2 against torch's ZeroRedundancyOptimizer under DDP and against the
    unsharded AdamW on the whole batch, on ZooGPT (tied embeddings) and the MLP with two parameter groups."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from labkit import zero
    from labkit.hardware.walk import ce_loss

    out = {}
    for name, build, groups in (("gpt", lambda: gpt(dtype=torch.float64), lambda m: m.parameters()),
                                ("mlp", lambda: mlp(torch.float64), two_groups)):
        flat = {}
        for method in ("unsharded", "Zero1", "NaiveZero1", "Zero2", "ZeroRedundancyOptimizer"):
            model = build().to(ctx.device)
            net = model
            if method == "unsharded":
                opt = torch.optim.AdamW(groups(model), **ADAMW)
            elif method == "ZeroRedundancyOptimizer":
                opt = ZeroRedundancyOptimizer(groups(model), optimizer_class=torch.optim.AdamW, **ADAMW)
                net = DistributedDataParallel(model)
            else:
                opt = getattr(zero, method)(groups(model), torch.optim.AdamW, **ADAMW)
            for x, y in _zero_data(name, ctx):
                if method != "unsharded":   # this rank's share of the batch
                    x, y = x[ctx.rank::ctx.world_size], y[ctx.rank::ctx.world_size]
                opt.zero_grad(set_to_none=True)
                ce_loss(net(x), y).backward()
                opt.step()
            flat[method] = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
        ref, theirs = flat.pop("unsharded"), flat["ZeroRedundancyOptimizer"]
        out[name] = {m: {"vs unsharded": float((v - ref).abs().max() / ref.abs().max()),
                         "vs torch": float((v - theirs).abs().max() / theirs.abs().max())} for m, v in flat.items()}
    return out


# --------------------------------------------------------------------------- lab 10: Zero3 against FSDP2
def _zero3_rank(ctx) -> dict:
    """labkit's Zero3 against torch's FSDP2 (``fully_shard`` on the same units, then the root), 3 AdamW steps in
    float64 on this rank's half of each batch: ZooGPT with Zero3's default units (its blocks are ModuleDicts the
    forward reaches into, so each layer is a unit; the tied embedding is the root's), and ResNet-18 with its
    backbone frozen (one unit per stage and the head)."""
    from labkit import zero
    from labkit.hardware.walk import ce_loss

    g = torch.Generator().manual_seed(3)
    n = 4 * ctx.world_size
    data = {"gpt": [(torch.randint(0, 96, (n, 16), generator=g), torch.randint(0, 96, (n, 16), generator=g))
                    for _ in range(3)],
            "resnet": [(torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
                        torch.randint(0, 10, (n,), generator=g)) for _ in range(3)]}
    builds = {"gpt": (lambda: gpt(dtype=torch.float64), None),
              "resnet": (lambda: resnet18(frozen=True, dtype=torch.float64),
                         lambda m: [m.layer1, m.layer2, m.layer3, m.layer4, m.fc])}
    out = {}
    for name, (build, units_of) in builds.items():
        fulls, buffers = {}, {}
        for method in ("Zero3", "FSDP2"):
            model = build().to(ctx.device)
            if method == "Zero3":
                net = zero.Zero3(model, units_of(model) if units_of else None)
                units = net.units
            else:
                zero.torch_fsdp2(model, units=units)   # the units Zero3 used, in its order
                net = model
            opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], **ADAMW)
            for x, y in data[name]:
                x, y = x[ctx.rank::ctx.world_size].to(ctx.device), y[ctx.rank::ctx.world_size].to(ctx.device)
                opt.zero_grad(set_to_none=True)
                ce_loss(net(x), y).backward()
                opt.step()
            fulls[method] = net.full_parameters() if method == "Zero3" else zero.fsdp2_full_parameters(net)
            buffers[method] = [b.detach().clone() for b in model.buffers()]
        out[name] = {"params": max(float((a - b).abs().max()) for a, b in zip(fulls["Zero3"], fulls["FSDP2"])),
                     "buffers": max((float((a.double() - b.double()).abs().max())
                                     for a, b in zip(buffers["Zero3"], buffers["FSDP2"])), default=0.0),
                     "units": len(units)}
    return out


@pytest.mark.parametrize("name", ["gpt", "resnet"])
def test_zero3_equals_fsdp2_on_the_zoo(on_two_ranks, name):
    for r in on_two_ranks(_zero3_rank):
        assert r[name]["params"] == 0.0 and r[name]["buffers"] == 0.0, r[name]
    # wte, wpe, 6 layers a block, ln_f, lm_head (a unit with nothing of its own: its weight is the tied one)
    assert on_two_ranks(_zero3_rank)[0]["gpt"]["units"] == 2 + 2 * 6 + 2


@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_zero1_zero2_equal_torchs_zero_and_unsharded_adamw_on_the_zoo(on_two_ranks, name):
    for r in on_two_ranks(_zero_rank):
        assert set(r[name]) == {"Zero1", "NaiveZero1", "Zero2", "ZeroRedundancyOptimizer"}
        for method, err in r[name].items():   # the same sums in the same order as torch's: equal to the last bit
            assert err["vs torch"] < 1e-14, (name, method, err)
            # against one process on the whole batch, the mean of the ranks' means rounds otherwise: 3.6e-12 on the
            # GPT after 4 AdamW steps, for torch's ZeroRedundancyOptimizer as for labkit's
            assert err["vs unsharded"] < 1e-10, (name, method, err)


# --------------------------------------------------------------------------- labs 06 and 07: on features
@pytest.fixture(scope="module")
def features():
    """ResNet-18 features (random weights, eval mode, the 512 values before its head) of 400 digits, upsampled to
    32 x 32 and repeated over 3 channels: a feature extractor as a user would put before a clustering step."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    net = resnet18().eval()
    net.fc = nn.Identity()
    images = torch.tensor(X[:400], dtype=torch.float32).view(-1, 1, 8, 8).repeat(1, 3, 1, 1) / 16
    with torch.no_grad():
        feats = net(F.interpolate(images, size=32)).double().numpy()
    return feats, y[:400]


def test_kmeans_equals_sklearn_on_zoo_features(features):
    from sklearn.cluster import KMeans as SKKMeans

    from labkit.kmeans import KMeans

    X, _ = features
    init = X[:10]
    ours = KMeans(10, init=init, n_init=1, dtype="float64").fit(X)
    theirs = SKKMeans(10, init=init, n_init=1, algorithm="lloyd").fit(X)
    assert np.array_equal(ours.labels_, theirs.labels_)
    assert ours.inertia_ == pytest.approx(theirs.inertia_, rel=1e-9)
    assert np.abs(ours.cluster_centers_ - theirs.cluster_centers_).max() < 1e-9


def test_gaussian_em_tied_fully_labelled_equals_pca_then_lda(features):
    """Fully labelled, without shrinkage and with one covariance for all classes, GaussianEM is linear discriminant
    analysis in its PCA space: the same predictions as scikit-learn's PCA then LinearDiscriminantAnalysis."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.pipeline import make_pipeline

    from labkit.pseudo_label import GaussianEM

    X, y = features
    ours = GaussianEM(n_components=10, covariance_type="tied", shrinkage=0.0).fit(X[:300], y[:300])
    # The full SVD: scikit-learn's default for this shape is a randomized one, with no seed, whose subspace moves
    # by about 1e-3 between runs, enough to flip a test digit that sits between 1 and 9 (CI saw it).
    theirs = make_pipeline(PCA(10, svd_solver="full"), LinearDiscriminantAnalysis(solver="lsqr"))
    theirs.fit(X[:300], y[:300])
    assert np.abs(ours.predict_proba(X[300:]) - theirs.predict_proba(X[300:])).max() < 1e-9
    assert np.array_equal(ours.predict(X[300:]), theirs.predict(X[300:]))
    assert ours.score(X[300:], y[300:]) == theirs.score(X[300:], y[300:]) > 0.5


def encoder_layer_sweep() -> dict:
    """``nn.TransformerEncoderLayer(64, 8, 128)``, batch 4, at 64 to 512 tokens, with and without dropout (the
    issue's case: with dropout the CPU runs the math attention kernel)."""
    cases = {}
    for seq in (64, 128, 256, 512):
        for p in (0.0, 0.1):
            torch.manual_seed(0)
            layer = nn.TransformerEncoderLayer(64, 8, 128, dropout=p, batch_first=True)
            cases[f"TransformerEncoderLayer, {seq} tokens, dropout {p}"] = (layer, torch.randn(4, seq, 64))
    return cases


if __name__ == "__main__":   # the calculator's tables for benchmarks/README.md
    from labkit.viz import format_table

    torch.set_num_threads(1)
    for cases in (calculator_zoo(), encoder_layer_sweep()):
        print(format_table([{"model": r["model"], "predicted MiB": f"{r['predicted MiB']:.2f}",
                             "measured MiB": f"{r['measured MiB']:.2f}", "ratio": f"{r['ratio']:.3f}"}
                            for r in peak_rows(cases)]), end="\n\n")
