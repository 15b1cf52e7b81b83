"""Flow-control policy references (``fairnessPolicyRef`` / ``orderingPolicyRef``).

A reference names a declared plugin, or else a plugin type that is instantiated with default
parameters (GIE instantiates its default policies by type name). Both are resolved when the
config loads, so a typo fails at start naming the field, not when the first request opens a
priority band. The flow controller gets a ``PolicyLookup`` over the built instances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from pydantic import ValidationError

from epp.config.errors import ConfigError, quote
from epp.config.specs import PluginSpec, PluginTable
from epp.flowcontrol.config import FlowControlConfig
from epp.framework.flowcontrol import FairnessPolicy, OrderingPolicy
from epp.framework.plugin import Plugin, PluginContext

#: policy reference → the plugin it names (None: nothing by that name)
PolicyLookup = Callable[[str], Plugin | None]


def _refs(fc: FlowControlConfig) -> Iterator[tuple[str, str, type[Plugin], str]]:
    """(location, reference, required interface, what it must be) of every policy reference."""
    bands = [("defaultPriorityBand", fc.default_priority_band)] + [
        (f"priorityBands[{i}]", band) for i, band in enumerate(fc.priority_bands)
    ]
    for where, band in bands:
        yield (f"flowControl.{where}.fairnessPolicyRef", band.fairness_policy_ref, FairnessPolicy,
               "a fairness policy")
        yield (f"flowControl.{where}.orderingPolicyRef", band.ordering_policy_ref, OrderingPolicy,
               "an ordering policy")


def resolve_policy_refs(fc: FlowControlConfig, table: PluginTable) -> tuple[PluginSpec, ...]:
    """Check every policy reference of ``fc``; return the policies to build from a type name
    (the ones no declared plugin is called by), each located at its first reference."""
    by_type: dict[str, PluginSpec] = {}
    for where, ref, base, what in _refs(fc):
        spec = table.specs.get(ref) or by_type.get(ref)
        if spec is None:
            cls = table.registry.get(ref)
            if cls is None:
                raise ConfigError(f"{where} {quote(ref)}: no plugin or plugin type named {quote(ref)}")
            try:
                params = cls.Params.model_validate({})
            except ValidationError:
                raise ConfigError(
                    f"{where} {quote(ref)}: plugin type {quote(ref)} needs parameters; declare it "
                    "in plugins and reference it by name"
                ) from None
            spec = by_type[ref] = PluginSpec(ref, ref, cls, params, where)
        if not issubclass(spec.cls, base):
            raise ConfigError(f"{where} {quote(ref)}: plugin type {quote(spec.type_name)} is not {what}")
    return tuple(by_type.values())


def build_policy_lookup(
    specs: tuple[PluginSpec, ...], plugins: Mapping[str, Plugin], ctx: PluginContext
) -> PolicyLookup:
    """Build the by-type policies and return the lookup: a declared plugin by name first,
    then a by-type instance (one per reference, shared by the bands that name it)."""
    by_type: dict[str, Plugin] = {}
    for spec in specs:
        try:
            by_type[spec.name] = spec.cls.from_config(spec.name, spec.params, ctx)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{spec.location} {quote(spec.name)}: {exc}") from None

    def lookup(ref: str) -> Plugin | None:
        return plugins.get(ref) or by_type.get(ref)

    return lookup
