"""The family registry: a family registers itself by decorator, and every list of kinds derives from here.

The shipped families live in ``fed.adapters.families`` and are imported on the first lookup, so reading the
registry costs nothing until a family is asked for, and nothing outside that package names a family
module. A family defined elsewhere (a plug-in, a test) registers the same way, before its kind is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from fed.adapters.base import AdapterFamily

F = TypeVar("F", bound=type)
_FAMILIES: dict[str, AdapterFamily] = {}
_SHIPPED = "fed.adapters.families"


def register_family(cls: F) -> F:
    """Class decorator: register an instance of ``cls`` under its ``kind``; a kind taken twice is refused."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} needs a class attribute kind (a non-empty string) to be registered")
    if kind in _FAMILIES and type(_FAMILIES[kind]) is not cls:
        raise ValueError(f"adapter kind {kind!r} is registered already (by {type(_FAMILIES[kind]).__name__})")
    _FAMILIES[kind] = cls()
    return cls


def _registry() -> dict[str, AdapterFamily]:
    importlib.import_module(_SHIPPED)  # the shipped families register on import (once; a no-op after)
    return _FAMILIES


def family(kind: str) -> AdapterFamily:
    """The registered family called ``kind``; unknown names are refused with the known ones listed."""
    families = _registry()
    if kind not in families:
        raise ValueError(f"unknown adapter kind {kind!r}; known: {', '.join(families)}")
    return families[kind]


def kinds() -> tuple[str, ...]:
    """Every registered kind, in the order the families registered (shipped ones first)."""
    return tuple(_registry())


def shipped_kinds() -> tuple[str, ...]:
    """The kinds that ship with fedlora (what the docs list); plug-ins may register more at run time."""
    return tuple(kind for kind, fam in _registry().items() if type(fam).__module__.startswith(f"{_SHIPPED}."))


def ranked_kinds() -> tuple[str, ...]:
    """Kinds whose layers can train fewer rank components than the global adapter (client ranks)."""
    return tuple(kind for kind, fam in _registry().items() if getattr(fam, "ranked", False))
