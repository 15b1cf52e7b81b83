"""The plugin table of one configuration: declared plugins with validated parameters, GIE's
injected defaults, and reference resolution that checks the kind of what is referenced.

Kinds are the framework's interfaces, so a third-party plugin that implements e.g.
``DataSource`` can be referenced wherever a data source is expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from epp.config.document import PluginEntry
from epp.config.errors import ConfigError, format_validation, quote
from epp.framework.datalayer import DataSource, MetricsExtractor
from epp.framework.flowcontrol import FairnessPolicy, OrderingPolicy, SaturationDetector
from epp.framework.plugin import Plugin
from epp.framework.requestcontrol import Parser
from epp.framework.scheduling import Filter, Picker, ProfileHandler, Scorer
from epp.plugins.registry import PluginRegistry

INJECTED = "(injected default)"

#: what each interface is called in messages, in the order a multi-kind plugin lists them
KINDS: tuple[tuple[str, type[Plugin]], ...] = (
    ("filter", Filter), ("scorer", Scorer), ("picker", Picker),
    ("profile handler", ProfileHandler), ("saturation detector", SaturationDetector),
    ("data source", DataSource), ("metrics extractor", MetricsExtractor), ("parser", Parser),
    ("fairness policy", FairnessPolicy), ("ordering policy", OrderingPolicy),
)


def kind_of(cls: type[Plugin]) -> str:
    """``"filter/saturation detector"``: the extension points a plugin class implements."""
    return "/".join(k for k, base in KINDS if issubclass(cls, base)) or "plugin of another kind"


@dataclass(slots=True, frozen=True)
class PluginSpec:
    """One plugin instance to build: its validated parameters and class."""

    name: str
    type_name: str
    cls: type[Plugin]
    params: BaseModel
    #: where it was declared (``plugins[2]``) or ``(injected default)``
    location: str


class PluginTable:
    """Plugins by name, in declaration order (declared ones first, then injected ones)."""

    def __init__(self, registry: PluginRegistry) -> None:
        self.registry = registry
        self.specs: dict[str, PluginSpec] = {}

    def declare(self, entries: Sequence[PluginEntry]) -> None:
        """``plugins[]``: types must exist, names be unique, parameters fit the type."""
        for i, entry in enumerate(entries):
            where = f"plugins[{i}]"
            cls = self.registry.get(entry.type)
            if cls is None:
                raise ConfigError(
                    f"{where} (type {quote(entry.type)}): unknown plugin type; known types: "
                    + ", ".join(self.registry.known_types())
                )
            name = entry.name if entry.name is not None else entry.type
            if name in self.specs:
                raise ConfigError(
                    f"{where} (name {quote(name)}): duplicate plugin name; first declared at "
                    f"{self.specs[name].location}"
                )
            try:
                params = cls.Params.model_validate(entry.parameters)
            except ValidationError as exc:
                raise ConfigError(format_validation(f"{where}.parameters", exc)) from None
            self.specs[name] = PluginSpec(name, entry.type, cls, params, where)

    def inject(self, name: str, type_name: str | None = None) -> PluginSpec:
        """Reuse a declared plugin called ``name`` of that type, or add a default one."""
        type_name = type_name or name
        spec = self.specs.get(name)
        if spec is not None:
            if spec.type_name != type_name:
                raise ConfigError(
                    f"{spec.location} (name {quote(name)}): the name is reserved for the injected "
                    f"default {quote(type_name)} plugin but has type {quote(spec.type_name)}"
                )
            return spec
        cls = self.registry.get(type_name)
        if cls is None:  # pragma: no cover - built-ins are always present
            raise ConfigError(f"built-in plugin type {quote(type_name)} is missing")
        spec = PluginSpec(name, type_name, cls, cls.Params.model_validate({}), INJECTED)
        self.specs[name] = spec
        return spec

    def ref(self, name: str, where: str, base: type | tuple[type, ...], what: str) -> PluginSpec:
        """The declared plugin ``name`` (referenced at ``where``), which must be a ``base``."""
        spec = self.specs.get(name)
        if spec is None:
            raise ConfigError(f"{where} {quote(name)}: no plugin named {quote(name)}")
        if not issubclass(spec.cls, base):
            raise ConfigError(
                f"{where} {quote(name)}: plugin type {quote(spec.type_name)} is a "
                f"{kind_of(spec.cls)}, not a {what}"
            )
        return spec

    def of_kind(self, base: type) -> list[PluginSpec]:
        return [s for s in self.specs.values() if issubclass(s.cls, base)]
