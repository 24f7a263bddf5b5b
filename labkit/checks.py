"""Self-checks for exercises: run the learner's code on several cases and say which failed and why.

A lab module writes its checks with :func:`run_cases`; each returns a :class:`CheckResult`,
which shows as a short report in a notebook (green tick or red cross per case) and can be
asserted on in tests (``result.passed``). A function that still raises ``NotImplementedError``
gives a "not attempted yet" result instead of a failure, so a notebook whose exercise is still
a stub runs top to bottom.

In a notebook an exercise's test cell calls :func:`graded` (``graded(check, answer, ...)``): it shows the report and
fails the cell when the answer is wrong. The same cell is what nbgrader grades (the classroom, ``labkit.grading``):
there an exercise not attempted yet fails too, so it scores no points, while a student's "Run all" goes on past it.

The exercise machinery the labs share lives here too: :func:`rng_for` (a check's random draws: fixed by ``seed`` in
tests, fresh otherwise, so a table of the tested answers cannot pass), :func:`attempted` and :func:`not_attempted`
(a stub is "not attempted yet" before any rank starts).

**No shortcuts: one guard.** An exercise asks the learner to write what labkit already has (a ring all-reduce, the
bucket rule, the E-step, ...), so a check must fail an answer that just calls labkit's own version. The one guard
is Python's profiler (:func:`sys.setprofile`), and library code knows nothing of it:

- :func:`calls_to` runs the answer and collects which of the given functions it entered, however it reached them
  (an imported name, a module attribute, a method, a function written in C); :func:`refuse` then fails the case
  naming them.
- :func:`refusing` stops the answer at the *first* call of a refused function: the profiler raises
  ``AssertionError(why)`` as that function is entered, before its body runs (CPython propagates an exception raised
  by a profile function into the called frame: checked on 3.11, where it also turns the profiler off). An answer
  that catches that error is still failed when the block ends.
- :func:`refusing_launches` is :func:`refusing` on :func:`labkit.launch`, ``Pool.run`` and the pool's process
  start: a prediction that runs the experiment itself fails before any process starts.

What it costs: while the answer runs, every Python call goes through one small profile function (a tight loop of
small calls runs about 9x slower; the answers checked are small), and it sees the calling thread only (a thread the
answer starts is not watched). No library module keeps a flag to poll.
"""
from __future__ import annotations

import contextlib
import html
import os
import random
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator


@dataclass
class CaseResult:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class CheckResult:
    title: str
    cases: list[CaseResult] = field(default_factory=list)
    attempted: bool = True
    hint: str = ""

    @property
    def passed(self) -> bool:
        return self.attempted and bool(self.cases) and all(c.ok for c in self.cases)

    @property
    def failed_cases(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.ok]

    def summary(self) -> str:
        if not self.attempted:
            return f"{self.title}: not attempted yet (the function raises NotImplementedError). {self.hint}".strip()
        n_ok = sum(c.ok for c in self.cases)
        head = f"{self.title}: {'PASSED' if self.passed else 'FAILED'} ({n_ok}/{len(self.cases)} cases)"
        lines = [head]
        for c in self.cases:
            mark = "ok  " if c.ok else "FAIL"
            lines.append(f"  [{mark}] {c.name}" + (f": {c.detail}" if c.detail and not c.ok else ""))
        if not self.passed and self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        if not self.attempted:
            return (f"<div style='border-left:4px solid #999;padding:4px 8px'><b>{html.escape(self.title)}</b>: "
                    f"not attempted yet. {html.escape(self.hint)}</div>")
        colour = "#2a7" if self.passed else "#c33"
        rows = "".join(
            f"<li>{'&#10004;' if c.ok else '&#10008;'} {html.escape(c.name)}"
            + (f" &mdash; <code>{html.escape(c.detail)}</code>" if c.detail and not c.ok else "")
            + "</li>"
            for c in self.cases
        )
        hint = f"<p><i>hint: {html.escape(self.hint)}</i></p>" if (self.hint and not self.passed) else ""
        verdict = "passed" if self.passed else "failed"
        return (f"<div style='border-left:4px solid {colour};padding:4px 8px'><b>{html.escape(self.title)}</b>: "
                f"{verdict} ({sum(c.ok for c in self.cases)}/{len(self.cases)})<ul>{rows}</ul>{hint}</div>")

    def raise_if_failed(self) -> "CheckResult":
        if not self.passed:
            raise AssertionError(self.summary())
        return self


# ----------------------------------------------------------------------------- the no-shortcut guard
def _watched(functions) -> tuple[dict, dict]:
    """``({code object: name}, {id of a C function: name})`` for ``functions`` (each a function, a method taken from
    its class, or a ``(function, label)`` pair; a decorated function is watched through ``__wrapped__``)."""
    codes, builtins = {}, {}
    for item in functions:
        f, label = item if isinstance(item, tuple) else (item, None)
        f = getattr(f, "__wrapped__", f)
        code = getattr(f, "__code__", None)
        name = label or f"{getattr(f, '__module__', None) or 'builtins'}.{getattr(f, '__qualname__', repr(f))}"
        if code is not None:
            codes[code] = name
        elif callable(f):  # a function written in C (e.g. one of torch's): seen through "c_call" events
            builtins[id(f)] = name
        else:
            raise TypeError(f"the guard watches functions, got {f!r}; pass the library's functions themselves")
    return codes, builtins


@contextlib.contextmanager
def _profiled(functions, why: str | None) -> Iterator[set[str]]:
    codes, builtins = _watched(functions)
    seen: set[str] = set()
    me = threading.get_ident()

    def profile(frame, event, arg):
        if threading.get_ident() != me:
            return
        name = None
        if event == "call":
            name = codes.get(frame.f_code)
        elif event == "c_call":
            name = builtins.get(id(arg))
        if name is not None:
            seen.add(name)
            if why is not None:  # stop the answer here, before the refused function's body runs
                raise AssertionError(why)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(previous)
    if why is not None and seen:  # the answer caught the refusal and went on: it still fails
        raise AssertionError(why)


def calls_to(*functions: Callable):
    """``with calls_to(fn_a, fn_b) as seen: answer()``: collect, in the yielded set, the name of each of
    ``functions`` that is called while the block runs (see the module docstring).

    Each item is a function (named ``module.qualname``) or a ``(function, label)`` pair."""
    return _profiled(functions, None)


def refuse(seen: set[str], what: str) -> None:
    """Raise an ``AssertionError`` naming the library functions in ``seen`` (the shortcut taken)."""
    if seen:
        names = ", ".join(sorted(seen))
        raise AssertionError(f"your answer called {names}: {what}")


def refusing(*functions: Callable, why: str):
    """``with refusing(fn_a, fn_b, why="..."): answer()``: the first call of any of ``functions`` (however it is
    reached, directly or through other library code) raises ``AssertionError(why)``, so the check fails with
    ``why``; an answer that catches it still fails when the block ends. The functions work again after it."""
    if not isinstance(why, str) or not why:
        raise TypeError("refusing(*functions, why=...) needs why, the sentence the check fails with")
    if not functions:
        raise TypeError("refusing() needs the library functions to refuse, e.g. refusing(mod.fn, why=...)")
    return _profiled(functions, why)


def refusing_launches(why: str):
    """:func:`refusing` applied to starting ranks: :func:`labkit.launch`, ``Pool.run`` and the pool's process start.
    An exercise check runs a learner's *prediction* under it, so a prediction that runs the experiment itself fails
    at once, before any process starts."""
    from .runtime.launcher import Pool, launch

    return refusing(launch, Pool.run, Pool._start, why=why)


# ----------------------------------------------------------------------------- the exercise machinery
def rng_for(seed: int | None) -> random.Random:
    """The random draws of a check: fixed by ``seed`` (tests), fresh at every call when ``None`` (so an answer
    that hard-codes the cases it has seen fails)."""
    return random.Random(seed if seed is not None else random.SystemRandom().getrandbits(32))


def attempted(fn: Callable, *args) -> bool:
    """Whether ``fn`` is more than a stub: call it once (before any rank starts) and see if it raises
    ``NotImplementedError``; any other outcome (a wrong answer, an error) is judged by the check's cases."""
    try:
        fn(*args)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - a wrong answer: the cases report it
        pass
    return True


def not_attempted(title: str, hint: str = "") -> "CheckResult":
    """The result of a check whose answer is still a stub (see :func:`attempted`)."""
    return CheckResult(title=title, attempted=False, hint=hint)


def run_cases(title: str, cases: Iterable[tuple[str, Callable[[], Any]]], hint: str = "") -> CheckResult:
    """Run each ``(name, thunk)``; a thunk passes by returning without raising.

    A thunk fails with an ``AssertionError`` (its message becomes the detail) or any other
    exception (its type, message and last frame become the detail). ``NotImplementedError``
    anywhere marks the whole check as not attempted.
    """
    result = CheckResult(title=title, hint=hint)
    for name, thunk in cases:
        try:
            thunk()
            result.cases.append(CaseResult(name, True))
        except NotImplementedError:
            result.attempted = False
            return result
        except AssertionError as e:
            result.cases.append(CaseResult(name, False, str(e) or "assertion failed"))
        except Exception as e:  # the learner's code raised: say what and where
            msg = str(e)
            if "NotImplementedError" in msg:  # raised on a rank and re-raised by the launcher
                result.attempted = False
                return result
            tb = traceback.extract_tb(e.__traceback__)
            where = f" (at {tb[-1].filename.split('/')[-1]}:{tb[-1].lineno})" if tb else ""
            result.cases.append(CaseResult(name, False,
                                           f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}{where}"))
    return result


def expect_close(actual, expected, *, rtol: float = 1e-5, atol: float = 1e-6, what: str = "value") -> None:
    """Assert two numbers, arrays or tensors are close, with a message that shows the largest error."""
    import numpy as np

    a = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, dtype=float)
    b = np.asarray(expected.detach().cpu() if hasattr(expected, "detach") else expected, dtype=float)
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {a.shape}, expected {b.shape}")
    if not np.allclose(a, b, rtol=rtol, atol=atol):
        err = np.abs(a - b).max() if a.size else 0.0
        raise AssertionError(f"{what}: max abs error {err:.3g} (tolerance rtol={rtol}, atol={atol})")


def expect_equal(actual, expected, *, what: str = "value") -> None:
    if actual != expected:
        raise AssertionError(f"{what}: got {actual!r}, expected {expected!r}")


#: nbgrader sets this variable in the kernel while it grades: ``autograde`` (``nbgrader autograde``) or ``validate``
#: (the Validate button, ``nbgrader validate``). See nbgrader/converters/autograde.py and nbgrader/validator.py.
GRADING_VARIABLE = "NBGRADER_EXECUTION"


def grading() -> str | None:
    """``"autograde"`` or ``"validate"`` while nbgrader runs this notebook to grade it, else ``None``."""
    return os.environ.get(GRADING_VARIABLE) or None


def graded(check: Callable[..., CheckResult], *args, **kwargs) -> None:
    """Run ``check(*args, **kwargs)`` in an exercise's test cell: show its report, fail the cell if it did not pass.

    - passed: the cell succeeds (nbgrader gives the cell's points).
    - failed: the cell raises ``AssertionError`` with the report (failing cases and hint), in every setting: the
      instructor's notebook fails under nbval, and nbgrader's feedback shows what the check said.
    - not attempted (the answer still raises ``NotImplementedError``): in a student's own run the cell says so and
      succeeds, so "Run all" reaches the end; while nbgrader grades (:func:`grading`) it raises, so no points.

    nbgrader scores a test cell zero when it writes to stderr, so the check runs with ``sys.stderr`` sent to
    ``sys.stdout``: a warning printed by the check's own run is still shown and costs no points. It returns
    nothing: nbgrader would read a value left as the cell's result as partial credit.
    """
    if not callable(check):
        raise TypeError(f"graded(check, answer, ...): check must be a lab's check function, got {check!r}; "
                        "write graded(L.check_something, my_answer), not graded(L.check_something(my_answer))")
    with contextlib.redirect_stderr(sys.stdout):
        result = check(*args, **kwargs)
    if not isinstance(result, CheckResult):
        raise TypeError(f"graded: {getattr(check, '__name__', check)!r} returned {type(result).__name__}, "
                        "not a labkit.checks.CheckResult; pass a lab's check function")
    _show(result)
    mode = grading()
    if not result.attempted:
        if mode:
            raise AssertionError(f"{result.summary()} [graded by nbgrader ({mode}): an exercise not attempted "
                                 "scores no points]")
        return
    if not result.passed:
        raise AssertionError(result.summary())


def _show(result: CheckResult) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with Jupyter
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(result)
    else:
        print(result.summary())
