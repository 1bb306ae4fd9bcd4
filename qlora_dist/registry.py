"""Named registries: the extension points third-party packages plug into without forking.

Three kinds exist: ``formats`` (data formats), ``strategies`` (distribution strategies) and ``callbacks``
(training events). A name resolves, in this order, to:

1. a built-in, registered by decorator when its module is imported;
2. ``package.module:attribute`` for code that is not packaged (imported on demand);
3. an entry point in the group ``qlora_dist.<kind>`` of an installed distribution, loaded lazily, only when a
   run asks for that name.

So a plugin that fails to import fails only the runs that name it, with its own traceback in the message.
Registering a different object under a taken name is an error; registering the same object twice is not.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from importlib import metadata
from typing import Any, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class PluginError(UserError):
    """A plugin that could not be loaded: the message carries the plugin's own traceback."""


class Registry(Generic[T]):
    """Name -> object for one kind of extension."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.group = f"qlora_dist.{kind}"
        self._objects: dict[str, T] = {}
        self._sources: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, source: str = "built-in") -> Any:
        """``register(name, obj)``, or ``@register(name)`` as a decorator. A taken name with another object raises."""
        if obj is None:

            def decorator(target: T) -> T:
                self.register(name, target, source)
                return target

            return decorator
        existing = self._objects.get(name)
        if existing is not None and existing is not obj:
            raise ValueError(
                f"{self.kind} {name!r} is already registered ({self._sources[name]}): "
                f"refusing to replace it with {obj!r}; pick another name"
            )
        self._objects[name] = obj
        self._sources[name] = source
        return obj

    def get(self, name: str) -> T:
        """The object for ``name``, loading a plugin if needed; UserError naming what is available if unknown."""
        if name in self._objects:
            return self._objects[name]
        if ":" in name:
            return self.register(name, _load(name, lambda: _import_attr(name), self.kind), source=f"import {name}")
        for ep in self._entry_points():
            if ep.name == name:
                loaded = _load(name, ep.load, self.kind, origin=f"entry point {ep.value}")
                return self.register(name, loaded, source=_describe(ep))
        available = ", ".join(sorted(self.names())) or "(none)"
        raise UserError(
            f"unknown {self.kind[:-1] if self.kind.endswith('s') else self.kind} {name!r}: available are {available} "
            f"(or package.module:attribute, or an installed plugin with a {self.group} entry point)"
        )

    def names(self) -> list[str]:
        """Built-in and installed names, without loading any plugin."""
        return sorted(set(self._objects) | {ep.name for ep in self._entry_points()})

    def available(self) -> list[tuple[str, str]]:
        """(name, where it comes from) for everything registered or installed, without loading plugins."""
        rows = dict(self._sources)
        for ep in self._entry_points():
            rows.setdefault(ep.name, _describe(ep))
        return sorted(rows.items())

    def _entry_points(self) -> list[metadata.EntryPoint]:
        return list(metadata.entry_points(group=self.group))


def _describe(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    where = f"{dist.name} {dist.version}" if dist is not None else "an installed package"
    return f"plugin: {where} ({ep.value})"


def _import_attr(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _load(name: str, loader: Callable[[], Any], kind: str, origin: str | None = None) -> Any:
    try:
        return loader()
    except Exception as e:
        detail = "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip()
        raise PluginError(
            f"the {kind} plugin {name!r} ({origin or name}) failed to load: {type(e).__name__}: {e}\n"
            f"--- the plugin's traceback ---\n{detail}"
        ) from e
