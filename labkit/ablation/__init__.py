"""Lab 08: ablation studies with a harness that loses nothing: paired seeds, confidence intervals, crash-safe resume.

* :mod:`.factors`: the components a study changes, each a :class:`Factor` (augmentation, knowledge distillation,
  fine-tuning from pre-trained weights, L1/L2/elastic-net penalties and decoupled weight decay, cross-entropy /
  label smoothing / focal loss, training length, lab 07's pseudo-labels, learning rate), and the losses, penalties
  and augmentations themselves.
* :mod:`.training`: one trial, a small CNN trained on 200 labelled digits under a :class:`Recipe` (``run_trial``).
* :mod:`.study`: :class:`Study` (a baseline, factors, seeds, one-at-a-time or grid design), the trial hash,
  study files in TOML (:func:`load_study`).
* :mod:`.store`: the SQLite results file (:class:`Store`), crash-safe; :func:`merge` of shard files.
* :mod:`.runner`: :func:`run_study`, worker processes (one per GPU, else N CPU workers with one thread), resume.
* :mod:`.stats`: the t distribution, paired differences with t or bootstrap intervals, Holm's adjustment.
* :mod:`.report`: :func:`report` (the table, CSV, pandas, charts) and :func:`selection_bias` ("best of N").
* :mod:`.cli`: ``python -m labkit ablate``.
"""
from .factors import FACTORS, Factor
from .report import Report, report, selection_bias
from .runner import RunSummary, run_study
from .stats import holm, mean_ci, paired_difference
from .store import MergeConflict, Store, StoreError, merge
from .study import Study, StudyFileError, load_study, trial_key
from .training import BASELINE, Recipe, run_trial

__all__ = ["Factor", "FACTORS", "Recipe", "BASELINE", "run_trial", "Study", "load_study", "StudyFileError",
           "trial_key", "Store", "StoreError", "MergeConflict", "merge", "run_study", "RunSummary", "report",
           "Report", "selection_bias", "paired_difference", "holm", "mean_ci"]
