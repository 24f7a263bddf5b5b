"""See which functions a learner's answer called, so an exercise check can refuse a shortcut.

``with calls_to(fn_a, fn_b) as seen: answer()`` runs ``answer`` under :func:`sys.setprofile` and
collects the names of the given Python functions that were entered, however the learner reached
them (an imported name, a module attribute, a method; functions written in C too). Used by the exercise
checks of labs 01-05 ("you called the library's solver instead of writing it").
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Iterator


@contextlib.contextmanager
def calls_to(*functions: Callable) -> Iterator[set[str]]:
    """Collect, in the yielded set, the name of each of ``functions`` that is called.

    Each item is a function (named ``module.qualname``) or a ``(function, label)`` pair."""
    codes, builtins = {}, {}
    for item in functions:
        f, label = item if isinstance(item, tuple) else (item, None)
        f = getattr(f, "__wrapped__", f)
        code = getattr(f, "__code__", None)
        name = label or f"{getattr(f, '__module__', None) or 'builtins'}.{getattr(f, '__qualname__', repr(f))}"
        if code is not None:
            codes[code] = name
        else:  # a function written in C (e.g. one of torch's): seen through "c_call" events
            builtins[id(f)] = name
    seen: set[str] = set()
    me = threading.get_ident()

    def profile(frame, event, arg):
        if threading.get_ident() != me:
            return
        if event == "call" and frame.f_code in codes:
            seen.add(codes[frame.f_code])
        elif event == "c_call" and id(arg) in builtins:
            seen.add(builtins[id(arg)])

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(previous)


def refuse(seen: set[str], what: str) -> None:
    """Raise an ``AssertionError`` naming the library functions in ``seen`` (the shortcut taken)."""
    if seen:
        names = ", ".join(sorted(seen))
        raise AssertionError(f"your answer called {names}: {what}")
