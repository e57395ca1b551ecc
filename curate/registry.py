"""YAML ``type:`` names -> stage classes.

Built-in stages are listed in ``curate.stages.BUILTIN_STAGES`` as lazy
``module:Class`` references, so listing names imports nothing heavy.
Third-party packages register through the ``curate.stages`` entry-point group;
a pipeline may also name plugin modules, which register with
:func:`register_stage` when imported.  A name registered twice for two
different classes is an error, never a silent override.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from curate.stage import Stage

ENTRY_POINT_GROUP = "curate.stages"

_refs: dict[str, str] = {}
_classes: dict[str, type[Stage]] = {}
_state = {"loaded": False}


class RegistryError(LookupError):
    """An unknown stage type, a collision, or a stage that fails to import."""


def _add_ref(name: str, ref: str) -> None:
    known = _refs.get(name)
    if known is not None and known != ref:
        raise RegistryError(f"stage type {name!r} is registered twice: {known} and {ref}")
    _refs[name] = ref


def _ensure_loaded() -> None:
    if _state["loaded"]:
        return
    builtins: dict[str, str] = importlib.import_module("curate.stages").BUILTIN_STAGES
    for name, ref in builtins.items():
        _add_ref(name, ref)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _add_ref(ep.name, ep.value)
    _state["loaded"] = True


def register_stage(name: str) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator for plugin stages: ``@register_stage("my_filter")``."""

    def deco(cls: type[Stage]) -> type[Stage]:
        _ensure_loaded()
        _add_ref(name, f"{cls.__module__}:{cls.__qualname__}")
        _classes[name] = cls
        return cls

    return deco


def known_types() -> list[str]:
    _ensure_loaded()
    return sorted(_refs)


def suggest(name: str) -> str:
    """'did you mean' text for an unknown type name."""
    close = difflib.get_close_matches(name, known_types(), n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "known types: " + ", ".join(known_types())


def get_stage_class(name: str) -> type[Stage]:
    """Resolve a YAML ``type:`` name to its class, importing it on first use."""
    _ensure_loaded()
    if name in _classes:
        return _classes[name]
    ref = _refs.get(name)
    if ref is None:
        raise RegistryError(f"unknown stage type {name!r}; {suggest(name)}")
    module_name, _, attr = ref.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RegistryError(f"stage type {name!r} ({ref}) cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise RegistryError(f"stage type {name!r} ({ref}) is not a curate Stage subclass")
    _classes[name] = cls
    return cls


def import_plugins(modules: list[str]) -> list[tuple[str, BaseException]]:
    """Import the plugin modules a pipeline names (their decorators register stages);
    return the failures, one per module, so one broken plugin hides no other."""
    failures: list[tuple[str, BaseException]] = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a plugin is user code: any failure is reported
            failures.append((module, exc))
    return failures


def plugin_locations(modules: list[str]) -> list[tuple[str, str | None]]:
    """Each plugin module with the ``sys.path`` entry it was imported from, so that
    Ray workers (fresh processes) can import it too."""
    out: list[tuple[str, str | None]] = []
    for module in modules:
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        if origin is None or not origin.endswith(".py"):
            out.append((module, None))
            continue
        path = Path(origin)
        if path.name == "__init__.py":
            path = path.parent
        out.append((module, str(path.parents[len(module.split(".")) - 1])))
    return out


def load_plugins(locations: list[tuple[str, str | None]]) -> None:
    """In a worker: make the plugin modules importable and import them."""
    for _, root in locations:
        if root is not None and root not in sys.path:
            sys.path.insert(0, root)
    failures = import_plugins([m for m, _ in locations])
    if failures:
        module, exc = failures[0]
        raise RegistryError(f"plugin module {module!r} cannot be imported on a worker: {exc}")
