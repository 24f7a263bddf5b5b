"""What labkit's scikit-learn estimators share (k-means of lab 06; the generative model and self-training of lab 07).

``validate_data``: scikit-learn's input check (features counted and named), as a function on every admitted
scikit-learn (a method before 1.6). ``NotFitted``: the error of an estimator used before ``fit``, scikit-learn's
``NotFittedError`` and also the ``RuntimeError`` labkit raised before, so old callers still catch it.
"""
from __future__ import annotations

from sklearn.exceptions import NotFittedError

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data
except ImportError:  # older scikit-learn (pyproject admits 1.3): the same check as a method
    def validate_data(estimator, X, *, ensure_all_finite=True, **kwargs):
        return estimator._validate_data(X, force_all_finite=ensure_all_finite, **kwargs)

__all__ = ["NotFitted", "validate_data"]


class NotFitted(NotFittedError, RuntimeError):
    """scikit-learn's NotFittedError that is also the RuntimeError labkit raised before (old callers catch that)."""
