"""A study: a baseline configuration, the factors to change and their values, the seeds, and a design.

* ``design="one-at-a-time"`` (an ablation): the baseline, then each factor's alternative values one at a time, every
  other factor at its baseline value. What each component contributes, measured against one fixed reference.
* ``design="grid"``: every combination of the values of the factors in ``grid`` (default: every factor changed),
  the rest at the baseline. Shows interactions, at the price of many more trials.

Seeds are replicates, and every configuration runs on the same seeds as the baseline, so that the report can pair
them (seed s of a variant against seed s of the baseline: the same initial weights and batch order, where the
trial function uses the seed for them).

A trial is identified by :func:`trial_key`: a hash of its configuration, its seed and the version of the code that
runs it (the source of the trial function and of every factor it uses), so a finished trial is never run twice and
a changed training function makes new trials instead of mixing old results with new ones.

:func:`load_study` reads a study from a TOML file (Python's ``tomllib``); its errors name the line and the key.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .._validate import ArgumentError, validate_choice, validate_int

__all__ = ["Study", "Trial", "DESIGNS", "trial_key", "code_version", "load_study", "StudyFileError", "label_of",
           "default_trial", "spec_keys"]

DESIGNS = ("one-at-a-time", "grid")
_KEYS = {"name", "seeds", "design", "grid", "metric", "lower_is_better", "trial", "baseline", "factors"}


class StudyFileError(ValueError):
    """A study file that cannot be used: the message names the file, the line and the key."""


class _Bad(ArgumentError):
    """A bad study argument, remembering which table and key it came from (for the study file's line)."""

    def __init__(self, message: str, table: str | None = None, key: str | None = None):
        super().__init__(message)
        self.table, self.key = table, key


def default_trial() -> Callable:
    """The lab's trial: :func:`labkit.ablation.training.run_trial` (a small CNN on the digits)."""
    from .training import run_trial

    return run_trial


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def label_of(changed: dict) -> str:
    """``"baseline"`` or ``"augment=mixup, loss=focal"``: what a configuration changes."""
    if not changed:
        return "baseline"
    parts = []
    for k, v in changed.items():
        if isinstance(v, dict):
            v = ",".join(f"{a}={b}" for a, b in v.items())
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def _source_of(fn: Callable) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        import cloudpickle

        return hashlib.sha256(cloudpickle.dumps(fn)).hexdigest()


def code_version(trial_fn: Callable | None = None, sources: dict[str, str] | None = None) -> str:
    """A short hash of the code a trial runs: the trial function's module source (or its own source, for a function
    defined in a notebook; for the lab's own trial, also :mod:`labkit.ablation.factors` and :mod:`labkit.models`)
    and the factors' sources (``{name: text}``)."""
    fn = trial_fn or default_trial()
    h = hashlib.sha256()
    mod = inspect.getmodule(fn)
    path = getattr(mod, "__file__", None)
    if path and os.path.exists(path) and getattr(mod, "__name__", "") != "__main__":
        with open(path, "rb") as f:
            h.update(f.read())
        if getattr(fn, "__module__", "") == "labkit.ablation.training":  # the lab's trial: its factors and its CNN too
            import labkit.ablation.factors as factors  # not `from . import`: the package imports this module
            import labkit.models as models  # labkit.models.digits_cnn, the model every trial trains

            for dep in (factors, models):
                with open(dep.__file__, "rb") as f:
                    h.update(f.read())
    else:
        h.update(_source_of(fn).encode())
    for name in sorted(sources or {}):
        h.update(f"{name}\0{sources[name]}\0".encode())
    return h.hexdigest()[:12]


def trial_key(config: dict, seed: int, code: str) -> str:
    """The trial's identity: a hash of its configuration, its seed and its code version."""
    return hashlib.sha256(f"{_canon(config)}|{seed}|{code}".encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Trial:
    key: str
    label: str
    config: dict
    seed: int
    code: str


@dataclass
class Study:
    """A study. ``factors`` maps a factor's name to the values to try *instead of* the baseline's.

    ``registry`` is the factors known to the trial function (default: the lab's :data:`FACTORS`); add your own
    :class:`~labkit.ablation.factors.Factor` objects with ``extra_factors=[...]``. ``trial`` is the function
    ``trial(config, seed) -> dict`` (it may also take ``factors=``) whose result holds ``metric``.
    """

    name: str
    baseline: dict
    factors: dict
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    design: str = "one-at-a-time"
    grid: list | None = None
    metric: str = "accuracy"
    lower_is_better: bool = False
    trial: Callable | None = None
    extra_factors: list = field(default_factory=list)
    registry: dict | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[\w.\-]+", self.name):
            raise ArgumentError(f"name must be a word of letters, digits, '.', '-' or '_', got {self.name!r}")
        validate_choice("design", self.design, DESIGNS)
        if not isinstance(self.baseline, dict) or not self.baseline:
            raise ArgumentError(f"baseline must be a non-empty dict {{factor: value}}, got {self.baseline!r}; "
                                "an ablation changes things against a stated baseline")
        if not isinstance(self.factors, dict):
            raise ArgumentError(f"factors must be a dict {{factor: [values to try]}}, got {self.factors!r}")
        if not self.factors:
            raise ArgumentError("factors is empty: a study compares the baseline with at least one change; give "
                                "factors={name: [values to try]}")
        seeds = list(self.seeds) if not isinstance(self.seeds, (str, bytes)) else None
        if not seeds:
            raise ArgumentError(f"seeds must be a non-empty list of ints, got {self.seeds!r}")
        self.seeds = [validate_int(f"seeds[{i}]", s) for i, s in enumerate(seeds)]
        if len(set(self.seeds)) != len(self.seeds):
            raise ArgumentError(f"seeds must not repeat, got {self.seeds}; each seed is one replicate")
        if self.registry is None and self.trial is None:
            from .factors import FACTORS

            self.registry = dict(FACTORS)
        elif self.registry is None:  # a custom trial function: values are any JSON, unless factors are added
            self.registry = {}
        for f in self.extra_factors:
            self.registry[f.name] = f
        for name, value in self.baseline.items():
            self._check_value(name, value, "baseline")
        for name, values in self.factors.items():
            if name not in self.baseline:
                raise _Bad(f"factors[{name!r}] has no baseline value; add {name} = ... to the baseline "
                           f"(baseline has: {', '.join(self.baseline)})", "factors", name)
            if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
                raise _Bad(f"factors[{name!r}] must be a list of values to try, got {values!r}", "factors", name)
            values = list(values)
            if not values:
                raise _Bad(f"factors[{name!r}] is empty: give at least one value other than the baseline's",
                           "factors", name)
            for v in values:
                self._check_value(name, v, f"factors[{name!r}]")
                if _canon(v) == _canon(self.baseline[name]):
                    raise _Bad(f"factors[{name!r}] lists the baseline value {v!r}; list only the values to try "
                               "instead of it (the baseline runs anyway)", "factors", name)
            self.factors[name] = values
        if self.grid is not None:
            for g in self.grid:
                if g not in self.factors:
                    raise _Bad(f"grid names {g!r}, which is not among the factors ({', '.join(self.factors)})",
                               None, "grid")
        if self.trial is None:
            self.trial = default_trial()
        if self.design == "grid" and self.grid is not None and not self.grid:
            raise ArgumentError("grid is empty: name the factors to combine, or use design='one-at-a-time'")

    def _check_value(self, name: str, value: Any, where: str) -> None:
        table = "baseline" if where == "baseline" else "factors"
        if not self.registry:  # a custom trial function: any JSON value
            try:
                _canon(value)
            except TypeError:
                raise _Bad(f"{where}: value {value!r} of {name!r} must be a str, number, bool, list or dict (it is "
                           "stored as JSON)", table, name) from None
            return
        if name not in self.registry:
            raise _Bad(f"{where}: unknown factor {name!r}; factors are: {', '.join(sorted(self.registry))} (add "
                       "your own with extra_factors=[Factor(...)])", table, name)
        try:
            self.registry[name].check(value)
        except ArgumentError as e:
            raise _Bad(f"{where}: {e}", table, name) from None

    # ------------------------------------------------------------------ the design
    def configurations(self) -> list[tuple[str, dict, dict]]:
        """``(label, config, changed)`` for every configuration, the baseline first."""
        out = [("baseline", dict(self.baseline), {})]
        if self.design == "one-at-a-time":
            for name, values in self.factors.items():
                for v in values:
                    out.append((label_of({name: v}), {**self.baseline, name: v}, {name: v}))
        else:
            names = list(self.grid if self.grid is not None else self.factors)
            choices = [[self.baseline[n]] + list(self.factors[n]) for n in names]
            for combo in itertools.product(*choices):
                changed = {n: v for n, v in zip(names, combo) if _canon(v) != _canon(self.baseline[n])}
                if changed:
                    out.append((label_of(changed), {**self.baseline, **changed}, changed))
        return out

    def sources(self) -> dict[str, str]:
        if not self.registry:
            return {}
        from .factors import factor_source

        return {n: factor_source(self.registry[n]) for n in self.baseline if n in (self.registry or {})}

    def code(self) -> str:
        return code_version(self.trial, self.sources())

    def keys(self) -> dict[str, tuple[str, int]]:
        """``{trial key: (label, seed)}`` of every trial."""
        return {t.key: (t.label, t.seed) for t in self.trials()}

    def trials(self) -> list[Trial]:
        """Every (configuration, seed) trial, seed-major (all configurations on seed 0 first: a study stopped
        early has complete pairs)."""
        code = self.code()
        configs = self.configurations()
        return [Trial(trial_key(c, s, code), label, c, s, code) for s in self.seeds for label, c, _ in configs]

    def spec(self) -> dict:
        """What the results file records about the study (JSON)."""
        fn = self.trial
        return {"name": self.name, "baseline": self.baseline, "factors": self.factors, "seeds": self.seeds,
                "design": self.design, "grid": self.grid, "metric": self.metric,
                "lower_is_better": self.lower_is_better,
                "trial": f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', '?')}",
                "labels": [label for label, _, _ in self.configurations()],
                "configs": {label: config for label, config, _ in self.configurations()}, "code": self.code()}


def spec_keys(spec: dict) -> dict[str, tuple[str, int]]:
    """``{trial key: (label, seed)}`` from a study's recorded specification (:meth:`Study.spec`): a trial that two
    studies share (same configuration, seed and code) is found by both."""
    return {trial_key(spec["configs"][label], s, spec["code"]): (label, s) for s in spec["seeds"] for label in
            spec["labels"]}


# ---------------------------------------------------------------------------------------------- study files
def _line_of(text: str, key: str, table: str | None = None) -> int | None:
    """The line (1-based) where ``key`` is set, inside ``[table]`` when given."""
    current = None
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"\[\s*([\w.\-]+)\s*\]", s)
        if m:
            current = m.group(1)
            continue
        if re.match(rf"{re.escape(key)}\s*=", s) and current == table:
            return i
    return None


def load_study(path: str | os.PathLike, **overrides) -> Study:
    """A :class:`Study` from a TOML file::

        name = "digits"
        seeds = [0, 1, 2, 3, 4]
        design = "one-at-a-time"          # or "grid" (then grid = ["augment", "loss"], optional)
        trial = "package.module:function" # optional: default is the lab's CNN on the digits

        [baseline]
        augment = "shift"
        steps = 150

        [factors]
        augment = ["none", "mixup"]
        distill = [{T = 4.0, alpha = 0.7}]

    Errors name the file, the line and the key (``StudyFileError``)."""
    import tomllib

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise StudyFileError(f"study file {path}: {e.strerror}; pass the path of a .toml study file") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StudyFileError(f"study file {path}: not valid TOML: {e}") from None

    def where(key, table=None):
        line = _line_of(text, key, table)
        return f"study file {path}, line {line}, key {(table + '.') if table else ''}{key}" if line else \
            f"study file {path}, key {(table + '.') if table else ''}{key}"

    for k in data:
        if k not in _KEYS:
            raise StudyFileError(f"{where(k)}: unknown key; keys are: {', '.join(sorted(_KEYS))}")
    for k in ("name", "baseline", "factors"):
        if k not in data:
            raise StudyFileError(f"study file {path}: missing {k!r} (a study needs a name, a [baseline] table and a "
                                 "[factors] table)")
    for t in ("baseline", "factors"):
        if not isinstance(data[t], dict):
            raise StudyFileError(f"{where(t)}: must be a table ([{t}] followed by key = value lines)")
    trial = None
    if "trial" in data:
        spec = data.pop("trial")
        mod, _, fn = str(spec).partition(":")
        try:
            trial = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError, ValueError) as e:
            raise StudyFileError(f"{where('trial')}: cannot import {spec!r} ({e}); give module:function on the "
                                 "Python path") from None
    kwargs = {k: v for k, v in data.items() if k in _KEYS}
    kwargs.update(overrides)
    try:
        return Study(trial=trial, **kwargs)
    except _Bad as e:
        raise StudyFileError(f"{where(e.key, e.table) if e.key else 'study file ' + path}: {e}") from None
    except ArgumentError as e:
        msg = str(e)
        key = next((k for k in sorted(_KEYS) if re.match(rf"{k}\b", msg)), None)
        raise StudyFileError(f"{where(key) if key else 'study file ' + path}: {msg}") from None
