"""Lab 07: generative pseudo-labelling, calibrated confidence, self-training and consistency training.

* :mod:`.generative`: :class:`GaussianEM`, a Gaussian class-conditional classifier P(x|y)P(y) in a PCA space
  (full / tied / diagonal / spherical covariances with shrinkage) fitted by EM on labelled + unlabelled points
  (weight ``lam`` on the unlabelled part; Nigam et al. 2000); its E-step :func:`e_step`.
* :mod:`.confidence`: the article's D = P(y_hat|x) / P(not y_hat|x) as posterior odds, reliability diagrams,
  expected calibration error, temperature scaling (fitted on held-out labelled points).
* :mod:`.self_training`: :class:`SelfTraining` with a threshold, detecting its failures (nothing passes,
  wrong labels pass, collapse onto a few classes).
* :mod:`.consistency`: :func:`train_cnn`, a small CNN on the 8x8 digits (:func:`labkit.models.pooled_digits_cnn`)
  with online pseudo-labels and a FixMatch-style weak/strong variant, logging the mask rate and the pseudo-label
  accuracy per step.
* :mod:`.methods`: the lab's methods for :func:`labkit.semisup.evaluate` (hyper-parameters fixed in advance), read
  through :mod:`.lab`.
* :mod:`.lab`: the rank function, the notebook's runners, exercise checks, tour; :mod:`.plots`; :mod:`.bench`.
"""
from .._compat import moved_names
from .confidence import (
    cross_fitted_temperature,
    expected_calibration_error,
    fit_temperature,
    odds_to_posterior_threshold,
    posterior_odds,
    posterior_to_odds_threshold,
    reliability_diagram,
    softmax,
)
from .consistency import MODES, strong_augment, train_cnn, weak_augment
from .consistency import SmallCNN as SmallCNN  # the old name, kept one release: it warns once, when called
from .generative import COVARIANCE_TYPES, GaussianEM, e_step, log_joint
from .self_training import Failure, SelfTraining, pseudo_label_counts

__all__ = ["GaussianEM", "e_step", "log_joint", "COVARIANCE_TYPES",
           "posterior_odds", "odds_to_posterior_threshold", "posterior_to_odds_threshold", "softmax",
           "reliability_diagram", "expected_calibration_error", "fit_temperature", "cross_fitted_temperature",
           "SelfTraining", "Failure", "pseudo_label_counts",
           "train_cnn", "weak_augment", "strong_augment", "MODES"]

__getattr__ = moved_names(__name__, {
    "check_semi_supervised": "labkit.pseudo_label.generative:validate_semi_supervised",
    "validate_semi_supervised": "labkit.pseudo_label.generative:validate_semi_supervised",
})
