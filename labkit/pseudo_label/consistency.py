"""A small CNN on the 8x8 digits (:func:`labkit.models.pooled_digits_cnn`) trained with online pseudo-labels, and
the weak/strong consistency variant.

Three modes share one model, one optimiser and one loop (:func:`train_cnn`):

* ``"supervised"``: cross-entropy on the labelled points only (weakly augmented). The baseline.
* ``"pseudo_label"``: Lee (2013)-style online pseudo-labels: every step, the model's own prediction on an
  unlabelled batch becomes its target where the top probability is at least ``threshold``; the loss is taken
  on the *same* view the prediction came from.
* ``"fixmatch"``: Sohn et al. (2020): the pseudo-label comes from a **weak** view (a shift of at most 1 pixel)
  and the loss is taken on a **strong** view of the same image (shift up to 2 pixels, noise, a cut-out
  square, contrast change). The model must give the same answer on both: a consistency constraint, the
  "constraint learning" the source article points towards, made precise.

Each step logs the **mask rate** (share of the unlabelled batch whose confidence passed the threshold) and the
**pseudo-label accuracy** (share of those whose pseudo-label equals the hidden true label; the true labels are
used for this log only, never for training).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._compat import warn_renamed
from .._validate import ArgumentError, validate_choice, validate_int, validate_number
from .generative import validate_semi_supervised

__all__ = ["train_cnn", "CNNRun", "weak_augment", "strong_augment", "MODES"]

MODES = ("supervised", "pseudo_label", "fixmatch")


def SmallCNN(n_classes: int = 10):
    """Deprecated: :func:`labkit.models.pooled_digits_cnn` (``classes=``), the same layers and initialisation."""
    from ..models import pooled_digits_cnn

    warn_renamed("labkit.pseudo_label.SmallCNN(n_classes)", "labkit.models.pooled_digits_cnn(classes=n_classes)")
    return pooled_digits_cnn(classes=n_classes)


def _shift(x, max_shift: int, gen):
    """Translate every image by a random (dy, dx) in [-max_shift, max_shift] pixels, zero-filled."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
    idx = torch.arange(n)[:, None, None].expand(n, h, w)
    return padded[idx, 0, rows, cols].unsqueeze(1)


def weak_augment(x, gen):
    """A shift of at most one pixel."""
    return _shift(x, 1, gen)


def strong_augment(x, gen):
    """Shift up to 2 pixels, a 3x3 cut-out, contrast scaling in [0.6, 1.4] and Gaussian noise (sd 0.1)."""
    import torch

    x = _shift(x, 2, gen)
    n = x.shape[0]
    cy = torch.randint(0, 6, (n,), generator=gen)
    cx = torch.randint(0, 6, (n,), generator=gen)
    r = torch.arange(8)
    box = ((r[None, :, None] >= cy[:, None, None]) & (r[None, :, None] < cy[:, None, None] + 3)
           & (r[None, None, :] >= cx[:, None, None]) & (r[None, None, :] < cx[:, None, None] + 3))
    x = x * (~box).unsqueeze(1)
    scale = 0.6 + 0.8 * torch.rand((n, 1, 1, 1), generator=gen)
    return (x * scale + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1.5)


@dataclass
class CNNRun:
    mode: str
    steps: int
    test_accuracy: float | None
    mask_rate: list = field(default_factory=list)          # per step, share of the unlabelled batch used
    pseudo_accuracy: list = field(default_factory=list)    # per step, right share of the used pseudo-labels (nan: none)
    loss: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        pa = np.array(self.pseudo_accuracy, dtype=float)
        tail = slice(-max(1, len(pa) // 5), None)
        return {"mode": self.mode, "steps": self.steps, "test accuracy": self.test_accuracy,
                "mask rate (last 20%)": float(np.nanmean(self.mask_rate[tail]))
                if np.isfinite(np.asarray(self.mask_rate[tail], dtype=float)).any() else float("nan"),
                "pseudo-label accuracy (last 20%)": float(np.nanmean(pa[tail])) if np.isfinite(pa[tail]).any()
                else float("nan"), "seconds": self.seconds}


def _as_images(X):
    import torch

    X = np.asarray(X, dtype=np.float32)
    if X.ndim == 2 and X.shape[1] == 64:
        X = X.reshape(-1, 1, 8, 8)
    if X.ndim != 4 or X.shape[1:] != (1, 8, 8):
        raise ArgumentError(f"X must be 8x8 digit images, (n, 64) or (n, 1, 8, 8), got shape {X.shape}")
    return torch.from_numpy(X)


def train_cnn(X, y_semi, mode: str = "fixmatch", *, steps: int = 300, threshold: float = 0.95,
              lambda_u: float = 1.0, batch_labelled: int = 32, batch_unlabelled: int = 128, lr: float = 3e-3,
              warmup: int = 0, seed: int = 0, y_true=None, X_test=None, y_test=None, threads: int | None = 1,
              return_model: bool = False):
    """Train :func:`labkit.models.pooled_digits_cnn` for ``steps`` steps; return a :class:`CNNRun` (and the model
    if asked).

    X: (n, 64) digits in [0, 1] (or (n, 1, 8, 8)); y_semi: labels, ``-1`` for unlabelled.
    threshold: confidence a prediction needs to become a pseudo-label, in (0, 1].
    warmup: the first ``warmup`` of the ``steps`` steps use the labelled loss only (no unlabelled batch; their
        mask rate and pseudo-label accuracy are logged as nan), so that the pseudo-labels start from a model that
        is already confident about some points. ``0 <= warmup <= steps``; it changes nothing in "supervised" mode.
    y_true: the hidden labels of every training point, for the pseudo-label accuracy log only.
    threads: torch threads during training (1 on a shared 2-core machine; None leaves torch's setting).
    """
    import time

    import torch
    import torch.nn.functional as F

    from ..models import pooled_digits_cnn

    validate_choice("mode", mode, MODES)
    steps = validate_int("steps", steps, minimum=1)
    threshold = validate_number("threshold", threshold, minimum=0, maximum=1, open_low=True,
                             hint="a probability in (0, 1]; 1 admits only predictions of exactly 1")
    validate_number("lambda_u", lambda_u, minimum=0)
    validate_int("batch_labelled", batch_labelled, minimum=1)
    validate_int("batch_unlabelled", batch_unlabelled, minimum=1)
    validate_number("lr", lr, minimum=0, open_low=True)
    seed = validate_int("seed", seed, minimum=0)
    warmup = validate_int("warmup", warmup, minimum=0, maximum=steps,
                          hint=f"a number of steps from 0 to steps={steps}")
    Xf, y_semi = validate_semi_supervised(np.asarray(X, dtype=float).reshape(len(X), -1), y_semi, name_y="y_semi")
    if y_true is not None and len(y_true) != len(Xf):
        raise ArgumentError(f"y_true must have one label per row of X ({len(Xf)}), got {len(y_true)}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(validate_int("threads", threads, minimum=1))
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        images = _as_images(Xf)
        lab = np.flatnonzero(y_semi >= 0)
        unl = np.flatnonzero(y_semi < 0)
        yl = torch.as_tensor(y_semi[lab], dtype=torch.int64)
        truth = None if y_true is None else torch.as_tensor(np.asarray(y_true)[unl], dtype=torch.int64)
        model = pooled_digits_cnn(classes=int(y_semi.max()) + 1)  # initialised from the seed just set
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        run = CNNRun(mode, steps, None)
        t0 = time.perf_counter()
        for step in range(steps):
            bi = torch.randint(0, len(lab), (batch_labelled,), generator=gen)
            xl = weak_augment(images[lab][bi], gen)
            loss = F.cross_entropy(model(xl), yl[bi])
            if mode != "supervised" and len(unl) and step < warmup:   # labelled loss only, nothing to log
                run.mask_rate.append(float("nan"))
                if truth is not None:
                    run.pseudo_accuracy.append(float("nan"))
            elif mode != "supervised" and len(unl):
                ui = torch.randint(0, len(unl), (batch_unlabelled,), generator=gen)
                xu = images[unl][ui]
                weak = weak_augment(xu, gen)
                if mode == "fixmatch":
                    with torch.no_grad():
                        probs = F.softmax(model(weak), dim=1)
                    logits_u = model(strong_augment(xu, gen))
                else:  # the same view gives the pseudo-label and takes the loss
                    logits_u = model(weak)
                    probs = F.softmax(logits_u.detach(), dim=1)
                conf, pseudo = probs.max(dim=1)
                mask = (conf >= threshold).float()
                loss_u = (F.cross_entropy(logits_u, pseudo, reduction="none") * mask).mean()
                loss = loss + lambda_u * loss_u
                run.mask_rate.append(float(mask.mean()))
                if truth is not None:
                    used = mask.bool()
                    run.pseudo_accuracy.append(float((pseudo[used] == truth[ui][used]).float().mean())
                                               if used.any() else float("nan"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.loss.append(float(loss.detach()))
        run.seconds = time.perf_counter() - t0
        if X_test is not None and y_test is not None:
            with torch.no_grad():
                pred = model(_as_images(np.asarray(X_test, dtype=np.float32).reshape(len(X_test), -1))).argmax(1)
            run.test_accuracy = float((pred.numpy() == np.asarray(y_test)).mean())
    finally:
        torch.set_num_threads(old_threads)
    return (run, model) if return_model else run
