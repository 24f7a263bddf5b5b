"""Self-training with a confidence threshold (scikit-learn style, ``-1`` = unlabelled), and its failure modes.

Loop: fit the base model on the labelled points (and the pseudo-labels so far); predict the unlabelled ones;
every prediction whose top probability is at least ``threshold`` becomes a pseudo-label; repeat until nothing
new passes, everything is labelled, or ``max_iter``. (scikit-learn's ``SelfTrainingClassifier`` does the same;
this one keeps a per-iteration log and says when it goes wrong.)

Failures it detects (``failures_`` after ``fit``; :meth:`SelfTraining.diagnose` with the hidden labels adds the
third):

* ``"nothing_passed"``: no prediction reached the threshold, so self-training added nothing (an under-confident
  model, e.g. a heavily regularised one, or a threshold of 1.0);
* ``"collapse"``: the pseudo-labels pile onto a few classes (per-class counts against the labelled class
  shares), typical with very few labels;
* ``"wrong_labels"``: the pseudo-labels that passed are often wrong (an over-confident model passes the
  threshold with its mistakes, which it then learns as truth: confirmation bias).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin
from sklearn.utils.metaestimators import available_if

from .._validate import validate_int, validate_number
from .confidence import validate_threshold
from .generative import _check_labels, _check_X, _NotFitted, labelled_mask

__all__ = ["SelfTraining", "Failure", "pseudo_label_counts", "EXPECTED_FAILED_CHECKS"]

# checks of scikit-learn 1.9's check_estimator that SelfTraining fails on purpose (the same two as scikit-learn's
# own SelfTrainingClassifier: the first it fails, the second it is spared by name), each with the reason
EXPECTED_FAILED_CHECKS = {
    "check_non_transformer_estimators_n_iter":
        "n_iter_ counts rounds of pseudo-labelling; with every point labelled (the check's data) there is no round "
        "and n_iter_ is 0 (scikit-learn's SelfTrainingClassifier fails this check for the same reason)",
    "check_classifiers_classes":
        "its last case names two classes -1 and 1, and -1 is the semi-supervised convention's 'unlabelled' "
        "(scikit-learn passes integer labels instead to its own SelfTrainingClassifier, by name, in this check)",
}


@dataclass(frozen=True)
class Failure:
    kind: str      # "nothing_passed", "collapse" or "wrong_labels"
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def pseudo_label_counts(labels, classes) -> np.ndarray:
    """How many pseudo-labels each class received (``labels`` holds only pseudo-labelled points)."""
    labels = np.asarray(labels)
    return np.array([(labels == c).sum() for c in classes], dtype=int)


def _estimator_has(attr):
    return lambda self: hasattr(self.estimator_ if hasattr(self, "estimator_") else self.estimator, attr)


class SelfTraining(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """Self-training around any classifier with ``fit`` and ``predict_proba`` (``clone``-d every iteration); a
    scikit-learn meta-estimator (``clone``, ``Pipeline``, ``GridSearchCV`` with ``estimator__*`` parameters,
    ``cross_val_score``; ``check_estimator`` passes but for :data:`EXPECTED_FAILED_CHECKS`).

    estimator: the base classifier (not fitted by ``fit``: clones of it are).
    threshold: a pseudo-label needs ``max predict_proba >= threshold``, in (0, 1].
    max_iter: rounds of pseudo-labelling (>= 1).
    collapse_factor: a class receiving >= this many times its labelled share of the pseudo-labels (or half the
        classes receiving <= 1/collapse_factor of theirs) is reported as a collapse.

    Labels follow ``sklearn.semi_supervised``: with integer labels ``-1`` is unlabelled; class names (strings) are
    accepted for a fully labelled fit (then there is nothing to pseudo-label). ``score(X, y)`` is the accuracy on
    every row of ``y``, as ``SelfTrainingClassifier.score`` (which hands ``y`` to its base estimator's accuracy):
    a ``-1`` in ``y`` counts as a miss, so score on the true labels of held-out points.

    Attributes after ``fit``: ``classes_``, ``estimator_`` (the last fitted model), ``transduction_`` (labels of
    every training point, ``-1`` where none passed), ``labeled_iter_`` (0 = given, i = added in round i, -1 =
    never), ``n_iter_``, ``termination_condition_`` ("no_change", "all_labeled", "max_iter"), ``history_`` (per
    round: added, per-class counts, max confidence, pseudo-label accuracy if ``y_true`` was given),
    ``pseudo_counts_`` (per class, all rounds), ``failures_``, ``n_features_in_``.
    """

    def __init__(self, estimator, threshold: float = 0.9, max_iter: int = 10, collapse_factor: float = 3.0):
        self.estimator = estimator
        self.threshold = threshold
        self.max_iter = max_iter
        self.collapse_factor = collapse_factor

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # accepted, made dense before the base estimator sees it
        return tags

    def _new_model(self):
        from sklearn.base import clone

        try:
            return clone(self.estimator)
        except Exception:  # not a scikit-learn estimator: rebuild from its parameters
            return type(self.estimator)(**self.estimator.get_params())

    def fit(self, X, y, y_true=None) -> "SelfTraining":
        """Fit on ``X`` with ``y`` (``-1`` = unlabelled). ``y_true`` (optional, hidden labels of every point) is
        used only to log the pseudo-labels' accuracy, never to train."""
        threshold = validate_threshold(self.threshold)
        max_iter = validate_int("max_iter", self.max_iter, minimum=1)
        validate_number("collapse_factor", self.collapse_factor, minimum=1, open_low=True)
        X = _check_X(X, estimator=self, reset=True)
        y = _check_labels(y, len(X))
        if y_true is not None:
            y_true = np.asarray(y_true)
            if len(y_true) != len(y):
                raise ValueError(f"y_true must have one label per row of X ({len(y)}), got {len(y_true)}")
        given = labelled_mask(y)
        self.classes_ = np.unique(y[given])
        self.transduction_ = y.copy()
        self.labeled_iter_ = np.where(given, 0, -1)
        self.history_ = []
        self.termination_condition_ = "max_iter"
        self.n_iter_ = 0
        for it in range(1, max_iter + 1):
            known = self.labeled_iter_ >= 0
            self.estimator_ = self._new_model().fit(X[known], self.transduction_[known])
            todo = np.flatnonzero(~known)
            if len(todo) == 0:
                self.termination_condition_ = "all_labeled"
                break
            proba = self.estimator_.predict_proba(X[todo])
            conf = proba.max(axis=1)
            ok = conf >= threshold
            new = np.asarray(self.estimator_.classes_)[proba.argmax(axis=1)][ok]
            rec = {"iteration": it, "added": int(ok.sum()), "max_confidence": float(conf.max()),
                   "counts": pseudo_label_counts(new, self.classes_).tolist()}
            if y_true is not None:
                rec["accuracy"] = float((new == y_true[todo[ok]]).mean()) if ok.any() else float("nan")
            self.history_.append(rec)
            self.n_iter_ = it
            if not ok.any():
                self.termination_condition_ = "no_change"
                break
            self.transduction_[todo[ok]] = new
            self.labeled_iter_[todo[ok]] = it
        else:
            known = self.labeled_iter_ >= 0
            self.estimator_ = self._new_model().fit(X[known], self.transduction_[known])
        pseudo = self.labeled_iter_ > 0
        self.pseudo_counts_ = pseudo_label_counts(self.transduction_[pseudo], self.classes_)
        self._labelled_share = pseudo_label_counts(y[given], self.classes_) / given.sum()
        self.failures_ = self._failures_without_truth()
        return self

    def _failures_without_truth(self) -> list[Failure]:
        out = []
        first = self.history_[0] if self.history_ else None
        if first is not None and first["added"] == 0:
            out.append(Failure("nothing_passed", f"no unlabelled prediction reached threshold {self.threshold:g} "
                               f"(the highest confidence was {first['max_confidence']:.3f}), so self-training "
                               f"added nothing: the model is under-confident; calibrate it or lower the threshold"))
        total = self.pseudo_counts_.sum()
        if total >= 2 * len(self.classes_):
            share = self.pseudo_counts_ / total
            ratio = share / np.maximum(self._labelled_share, 1e-12)
            f = float(self.collapse_factor)
            starved = int((ratio <= 1 / f).sum())
            if ratio.max() >= f or starved >= len(self.classes_) / 2:
                top = np.argsort(-self.pseudo_counts_)[:3]
                desc = ", ".join(f"class {self.classes_[i]}: {self.pseudo_counts_[i]}" for i in top)
                out.append(Failure("collapse", f"the pseudo-labels pile onto a few classes ({desc} of {total}; "
                                   f"{starved} of {len(self.classes_)} classes got at most 1/{f:g} of their share): "
                                   f"add labels, raise the threshold, or cap pseudo-labels per class"))
        return out

    def diagnose(self, y_true, min_precision: float = 0.9) -> list[Failure]:
        """``failures_`` plus ``"wrong_labels"`` when the pseudo-labels' precision (against the hidden
        ``y_true``) is below ``min_precision``."""
        if not hasattr(self, "failures_"):
            raise RuntimeError("call fit(X, y) before diagnose(y_true)")
        min_precision = validate_number("min_precision", min_precision, minimum=0, maximum=1)
        y_true = np.asarray(y_true)
        if len(y_true) != len(self.transduction_):
            raise ValueError(f"y_true must have one label per training point ({len(self.transduction_)}), "
                             f"got {len(y_true)}")
        out = list(self.failures_)
        pseudo = self.labeled_iter_ > 0
        if pseudo.any():
            prec = float((self.transduction_[pseudo] == y_true[pseudo]).mean())
            if prec < min_precision:
                out.append(Failure("wrong_labels", f"{1 - prec:.0%} of the {int(pseudo.sum())} pseudo-labels that "
                                   f"passed threshold {self.threshold:g} are wrong (precision {prec:.3f} < "
                                   f"{min_precision:g}): the model is over-confident; calibrate it (temperature "
                                   f"scaling on held-out labelled points) or raise the threshold"))
        return out

    def pseudo_label_precision(self, y_true) -> float:
        pseudo = self.labeled_iter_ > 0
        return (float((self.transduction_[pseudo] == np.asarray(y_true)[pseudo]).mean()) if pseudo.any()
                else float("nan"))

    def _fitted_X(self, X):
        if not hasattr(self, "estimator_"):
            raise _NotFitted("this SelfTraining is not fitted yet: call fit(X, y) first")
        return _check_X(X, estimator=self, reset=False)

    def predict_proba(self, X):
        X = self._fitted_X(X)
        return self.estimator_.predict_proba(X)

    def predict(self, X):
        X = self._fitted_X(X)
        return self.estimator_.predict(X)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X):
        X = self._fitted_X(X)
        return self.estimator_.decision_function(X)
