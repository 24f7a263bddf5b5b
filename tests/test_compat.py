"""labkit._compat: an old keyword, attribute or module name keeps working one release, and says its new name."""
from __future__ import annotations

import sys
import types
import warnings
from dataclasses import dataclass

import pytest

from labkit._compat import moved_names, renamed_kwargs


@renamed_kwargs(n_pieces="n_stages")
def _split(batch, n_stages: int = 1):
    return batch, n_stages


@renamed_kwargs(hidden="width")
@dataclass(frozen=True)
class _Shape:
    width: int = 4
    heads: int = 2


def test_an_old_keyword_is_passed_on_under_its_new_name_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _split(3, n_stages=2) == (3, 2)  # the new name: no warning
    with pytest.warns(DeprecationWarning, match=r"n_pieces=\) is now n_stages="):
        assert _split(3, n_pieces=2) == (3, 2)
    with pytest.raises(TypeError, match="pass only n_stages="):
        _split(3, n_pieces=2, n_stages=2)
    assert _split.__name__ == "_split" and _split.__wrapped__.__name__ == "_split"


def test_a_class_takes_the_old_keyword_and_reads_the_old_attribute():
    with pytest.warns(DeprecationWarning, match="_Shape"):
        s = _Shape(hidden=8)
    assert s == _Shape(width=8) and s.width == 8
    with pytest.warns(DeprecationWarning, match=r"_Shape.hidden is now _Shape.width"):
        assert s.hidden == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _Shape(width=6, heads=3).heads == 3


def test_a_moved_module_name_resolves_to_its_new_home_with_a_warning(monkeypatch):
    mod = types.ModuleType("labkit_probe")
    mod.__getattr__ = moved_names("labkit_probe", {"check_cuts": "labkit.partition:validate_cuts"})
    monkeypatch.setitem(sys.modules, "labkit_probe", mod)
    from labkit.partition import validate_cuts

    with pytest.warns(DeprecationWarning, match=r"labkit_probe.check_cuts is now labkit.partition.validate_cuts"):
        assert mod.check_cuts is validate_cuts
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mod.nothing  # noqa: B018
