"""The factors of an ablation study: losses, weight penalties, augmentations, and :class:`Factor`.

Every function here is pure (torch tensors in, tensors out; randomness only from a ``torch.Generator`` that
the caller passes), so each is tested against its definition and against torch's own where one exists.

Losses take ``logits`` (N, C) and a ``target`` that is either int labels (N,) or soft targets (N, C) whose
rows sum to 1 (mixup and distillation make soft targets); every loss is averaged over the N samples.

=====================  ==========================================================================
cross_entropy          -sum_c q_c log p_c                  (q = one-hot of the label, or the soft row)
label_smoothing        cross_entropy against (1 - eps) q + eps / C   (= torch's ``label_smoothing=eps``)
focal_loss             -sum_c q_c (1 - p_c)^gamma log p_c  (Lin et al. 2017; gamma = 0 is cross-entropy)
binary_focal_loss      the binary form, = ``torchvision.ops.sigmoid_focal_loss(reduction="mean")``
distillation_loss      alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) CE(s, y)  (Hinton et al. 2015)
=====================  ==========================================================================

Penalties act on a model's *weights* only: parameters with two or more dimensions (convolution kernels,
linear matrices). Biases (and any other 1-D parameter, such as a norm layer's scale) are excluded, as is
usual, since penalising an offset does not limit a model's capacity. ``l2_penalty`` is ``1/2 sum w^2``, so
its gradient is ``w`` and ``lam * l2_penalty`` in the loss is exactly SGD's ``weight_decay=lam``.

A :class:`Factor` names a component of the training recipe and its values; ``FACTORS`` holds the ones the lab
ships. Each factor's ``apply(recipe, value)`` edits a :class:`labkit.ablation.training.Recipe` in place.
"""
from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._validate import ArgumentError, validate_choice, validate_int, validate_number

__all__ = ["cross_entropy", "label_smoothing", "focal_loss", "binary_focal_loss", "distillation_loss",
           "weights", "l1_penalty", "l2_penalty", "elastic_net", "shift", "flip_shift", "strong", "mixup",
           "LOSSES", "PENALTIES", "AUGMENTS", "REG_STRENGTH", "Factor", "FACTORS", "factor_source", "VERSION"]

VERSION = "1"  # bump when a shipped factor's behaviour changes: it enters factor_source and so the trial hash


# ----------------------------------------------------------------------------- losses
def _soft(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target`` as (N, C) float rows: int labels become one-hot, soft rows are checked and passed on."""
    if logits.ndim != 2:
        raise ArgumentError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    n, c = logits.shape
    if target.ndim == 1 and not target.dtype.is_floating_point:
        return F.one_hot(target.long(), c).to(logits.dtype)
    if target.shape != logits.shape:
        raise ArgumentError(f"target must be int labels ({n},) or soft targets ({n}, {c}), got "
                            f"{target.dtype} of shape {tuple(target.shape)}")
    return target.to(logits.dtype)


def _is_labels(target: torch.Tensor) -> bool:
    return target.ndim == 1 and not target.dtype.is_floating_point


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``-sum_c q_c log softmax(logits)_c`` (int labels: torch's ``F.cross_entropy``)."""
    if _is_labels(target):
        return F.cross_entropy(logits, target)
    return -(_soft(logits, target) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def label_smoothing(logits: torch.Tensor, target: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Cross-entropy against the smoothed target ``(1 - eps) q + eps / C`` (Szegedy et al. 2016)."""
    eps = validate_number("eps", eps, minimum=0, maximum=1)
    q = _soft(logits, target)
    return cross_entropy(logits, (1 - eps) * q + eps / logits.shape[1])


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Multiclass focal loss ``-sum_c q_c (1 - p_c)^gamma log p_c``, averaged over samples (Lin et al. 2017).

    ``(1 - p_c)^gamma`` shrinks the loss of samples already classified confidently; ``gamma = 0`` gives
    cross-entropy.
    """
    gamma = validate_number("gamma", gamma, minimum=0)
    logp = F.log_softmax(logits, dim=1)
    return -(_soft(logits, target) * (1 - logp.exp()).pow(gamma) * logp).sum(dim=1).mean()


def binary_focal_loss(logit: torch.Tensor, y01: torch.Tensor, gamma: float = 2.0,
                      alpha: float | None = 0.25) -> torch.Tensor:
    """Binary focal loss on logits, averaged: ``alpha_t (1 - p_t)^gamma BCE`` (``alpha=None`` or < 0: no
    ``alpha_t``). The same definition as ``torchvision.ops.sigmoid_focal_loss(..., reduction="mean")``."""
    y = y01.to(logit.dtype)
    p = torch.sigmoid(logit)
    ce = F.binary_cross_entropy_with_logits(logit, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None and alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss.mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                      T: float = 4.0, alpha: float = 0.7, hard: Callable | None = None) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015)::

        alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))   (summed over classes, mean over samples)
        + (1 - alpha) * hard(student, target)                           (hard = cross_entropy unless given)

    The T^2 keeps the soft term's gradient about the same size whatever T is (the softened gradients shrink
    as 1/T^2). The teacher's logits are detached: only the student learns.
    """
    T = validate_number("T", T, minimum=0, open_low=True)
    alpha = validate_number("alpha", alpha, minimum=0, maximum=1)
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach() / T, dim=1)
    soft = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean() * T * T
    return alpha * soft + (1 - alpha) * (hard or cross_entropy)(student_logits, target)


LOSSES = {"ce": cross_entropy, "smooth": label_smoothing, "focal": focal_loss}


# ----------------------------------------------------------------------------- penalties
def weights(model: nn.Module) -> list[torch.Tensor]:
    """The parameters a penalty acts on: those with >= 2 dimensions (biases and 1-D scales excluded)."""
    return [p for p in model.parameters() if p.ndim >= 2]


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """``sum |w|`` over the model's weights (biases excluded)."""
    return sum((w.abs().sum() for w in weights(model)), torch.zeros(()))


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """``1/2 sum w^2`` over the model's weights (biases excluded): its gradient is ``w`` itself."""
    return 0.5 * sum((w.pow(2).sum() for w in weights(model)), torch.zeros(()))


def elastic_net(model: nn.Module, l1_ratio: float = 0.5) -> torch.Tensor:
    """``l1_ratio * sum |w| + (1 - l1_ratio) * 1/2 sum w^2`` (scikit-learn's ElasticNet convention)."""
    r = validate_number("l1_ratio", l1_ratio, minimum=0, maximum=1)
    return r * l1_penalty(model) + (1 - r) * l2_penalty(model)


PENALTIES = {"l1": l1_penalty, "l2": l2_penalty, "elastic": elastic_net}
# the default strength of each regulariser (the lam in loss + lam * penalty; for weight_decay, AdamW's value)
REG_STRENGTH = {"l1": 1e-4, "l2": 1e-3, "elastic": 3e-4, "weight_decay": 1e-2}


# ----------------------------------------------------------------------------- augmentations
def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ArgumentError(f"x must be images (N, C, H, W), got shape {tuple(x.shape)}")


def shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Move each image by its own random (dy, dx), each in [-max_shift, max_shift], filling with zeros."""
    _check_images(x)
    m = validate_int("max_shift", max_shift, minimum=0)
    n, _, h, w = x.shape
    if m == 0 or n == 0:
        return x.clone()
    padded = F.pad(x, (m, m, m, m))
    dy = torch.randint(0, 2 * m + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * m + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


def flip_shift(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``, then :func:`shift`. A mirrored 2, 3, 4, 5, 7 or
    9 is no longer that digit: flipping is not label-preserving here (the lab measures what that costs)."""
    _check_images(x)
    flip = torch.rand(x.shape[0], generator=gen) < p
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return shift(x, gen)


def strong(x: torch.Tensor, gen: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """A stronger augmentation: a shift of up to 2 pixels, one 3x3 patch erased (set to 0, at a uniformly
    random place inside the image, always), Gaussian pixel noise of sd ``noise``, clipped to [0, 1]."""
    _check_images(x)
    x = shift(x, gen, max_shift=2)
    n, _, h, w = x.shape
    top = torch.randint(0, h - 2, (n,), generator=gen)
    left = torch.randint(0, w - 2, (n,), generator=gen)
    r, c = torch.arange(h), torch.arange(w)
    inside_r = (r[None, :] >= top[:, None]) & (r[None, :] < top[:, None] + 3)  # (n, h)
    inside_c = (c[None, :] >= left[:, None]) & (c[None, :] < left[:, None] + 3)  # (n, w)
    keep = ~(inside_r[:, :, None] & inside_c[:, None, :])
    x = x * keep[:, None].to(x.dtype)
    x = x + noise * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x.clamp(0, 1)


def mixup(x: torch.Tensor, y_onehot: torch.Tensor, gen: torch.Generator, alpha: float = 0.2):
    """Mixup (Zhang et al. 2018): one ``lam ~ Beta(alpha, alpha)`` per batch, each sample mixed with the
    sample a random permutation puts in its place. Returns ``(lam x + (1-lam) x[perm], lam y + (1-lam) y[perm])``:
    mixed images and soft targets (rows still sum to 1)."""
    _check_images(x)
    alpha = validate_number("alpha", alpha, minimum=0, open_low=True)
    if y_onehot.shape[0] != x.shape[0] or y_onehot.ndim != 2:
        raise ArgumentError(f"y_onehot must be (N, C) with N = {x.shape[0]}, got shape {tuple(y_onehot.shape)}")
    # torch's Beta sampler takes no generator: draw a seed from ``gen`` and let numpy draw lam
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen)
    y = y_onehot.to(x.dtype)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


AUGMENTS = {"none": None, "shift": shift, "flip_shift": flip_shift, "strong": strong}


# ----------------------------------------------------------------------------- factors
def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind (True is not 1, 1 is 1.0)."""
    return isinstance(a, bool) == isinstance(b, bool) and isinstance(a, dict) == isinstance(b, dict) and a == b


class Factor:
    """A named component of the recipe and the values it may take.

    ``apply(recipe, value)`` edits a :class:`~labkit.ablation.training.Recipe` in place. ``values`` are the
    levels a study uses by default; ``check(value)`` accepts exactly those, unless ``validate`` is given: a
    function ``validate(value) -> value`` that raises :class:`ArgumentError` (for an open range, such as the
    number of steps). A factor defined in a notebook cell is pickled by value (cloudpickle), so it reaches
    worker processes::

        Factor("dropout", [0.0, 0.3], apply=lambda r, v: setattr(r, "dropout", v))
    """

    def __init__(self, name: str, values: Sequence[Any], apply: Callable, doc: str = "",
                 validate: Callable | None = None):
        if not isinstance(name, str) or not name.isidentifier():
            raise ArgumentError(f"name must be an identifier such as 'dropout', got {name!r}")
        if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ArgumentError(f"values of factor {name!r} must be a non-empty list of values, got {values!r}")
        if not callable(apply):
            raise ArgumentError(f"apply of factor {name!r} must be a function apply(recipe, value), got {apply!r}")
        if validate is not None and not callable(validate):
            raise ArgumentError(f"validate of factor {name!r} must be a function or None, got {validate!r}")
        self.name, self.values, self.apply, self.doc, self.validate = name, tuple(values), apply, doc, validate

    def check(self, value: Any) -> Any:
        """``value`` (cleaned) if this factor accepts it, else an :class:`ArgumentError` naming the factor,
        the value and the allowed values."""
        if self.validate is not None:
            return self.validate(value)
        if not any(_same(value, v) for v in self.values):
            raise ArgumentError(f"factor {self.name!r} has no value {value!r}; allowed values: "
                                + ", ".join(repr(v) for v in self.values))
        return value

    def __repr__(self) -> str:
        return f"Factor({self.name!r}, {list(self.values)!r})"


def _apply_augment(recipe, value):
    recipe.augment = "shift" if value == "mixup" else value
    recipe.mixup_alpha = 0.2 if value == "mixup" else 0.0


def _check_distill(value):
    if isinstance(value, str):
        return validate_choice("factor 'distill'", value, ("none",), hint="or a dict such as {'T': 4, 'alpha': 0.7}")
    if not isinstance(value, dict) or set(value) != {"T", "alpha"}:
        raise ArgumentError(f"factor 'distill' must be 'none' or a dict with keys 'T' and 'alpha' "
                            f"(e.g. {{'T': 4, 'alpha': 0.7}}), got {value!r}")
    return {"T": validate_number("factor 'distill' T", value["T"], minimum=0, open_low=True),
            "alpha": validate_number("factor 'distill' alpha", value["alpha"], minimum=0, maximum=1)}


def _apply_distill(recipe, value):
    recipe.distill = None if value == "none" else (float(value["T"]), float(value["alpha"]))


def _check_reg(value):
    kinds = ("none",) + tuple(REG_STRENGTH)
    if isinstance(value, str):
        return validate_choice("factor 'reg'", value, kinds, hint="or a dict such as {'kind': 'l2', 'lam': 1e-3}")
    if not isinstance(value, dict) or not {"kind"} <= set(value) <= {"kind", "lam"}:
        raise ArgumentError(f"factor 'reg' must be one of {kinds} or a dict {{'kind': ..., 'lam': ...}}, "
                            f"got {value!r}")
    out = {"kind": validate_choice("factor 'reg' kind", value["kind"], kinds[1:])}
    out["lam"] = validate_number("factor 'reg' lam", value.get("lam", REG_STRENGTH[out["kind"]]), minimum=0)
    return out


def _apply_reg(recipe, value):
    kind, lam = (value, REG_STRENGTH.get(value, 0.0)) if isinstance(value, str) else (value["kind"], value["lam"])
    recipe.penalty, recipe.penalty_strength = None, 0.0
    if kind == "weight_decay":
        recipe.optimizer, recipe.weight_decay = "adamw", float(lam)
    elif kind != "none":
        recipe.penalty, recipe.penalty_strength = kind, float(lam)


def _apply_init(recipe, value):
    recipe.init = value


def _apply_loss(recipe, value):
    recipe.loss = value


def _apply_steps(recipe, value):
    recipe.steps = value


def _check_steps(value):
    return validate_int("factor 'steps'", value, minimum=1)


def _check_lr(value):
    return validate_number("factor 'lr'", value, minimum=0, open_low=True)


def _apply_pseudo(recipe, value):
    recipe.pseudo = value == "lab07"


def _apply_lr(recipe, value):
    recipe.lr = float(value)


FACTORS: dict[str, Factor] = {f.name: f for f in [
    Factor("augment", ["none", "shift", "flip_shift", "strong", "mixup"], _apply_augment,
           "data augmentation: none; shift by <= 1 pixel; mirror (p=0.5) + shift; strong (shift <= 2, a 3x3 "
           "patch erased, noise); mixup = shift + mixup with alpha 0.2"),
    Factor("distill", ["none", {"T": 4.0, "alpha": 0.7}], _apply_distill,
           "knowledge distillation from a wider teacher CNN (Hinton et al. 2015): 'none' or {'T', 'alpha'}",
           validate=_check_distill),
    Factor("init", ["scratch", "pretrained"], _apply_init,
           "fine-tune from pre-trained convolutions versus train from scratch (this is not distillation)"),
    Factor("reg", ["none", "l1", "l2", "elastic", "weight_decay"], _apply_reg,
           "regularisation: L1, L2 or elastic net in the loss, or decoupled weight decay (AdamW); default "
           "strengths " + ", ".join(f"{k} {v:g}" for k, v in REG_STRENGTH.items()) + "; or {'kind', 'lam'}",
           validate=_check_reg),
    Factor("loss", ["ce", "smooth", "focal"], _apply_loss,
           "cross-entropy, label smoothing (eps 0.1), focal (gamma 2)"),
    Factor("steps", [50, 150, 400], _apply_steps, "training length in optimizer steps (any int >= 1)",
           validate=_check_steps),
    Factor("pseudo", ["none", "lab07"], _apply_pseudo,
           "add the unlabelled pool with lab 07's GaussianEM pseudo-labels (posterior >= 0.9)"),
    Factor("lr", [3e-3, 1e-2, 3e-2], _apply_lr, "learning rate (any number > 0)", validate=_check_lr),
]}


def factor_source(factor: Factor) -> str:
    """A stable text identifying what a factor does, for a trial's hash.

    A shipped factor (its ``apply`` lives in this module): its name, the function's name and :data:`VERSION`.
    A user's factor: the source of ``apply`` (``inspect.getsource``), else a hash of ``cloudpickle.dumps``.
    """
    if not isinstance(factor, Factor):
        raise ArgumentError(f"factor must be a Factor, got {type(factor).__name__}")
    fn = factor.apply
    if getattr(fn, "__module__", None) == __name__:
        return f"{factor.name}:{__name__}.{getattr(fn, '__qualname__', fn)}:v{VERSION}"
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        import cloudpickle

        src = "cloudpickle:" + hashlib.sha256(cloudpickle.dumps(fn)).hexdigest()
    return f"{factor.name}:user:{src.strip()}"
