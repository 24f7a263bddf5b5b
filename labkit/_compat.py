"""Old public names that keep working for one release, each with a ``DeprecationWarning`` naming the new one.

Issue 30 renamed labkit's public names to one vocabulary (``docs/glossary.md``). A notebook or a reader's script
written with an old name still runs, and says what to write instead:

- :func:`renamed_kwargs` on a function or a class: an old keyword argument is accepted and passed on under its
  new name (``n_pieces=`` → ``n_stages=``); on a class, the old attribute name reads the new one too.
- :func:`moved_names` for a module: ``labkit.balance.check_cuts`` still resolves, to
  ``labkit.partition.validate_cuts``, through the module's ``__getattr__`` (PEP 562).

Every shim here is listed in the note of issue 30 and goes in the release after it.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from typing import Callable

__all__ = ["renamed_kwargs", "moved_names", "warn_renamed"]


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is now spelled ``new``."""
    warnings.warn(f"{old} is now {new}; the old name goes in the next release (docs/glossary.md)",
                  DeprecationWarning, stacklevel=stacklevel)


def _rename_in(kwargs: dict, where: str, old_to_new: dict[str, str]) -> dict:
    for old, new in old_to_new.items():
        if old in kwargs:
            if new in kwargs:
                raise TypeError(f"{where}() got both {old}= (its old name) and {new}=; pass only {new}=")
            warn_renamed(f"{where}({old}=)", f"{new}=", stacklevel=4)
            kwargs[new] = kwargs.pop(old)
    return kwargs


def _alias_property(old: str, new: str, owner: str) -> property:
    def get(self):
        warn_renamed(f"{owner}.{old}", f"{owner}.{new}")
        return getattr(self, new)

    return property(get, doc=f"Deprecated: the old name of :attr:`{new}`.")


def renamed_kwargs(**old_to_new: str) -> Callable:
    """Decorator: accept each old keyword (``old=new`` pairs) with a warning, and pass it on as the new one.

    On a class (a dataclass included) it wraps ``__init__`` and adds a read-only property under each old name
    that reads the new attribute, so ``cfg.hidden`` keeps working where ``cfg.ffn_width`` is meant."""

    def wrap(obj):
        if isinstance(obj, type):
            init = obj.__init__

            @functools.wraps(init)
            def __init__(self, *args, **kwargs):
                init(self, *args, **_rename_in(kwargs, obj.__qualname__, old_to_new))

            obj.__init__ = __init__
            for old, new in old_to_new.items():
                if not hasattr(obj, old):
                    setattr(obj, old, _alias_property(old, new, obj.__qualname__))
            return obj

        @functools.wraps(obj)
        def call(*args, **kwargs):
            return obj(*args, **_rename_in(kwargs, obj.__qualname__, old_to_new))

        return call

    return wrap


def moved_names(module: str, old_to_new: dict[str, str]) -> Callable:
    """A module ``__getattr__`` that resolves each old name to its new home, ``"package.module:name"``."""

    def __getattr__(name: str):
        if name in old_to_new:
            where, _, attr = old_to_new[name].partition(":")
            warn_renamed(f"{module}.{name}", f"{where}.{attr}")
            return getattr(importlib.import_module(where), attr)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
