"""Lab 08: ablation studies with a harness that loses nothing: paired seeds, confidence intervals, crash-safe resume.

* :mod:`.factors`: the components a study changes, each a :class:`Factor` (augmentation, knowledge distillation,
  fine-tuning from pre-trained weights, L1/L2/elastic-net penalties and decoupled weight decay, cross-entropy /
  label smoothing / focal loss, training length, lab 07's pseudo-labels, learning rate), and the losses, penalties
  and augmentations themselves.
* :mod:`.training`: one trial, a small CNN (:func:`labkit.models.digits_cnn`) trained on 200 labelled digits under a
  :class:`Recipe` (``run_trial``).
* :mod:`.study`: :class:`Study` (a baseline, factors, seeds, one-at-a-time or grid design), the trial hash,
  study files in TOML (:func:`load_study`).
* :mod:`.store`: the SQLite results file (:class:`Store`), crash-safe; :func:`merge` of shard files.
* :mod:`.runner`: :func:`run_study`, worker processes (N CPU workers with one thread; one per GPU for a trial with
  ``uses_gpu = True``), resume.
* :mod:`.stats`: the t distribution, paired differences with t or bootstrap intervals, Holm's adjustment.
* :mod:`.plots`: the differences with their intervals, learning curves.
* :mod:`.reporting`: :func:`report` (the table, CSV, pandas) and :func:`selection_bias` ("best of N").
* :mod:`.cli`: ``python -m labkit ablate``.
* :mod:`.lab`: the rank function, the notebook's runners, exercise checks, tour; :mod:`.bench`.
"""
import importlib

# Exported lazily (PEP 562): a worker process or the command line that needs only the store or the study does not
# import torch. ``from labkit.ablation import Study`` works as usual.
_EXPORTS = {
    "factors": ["Factor", "FACTORS"],
    "training": ["Recipe", "BASELINE", "run_trial"],
    "study": ["Study", "load_study", "StudyFileError", "trial_key"],
    "store": ["Store", "StoreError", "MergeConflict", "merge"],
    "runner": ["run_study", "RunSummary"],
    "reporting": ["report", "Report", "selection_bias"],
    "stats": ["paired_difference", "holm", "mean_ci"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
