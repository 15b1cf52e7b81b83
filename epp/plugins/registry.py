"""Find plugin classes by their GIE type name.

Sources, in order: every module of the packages ``epp.plugins.<layer>`` (imported with
pkgutil), then the ``epp.plugins`` entry-point group (an entry point may name a plugin class
or a module holding several). A class counts when it subclasses ``Plugin`` and has a
non-empty ``type_name``. Two different classes claiming one type name is an error.

Nothing is cached at module level: ``discover_plugins()`` builds a fresh, read-only
``PluginRegistry`` each call (Python's own import cache makes repeats cheap).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterable, Iterator, Mapping
from importlib.metadata import entry_points
from types import MappingProxyType, ModuleType

from epp.framework.plugin import Plugin

BUILTIN_PACKAGES = (
    "epp.plugins.scheduling",
    "epp.plugins.flowcontrol",
    "epp.plugins.requestcontrol",
    "epp.plugins.datalayer",
)
ENTRY_POINT_GROUP = "epp.plugins"


class PluginRegistryError(Exception):
    """The plugin set is inconsistent (duplicate type names, a broken entry point)."""


class PluginRegistry(Mapping[str, type[Plugin]]):
    """Read-only mapping type name → plugin class."""

    __slots__ = ("_by_type", "_origin")

    def __init__(self, by_type: dict[str, type[Plugin]], origin: dict[str, str]) -> None:
        self._by_type = MappingProxyType(dict(by_type))
        self._origin = MappingProxyType(dict(origin))

    def __getitem__(self, type_name: str) -> type[Plugin]:
        return self._by_type[type_name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_type)

    def __len__(self) -> int:
        return len(self._by_type)

    def origin(self, type_name: str) -> str:
        """Where the type came from (module path, or ``entry point <name>``)."""
        return self._origin[type_name]

    def known_types(self) -> list[str]:
        return sorted(self._by_type)


def _plugin_classes(module: ModuleType) -> Iterable[type[Plugin]]:
    """Plugin classes *defined* in ``module`` (not ones it merely imports)."""
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if (
            issubclass(obj, Plugin)
            and obj.__module__ == module.__name__
            and obj.type_name
            and not inspect.isabstract(obj)
        ):
            yield obj


def _builtin_modules(package: str) -> Iterator[ModuleType]:
    pkg = importlib.import_module(package)
    yield pkg
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        yield importlib.import_module(info.name)


def discover_plugins(
    packages: Iterable[str] = BUILTIN_PACKAGES,
    entry_point_group: str | None = ENTRY_POINT_GROUP,
) -> PluginRegistry:
    """Import the plugin packages and entry points and index their plugin classes."""
    by_type: dict[str, type[Plugin]] = {}
    origin: dict[str, str] = {}

    def add(cls: type[Plugin], where: str) -> None:
        existing = by_type.get(cls.type_name)
        if existing is cls:
            return
        if existing is not None:
            raise PluginRegistryError(
                f"plugin type {cls.type_name!r} is defined twice: by "
                f"{existing.__module__}.{existing.__qualname__} ({origin[cls.type_name]}) and "
                f"{cls.__module__}.{cls.__qualname__} ({where})"
            )
        by_type[cls.type_name] = cls
        origin[cls.type_name] = where

    for package in packages:
        for module in _builtin_modules(package):
            for cls in _plugin_classes(module):
                add(cls, module.__name__)

    if entry_point_group:
        for ep in entry_points(group=entry_point_group):
            where = f"entry point {ep.name} = {ep.value}"
            try:
                obj = ep.load()
            except Exception as exc:
                raise PluginRegistryError(f"cannot load plugin {where}: {exc}") from exc
            if isinstance(obj, ModuleType):
                for cls in _plugin_classes(obj):
                    add(cls, where)
            elif inspect.isclass(obj) and issubclass(obj, Plugin) and obj.type_name:
                add(obj, where)
            else:
                raise PluginRegistryError(
                    f"{where}: expected a Plugin subclass with a type_name, or a module"
                )
    return PluginRegistry(by_type, origin)
