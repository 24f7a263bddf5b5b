"""Argument checks shared by every lab, so that bad input always reads the same way.

Each check returns the cleaned value or raises :class:`ArgumentError`, whose message names the
argument, the value received and what to pass instead::

    n = validate_int("world_size", world_size, minimum=1)
    name = validate_choice("schedule", schedule, ("gpipe", "1f1b"))
    t = validate_number("threshold", threshold, minimum=0, maximum=1, open_low=True)

:class:`ArgumentError` is both a ``ValueError`` and a ``TypeError``: a caller (or a test) that
catches either one catches it, whether the value had the wrong type or the wrong size.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

__all__ = ["ArgumentError", "validate_int", "validate_choice", "validate_number", "validate_finite"]


class ArgumentError(ValueError, TypeError):
    """A bad argument: the message says which, what it was and what to pass instead."""


def _fail(name: str, need: str, value: Any, hint: str) -> ArgumentError:
    tail = f"; {hint}" if hint else ""
    return ArgumentError(f"{name} must be {need}, got {value!r}{tail}")


def validate_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              hint: str = "") -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either bound optional); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        need = "an int" if minimum is None else f"an int >= {minimum}"
        if maximum is not None:
            need = f"an int in [{minimum if minimum is not None else '-inf'}, {maximum}]"
        raise _fail(name, need + f" (not {type(value).__name__})", value, hint)
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        if maximum is None:
            need = f"an int >= {minimum}"
        elif minimum is None:
            need = f"an int <= {maximum}"
        else:
            need = f"an int in [{minimum}, {maximum}]"
        raise _fail(name, need, value, hint)
    return value


def validate_choice(name: str, value: Any, choices: Sequence[Any], *, hint: str = "") -> Any:
    """``value`` if it is one of ``choices``."""
    try:
        ok = value in choices
    except TypeError:  # an unhashable value against a set
        ok = False
    if not ok:
        raise _fail(name, "one of " + ", ".join(repr(c) for c in choices), value, hint)
    return value


def validate_number(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                 open_low: bool = False, open_high: bool = False, hint: str = "") -> float:
    """``value`` as a finite ``float`` within the bounds (``open_low``/``open_high`` exclude the bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise _fail(name, "a finite number" + _range_words(minimum, maximum, open_low, open_high), value, hint)
    v = float(value)
    low_bad = minimum is not None and (v <= minimum if open_low else v < minimum)
    high_bad = maximum is not None and (v >= maximum if open_high else v > maximum)
    if low_bad or high_bad:
        raise _fail(name, "a number" + _range_words(minimum, maximum, open_low, open_high), value, hint)
    return v


def _range_words(minimum, maximum, open_low, open_high) -> str:
    if minimum is None and maximum is None:
        return ""
    if maximum is None:
        return f" {'>' if open_low else '>='} {minimum:g}"
    if minimum is None:
        return f" {'<' if open_high else '<='} {maximum:g}"
    return f" in {'(' if open_low else '['}{minimum:g}, {maximum:g}{')' if open_high else ']'}"


def validate_finite(name: str, array: Any, *, hint: str = "") -> Any:
    """``array`` (numpy or torch) if every value is finite; otherwise say how many are NaN or inf."""
    import numpy as np

    a = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if a.dtype.kind in "fc":
        bad = ~np.isfinite(a)
        if bad.any():
            raise ArgumentError(f"{name} holds {int(bad.sum())} NaN or infinite value(s) (first at index "
                                f"{tuple(int(i) for i in np.argwhere(bad)[0])}); remove or impute them first"
                                + (f"; {hint}" if hint else ""))
    return array
