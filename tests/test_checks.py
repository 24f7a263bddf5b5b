"""labkit.checks' no-shortcut guard (the profiler: calls_to, refuse, refusing, refusing_launches) and the exercise
machinery the labs share (rng_for, attempted, not_attempted). No processes start here."""
from __future__ import annotations

import math
import sys

import pytest

from labkit import checks
from labkit.checks import attempted, calls_to, not_attempted, refuse, refusing, refusing_launches, rng_for


def library(x):
    return helper(x) + 1


def helper(x):
    return 2 * x


def test_calls_to_sees_direct_nested_and_c_calls_and_refuse_names_them():
    with calls_to(helper, (math.sqrt, "math.sqrt")) as seen:
        library(3)
        math.sqrt(4.0)
    assert seen == {f"{__name__}.helper", "math.sqrt"}
    with pytest.raises(AssertionError, match=r"your answer called math.sqrt, \S*helper: do it yourself"):
        refuse(seen, "do it yourself")
    refuse(set(), "nothing called: no error")
    assert sys.getprofile() is None  # the profiler is put back


def test_refusing_stops_the_first_call_before_its_body_runs():
    ran = []

    def refused(x):
        ran.append(x)
        return x

    with pytest.raises(AssertionError, match="^write it yourself$"):
        with refusing(refused, why="write it yourself"):
            refused(1)
    assert ran == [] and sys.getprofile() is None
    assert refused(2) == 2  # works again after the block
    with pytest.raises(AssertionError, match="through the library"):  # reached through other code: refused too
        with refusing(helper, why="through the library"):
            library(1)
    with pytest.raises(AssertionError, match="a C function"):
        with refusing(math.sqrt, why="a C function"):
            math.sqrt(9.0)


def test_an_answer_that_catches_the_refusal_still_fails():
    def sly():
        try:
            return helper(1)
        except AssertionError:
            return 2  # the right value, found by calling the library

    with pytest.raises(AssertionError, match="caught"):
        with refusing(helper, why="caught"):
            assert sly() == 2


def test_refusing_inside_a_check_fails_the_case_with_why():
    res = checks.run_cases("t", [("uses the library", lambda: _guarded(library)),
                                 ("does it itself", lambda: _guarded(lambda x: 2 * x + 1))])
    assert [c.ok for c in res.cases] == [False, True] and res.cases[0].detail == "no library"


def _guarded(answer):
    with refusing(helper, why="no library"):
        assert answer(3) == 7


def test_refusing_needs_functions_and_a_reason():
    with pytest.raises(TypeError, match="why"):
        refusing(helper, why="")
    with pytest.raises(TypeError, match="functions"):
        refusing(why="nothing to refuse")
    with pytest.raises(TypeError, match="watches functions"):
        with refusing(checks, why="a module is not a function"):
            pass


def test_refusing_launches_stops_before_any_process_starts(monkeypatch):
    import labkit
    from labkit.runtime.launcher import Pool

    started = []
    monkeypatch.setattr(Pool, "_start", lambda self: started.append(self))  # would start processes
    for run in (lambda: labkit.launch(lambda ctx: 0, world_size=3),
                lambda: labkit.launch(lambda ctx: 0, world_size=2, pool=True),
                lambda: Pool(2).run(lambda ctx: 0)):
        with pytest.raises(AssertionError, match="predict it"):
            with refusing_launches("predict it"):
                run()
    assert started == []


def test_rng_attempted_and_not_attempted():
    assert rng_for(3).random() == rng_for(3).random()
    assert len({rng_for(None).random() for _ in range(5)}) == 5  # fresh draws when no seed is given

    def stub(x):
        raise NotImplementedError

    assert not attempted(stub, 1) and attempted(lambda x: 1 / 0, 1) and attempted(lambda x: x, 1)
    res = not_attempted("an exercise", "a hint")
    assert not res.attempted and not res.passed and "not attempted yet" in res.summary()


def test_old_names_still_work_and_warn():
    """Issue 30: the launch guard moved to labkit.checks; labkit._calls is gone (its functions are here)."""
    from labkit.runtime import launcher

    with pytest.warns(DeprecationWarning, match="refusing_launches is now labkit.checks.refusing_launches"):
        assert launcher.refusing_launches is refusing_launches
    with pytest.warns(DeprecationWarning, match="LaunchRefused is now builtins.AssertionError"):
        assert launcher.LaunchRefused is AssertionError  # `except LaunchRefused` still catches the refusal
    with pytest.raises(ModuleNotFoundError):
        import labkit._calls  # noqa: F401
