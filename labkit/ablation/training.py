"""One trial of the ablation study: a small CNN (:func:`labkit.models.digits_cnn`) trained on few labelled digits
under a :class:`Recipe`.

The data (scikit-learn's 1797 digits, 8x8 images in [0, 1]) is split once, by :data:`SPLIT_SEED` (never by
the trial's seed), stratified by class:

=============  ======  =====================================================================================
L (labelled)   200     20 per class: what every trial trains on
U (unlabelled) 400     40 per class, labels hidden: the ``pseudo`` factor adds them with lab 07's pseudo-labels
P (pre-train)  600     60 per class, never in L, U or test: pre-trains the "pretrained" body and the teacher
test           597     the rest: the trial's metric is its accuracy here
=============  ======  =====================================================================================

So little labelled data is on purpose: with 200 labels the factors move the test accuracy by more than the
seeds do. The baseline (:data:`BASELINE`: shift augmentation, cross-entropy, Adam at lr 1e-2, 150 steps of
32, width 8) reaches 0.935 +- 0.018 test accuracy over seeds 0-4 (chance: 0.1) in about 0.4 s a trial on
one thread (``python -m labkit ablate labkit/ablation/example_study.toml`` prints the one-factor-at-a-time table).

Pre-trained model (``init="pretrained"``): the convolutional body is pre-trained on P by *rotation
prediction* (each image turned by 0, 90, 180 or 270 degrees, the network predicts which; Gidaris et al.
2018), a self-supervised task that uses no digit label, so fine-tuning is not a disguised form of more
labelled data. The trial then copies the body and trains a freshly initialised head (and the body) on L.
Measured over seeds 0-4 (paired with the baseline): +0.024 +- 0.014 test accuracy; at lr 3e-3, +0.056 +- 0.017.

Teacher (``distill``): a wider CNN (:data:`TEACHER_WIDTH`) trained on P and L with their labels (test accuracy
0.977). The student distils on L's (augmented) images only; measured, paired with the baseline: +0.016 +- 0.023
over seeds 0-4 (not separable from noise), +0.018 +- 0.019 over seeds 0-9 (95% CI +- 0.014). Both are
deterministic (fixed seeds, trained on one thread), built lazily, kept in a module-level dict and, where a
``cache_dir`` (or the environment variable ``LABKIT_ABLATION_CACHE``) is given, on disk, so that a worker
process pays for them once.

``run_trial(config, seed)`` is the function a study runs: the seed drives the initialisation, the batch
order, dropout and the augmentations (a ``torch.Generator`` plus torch's global generator inside a
``fork_rng``), so the same (config, seed) gives the same result bit for bit on CPU with one thread.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import labkit.ablation.factors as fx  # not `from . import`: that would import the package, a cycle

from .._compat import warn_renamed
from .._validate import ArgumentError, validate_choice, validate_int, validate_number
from ..models import digits_cnn

__all__ = ["Recipe", "BASELINE", "run_trial", "digits_split", "pretrained_body", "teacher",
           "pseudo_labels", "N_LABELLED", "N_UNLABELLED", "N_PRETRAIN", "SPLIT_SEED", "TEACHER_WIDTH"]

SPLIT_SEED = 2018
N_LABELLED, N_UNLABELLED, N_PRETRAIN = 20, 40, 60  # per class; the rest (597 images) is the test set
TEACHER_WIDTH = 16
PSEUDO_THRESHOLD = 0.9
# lab 07's generative model as its methods fix it (labkit.pseudo_label.methods.GENERATIVE)
GENERATIVE = {"n_components": 25, "covariance_type": "full", "shrinkage": 3.0}
CACHE_VERSION = "1"  # bump when the pre-training or the teacher changes (names the files on disk)

BASELINE = {"augment": "shift", "distill": "none", "init": "scratch", "reg": "none", "loss": "ce",
            "steps": 150, "pseudo": "none", "lr": 1e-2}

_CACHE: dict = {}


# ----------------------------------------------------------------------------- the recipe
@dataclasses.dataclass
class Recipe:
    """Everything a trial uses. Factors edit it; :func:`run_trial` follows it.

    augment: a name of :data:`labkit.ablation.factors.AUGMENTS` or ``f(x, gen) -> x``; mixup_alpha > 0 adds
    mixup after it. loss: "ce" | "smooth" | "focal" or ``f(logits, target) -> loss`` (target int or soft).
    penalty: None | "l1" | "l2" | "elastic" or ``f(model) -> tensor``, added times ``penalty_strength``.
    optimizer: "adam" | "adamw" | "sgd" with ``weight_decay`` (decoupled for "adamw", L2-coupled for "adam",
    torch's own). distill: None or (T, alpha). init: "scratch" | "pretrained". pseudo: add U with lab 07's
    pseudo-labels. width, dropout: the CNN's. model_hook: ``f(model) -> model`` (or None: edit in place),
    called after initialisation and before the optimizer is built.
    """
    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-2
    optimizer: str = "adam"
    weight_decay: float = 0.0
    augment: Any = "shift"
    mixup_alpha: float = 0.0
    loss: Any = "ce"
    penalty: Any = None
    penalty_strength: float = 0.0
    distill: tuple | None = None
    init: str = "scratch"
    pseudo: bool = False
    width: int = 8
    dropout: float = 0.0
    model_hook: Callable | None = None

    @classmethod
    def from_config(cls, config: dict, factors: dict | None = None) -> Recipe:
        """A default recipe with each ``config`` value applied by its factor, in sorted order of the factor
        names (so the result does not depend on the order of the dict). Unknown keys raise."""
        factors = fx.FACTORS if factors is None else factors
        if not isinstance(config, dict):
            raise ArgumentError(f"config must be a dict {{factor: value}}, got {type(config).__name__}")
        recipe = cls()
        for key in sorted(config):
            if key not in factors:
                raise ArgumentError(f"config has unknown factor {key!r}; the factors are: {', '.join(sorted(factors))}"
                                    f" (define a new one with Factor(name, values, apply) and pass it in factors)")
            factor = factors[key]
            factor.apply(recipe, factor.check(config[key]))
        return recipe


def _resolve(recipe: Recipe):
    aug = recipe.augment
    if not callable(aug):
        aug = fx.AUGMENTS[validate_choice("augment", aug, tuple(fx.AUGMENTS))]
    loss = recipe.loss if callable(recipe.loss) else fx.LOSSES[validate_choice("loss", recipe.loss, tuple(fx.LOSSES))]
    pen = recipe.penalty
    if pen is not None and not callable(pen):
        pen = fx.PENALTIES[validate_choice("penalty", pen, tuple(fx.PENALTIES))]
    validate_choice("optimizer", recipe.optimizer, ("adam", "adamw", "sgd"))
    validate_choice("init", recipe.init, ("scratch", "pretrained"))
    validate_int("steps", recipe.steps, minimum=1)
    validate_int("batch_size", recipe.batch_size, minimum=1)
    validate_number("lr", recipe.lr, minimum=0, open_low=True)
    validate_number("dropout", recipe.dropout, minimum=0, maximum=1, open_high=True)
    return aug, loss, pen


# ----------------------------------------------------------------------------- data
def digits_split() -> dict:
    """The fixed split: ``{"L": (x, y), "U": (x, y), "P": (x, y), "test": (x, y)}`` (U's labels are kept for
    measuring pseudo-label accuracy; training never reads them)."""
    if "split" not in _CACHE:
        from ..data import load_digits

        x, y = load_digits(as_="images")
        rng = np.random.default_rng(SPLIT_SEED)
        parts = {"L": [], "U": [], "P": [], "test": []}
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(y.numpy() == c))
            a, b, d = N_LABELLED, N_LABELLED + N_UNLABELLED, N_LABELLED + N_UNLABELLED + N_PRETRAIN
            for name, sl in (("L", idx[:a]), ("U", idx[a:b]), ("P", idx[b:d]), ("test", idx[d:])):
                parts[name].append(sl)
        _CACHE["split"] = {k: (x[torch.from_numpy(np.sort(np.concatenate(v)))],
                               y[torch.from_numpy(np.sort(np.concatenate(v)))]) for k, v in parts.items()}
    return _CACHE["split"]


def pseudo_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """U's images whose lab 07 posterior is >= 0.9 and their pseudo-labels. GaussianEM (semi-supervised EM,
    lab 07's fixed settings) is fitted on L (labelled) + U (unlabelled, y = -1), flattened. Measured: all 400
    pass the threshold, 96.25% of them correctly labelled."""
    if "pseudo" not in _CACHE:
        from ..pseudo_label import GaussianEM

        s = digits_split()
        (xl, yl), (xu, _) = s["L"], s["U"]
        X = torch.cat([xl, xu]).reshape(len(xl) + len(xu), -1).double().numpy()
        y = np.concatenate([yl.numpy(), -np.ones(len(xu), dtype=np.int64)])
        em = GaussianEM(**GENERATIVE).fit(X, y)
        proba = em.predict_proba(X[len(xl):])
        keep = proba.max(axis=1) >= PSEUDO_THRESHOLD
        labels = em.classes_[proba.argmax(axis=1)]
        _CACHE["pseudo"] = (xu[torch.from_numpy(keep)], torch.from_numpy(labels[keep]).long())
    return _CACHE["pseudo"]


# ----------------------------------------------------------------------------- models
def make_cnn(width: int = 8, dropout: float = 0.0, classes: int = 10) -> nn.Sequential:
    """Deprecated: :func:`labkit.models.digits_cnn` (``dropout`` and ``classes`` are keywords there)."""
    warn_renamed("labkit.ablation.training.make_cnn(width, dropout, classes)",
                 "labkit.models.digits_cnn(width, dropout=dropout, classes=classes)")
    return digits_cnn(width, dropout=dropout, classes=classes)


def _one_thread(fn):
    """Run ``fn()`` on one torch thread under a private RNG state (bit-identical wherever it is called)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return fn()
    finally:
        torch.set_num_threads(n)


def _cached(key: str, build: Callable, make: Callable, cache_dir) -> nn.Module:
    """A model from the process cache, else from ``cache_dir`` (or $LABKIT_ABLATION_CACHE), else built."""
    if key in _CACHE:
        return _CACHE[key]
    cache_dir = cache_dir or os.environ.get("LABKIT_ABLATION_CACHE")
    path = Path(cache_dir) / f"{key}-v{CACHE_VERSION}.pt" if cache_dir else None
    if path is not None and path.exists():
        with torch.random.fork_rng(devices=[]):
            model = make()
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        model = _one_thread(lambda: build(make))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)  # atomic: a worker never reads half a file
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _CACHE[key] = model
    return model


def _fit(model, x, y, steps, lr, seed, augment=fx.shift, batch=64):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb, yb = augment(xb, yb, gen)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model


def _rotations(xb, yb, gen):
    """Each image turned by k * 90 degrees (k random); the label becomes k (rotation prediction)."""
    xb = fx.shift(xb, gen)
    k = torch.randint(0, 4, (len(xb),), generator=gen)
    out = xb.clone()
    for r in (1, 2, 3):
        out[k == r] = torch.rot90(xb[k == r], r, dims=(2, 3))
    return out, k


def pretrained_body(width: int = 8, cache_dir=None) -> nn.Module:
    """The CNN body pre-trained on P by rotation prediction (no digit labels), 400 steps of 64."""
    def build(make):
        torch.manual_seed(1)
        x, _ = digits_split()["P"]
        return _fit(make(), x, torch.zeros(len(x), dtype=torch.long), 400, 3e-3, seed=1, augment=_rotations)
    net = _cached(f"rotation-w{width}", build, lambda: digits_cnn(width, classes=4), cache_dir)
    return net[0]


def teacher(cache_dir=None) -> nn.Module:
    """A wider CNN (width 16) trained on P and L with their labels (shifted by <= 1 pixel), 500 steps of 64."""
    def build(make):
        torch.manual_seed(2)
        s = digits_split()
        x, y = torch.cat([s["P"][0], s["L"][0]]), torch.cat([s["P"][1], s["L"][1]])
        return _fit(make(), x, y, 500, 3e-3, seed=2, augment=lambda a, b, g: (fx.shift(a, g), b))
    return _cached(f"teacher-w{TEACHER_WIDTH}", build, lambda: digits_cnn(TEACHER_WIDTH), cache_dir)


# ----------------------------------------------------------------------------- one trial
def _evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def _optimizer(recipe: Recipe, model: nn.Module):
    ws = fx.weights(model)
    ids = {id(p) for p in ws}
    groups = [{"params": ws, "weight_decay": recipe.weight_decay},
              {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": 0.0}]
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[recipe.optimizer]
    return cls(groups, lr=recipe.lr)  # weight decay on weights only, like the penalties


def train(recipe: Recipe, seed: int, *, eval_every: int = 25, on_step: Callable | None = None,
          cache_dir=None) -> dict:
    """Train one model under ``recipe`` with ``seed``; see :func:`run_trial` for the result."""
    seed = validate_int("seed", seed, minimum=0)
    eval_every = validate_int("eval_every", eval_every, minimum=1)
    aug, loss_fn, pen = _resolve(recipe)
    t0 = time.perf_counter()
    s = digits_split()
    x, y = s["L"]
    if recipe.pseudo:
        xp, yp = pseudo_labels()
        x, y = torch.cat([x, xp]), torch.cat([y, yp])
    x_test, y_test = s["test"]
    teach = teacher(cache_dir) if recipe.distill else None
    body = pretrained_body(recipe.width, cache_dir) if recipe.init == "pretrained" else None
    gen = torch.Generator().manual_seed(seed)
    curve, window = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = digits_cnn(recipe.width, dropout=recipe.dropout)
        if body is not None:
            model[0].load_state_dict(body.state_dict())
        if recipe.model_hook is not None:
            model = recipe.model_hook(model) or model
        opt = _optimizer(recipe, model)
        model.train()
        order = torch.randperm(len(x), generator=gen)
        pos = 0
        for step in range(1, recipe.steps + 1):
            if pos + recipe.batch_size > len(order):  # a new epoch: a fresh permutation
                order, pos = torch.randperm(len(x), generator=gen), 0
            idx = order[pos:pos + recipe.batch_size]
            pos += recipe.batch_size
            xb, yb = x[idx], y[idx]
            if aug is not None:
                xb = aug(xb, gen)
            if recipe.mixup_alpha > 0:
                xb, yb = fx.mixup(xb, F.one_hot(yb, 10).float(), gen, recipe.mixup_alpha)
            logits = model(xb)
            if teach is not None:
                with torch.no_grad():
                    t_logits = teach(xb)
                loss = fx.distillation_loss(logits, t_logits, yb, T=recipe.distill[0], alpha=recipe.distill[1],
                                            hard=loss_fn)
            else:
                loss = loss_fn(logits, yb)
            window.append(float(loss.detach()))
            if pen is not None and recipe.penalty_strength:
                loss = loss + recipe.penalty_strength * pen(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % eval_every == 0 or step == recipe.steps:
                acc, test_loss = _evaluate(model, x_test, y_test)
                point = {"step": step, "train_loss": float(np.mean(window)), "test_accuracy": acc}
                curve.append(point)
                window = []
                if on_step is not None:
                    on_step(dict(point))
    return {"accuracy": acc, "loss": test_loss, "curve": curve, "seconds": time.perf_counter() - t0,
            "steps": recipe.steps}


def run_trial(config: dict, seed: int, *, factors: dict | None = None, eval_every: int = 25,
              on_step: Callable | None = None, cache_dir=None) -> dict:
    """Train and test one configuration with one seed.

    config: ``{factor: value}``; factors it leaves out take :data:`BASELINE`'s value. factors: extra factors
    (or replacements of shipped ones, by name), merged over :data:`labkit.ablation.factors.FACTORS`.
    Runs on one torch thread (restored afterwards).
    on_step: called with each curve point (a dict) as it is measured. cache_dir: where the teacher and the
    pre-trained body are kept on disk (default: $LABKIT_ABLATION_CACHE, else memory only).

    Returns ``{"accuracy": test accuracy (the metric), "loss": test cross-entropy, "curve": [{"step",
    "train_loss" (mean over the last eval_every steps, before the penalty), "test_accuracy"}], "seconds",
    "steps"}``.
    """
    every = {**fx.FACTORS, **(factors or {})}
    if not isinstance(config, dict):
        raise ArgumentError(f"config must be a dict {{factor: value}}, got {type(config).__name__}")
    recipe = Recipe.from_config({**{k: v for k, v in BASELINE.items() if k in every}, **config}, every)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the fastest for this small CNN, and the same bits in a kernel or a worker
    try:
        return train(recipe, seed, eval_every=eval_every, on_step=on_step, cache_dir=cache_dir)
    finally:
        torch.set_num_threads(n)
