"""The ``EndpointPickerConfig`` loader (GIE §4.6): YAML text → validated ``PickerConfig``.

The document's structure is checked by its pydantic models (``epp.config.document``); this
module checks what needs the plugin registry, section by section, in small functions: plugin
types exist and parameters fit them, references resolve to plugins of the right kind, each
profile has one picker, feature gates are known, flow-control policy references resolve.
Every failure is a ``ConfigError`` naming where it is, e.g.
``schedulingProfiles[0].plugins[1].pluginRef "foo": no plugin named "foo"``, so a bad config
fails at start with a message the operator can act on. Instantiation is ``epp.config.build``.

Injected defaults follow GIE: a profile without a picker gets ``max-score-picker``; one
profile and no handler gets ``single-profile-handler``; no ``saturationDetector`` gets
``utilization-detector``; no ``dataLayer`` gets ``metrics-data-source`` →
``core-metrics-extractor`` (or the declared ones); no ``parser`` gets ``openai-parser``. An
unweighted scorer weighs 1.

Nothing the config names is silently ignored: the picker reads one data source with one
extractor, so a second source, a second extractor, or a declared data-source / extractor
plugin the data layer does not use is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.config.build import SchedulingBundle, build_scheduling
from epp.config.document import API_VERSION, KIND, DataLayer, PluginRef, SchedulingProfile, parse_document
from epp.config.errors import ConfigError, quote
from epp.config.policies import resolve_policy_refs
from epp.config.specs import PluginSpec, PluginTable
from epp.flowcontrol.config import FlowControlConfig, FlowControlConfigError, parse_flow_control
from epp.framework.datalayer import DataSource, MetricsExtractor
from epp.framework.flowcontrol import SaturationDetector
from epp.framework.requestcontrol import Parser
from epp.framework.scheduling import Filter, Picker, ProfileHandler, Scorer
from epp.plugins.registry import PluginRegistry, PluginRegistryError, discover_plugins

__all__ = [  # SchedulingBundle / build_scheduling / ConfigError: importable from here as before
    "DEFAULT_CONFIG_YAML", "ConfigError", "DataSourceSpec", "PickerConfig", "PluginSpec", "ProfileSpec",
    "SchedulingBundle", "build_scheduling", "load_config",
]

FEATURE_GATES = frozenset({"flowControl", "enableLegacyMetrics"})
#: gates GIE removed; setting them is an error with this explanation
REMOVED_FEATURE_GATES = {"dataLayer": "the data layer is always enabled; remove this gate"}

DEFAULT_PICKER = "max-score-picker"
DEFAULT_PROFILE_HANDLER = "single-profile-handler"
DEFAULT_SATURATION_DETECTOR = "utilization-detector"
DEFAULT_DATA_SOURCE = "metrics-data-source"
DEFAULT_EXTRACTOR = "core-metrics-extractor"
DEFAULT_PARSER = "openai-parser"

#: GIE's built-in configuration (loader/defaults.go), used when no config is given.
DEFAULT_CONFIG_YAML = f"""\
apiVersion: {API_VERSION}
kind: {KIND}
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""


@dataclass(slots=True, frozen=True)
class ProfileSpec:
    name: str
    filters: tuple[str, ...]
    #: (plugin name, weight) in config order
    scorers: tuple[tuple[str, float], ...]
    picker: str
    location: str


@dataclass(slots=True, frozen=True)
class DataSourceSpec:
    """The data layer: one source (a ``DataSource`` plugin) read by one ``MetricsExtractor``."""

    plugin_ref: str
    extractor: str


@dataclass(slots=True, frozen=True)
class PickerConfig:
    """A validated EndpointPickerConfig (with GIE's defaults injected)."""

    feature_gates: frozenset[str]
    #: every plugin to instantiate, declared ones first (config order), then injected ones
    plugins: tuple[PluginSpec, ...]
    profiles: tuple[ProfileSpec, ...]
    profile_handler: str
    saturation_detector: str
    data_source: DataSourceSpec
    parser: str
    #: the validated ``flowControl`` section: None when absent and the gate is off, GIE's
    #: defaults when absent and the gate is on
    flow_control: FlowControlConfig | None = None
    #: flow-control policies referenced by type name (built with default parameters)
    policies: tuple[PluginSpec, ...] = ()
    #: True when built from GIE defaults (no config given)
    is_default: bool = False

    @property
    def flow_control_enabled(self) -> bool:
        return "flowControl" in self.feature_gates

    def plugin(self, name: str) -> PluginSpec:
        for spec in self.plugins:
            if spec.name == name:
                return spec
        raise KeyError(name)


# --------------------------------------------------------------------------- sections


def _feature_gates(gates: Sequence[str]) -> frozenset[str]:
    for i, gate in enumerate(gates):
        where = f"featureGates[{i}] {quote(gate)}"
        if gate in REMOVED_FEATURE_GATES:
            raise ConfigError(f"{where}: {REMOVED_FEATURE_GATES[gate]}")
        if gate not in FEATURE_GATES:
            raise ConfigError(f"{where}: unknown feature gate; known: {', '.join(sorted(FEATURE_GATES))}")
    return frozenset(gates)


def _profile(table: PluginTable, i: int, entry: SchedulingProfile) -> ProfileSpec:
    """One profile: filters and scorers in config order, exactly one picker (injected if
    none), weights on scorers only (a plugin that filters and scores is a scorer when
    weighted, else a filter)."""
    where = f"schedulingProfiles[{i}]"
    filters: list[str] = []
    scorers: list[tuple[str, float]] = []
    picker: str | None = None
    for j, ref in enumerate(entry.plugins):
        rwhere = f"{where}.plugins[{j}]"
        spec = table.ref(ref.plugin_ref, f"{rwhere}.pluginRef", (Filter, Scorer, Picker),
                         "filter, scorer or picker")
        cls, weight = spec.cls, ref.weight
        if issubclass(cls, Picker):
            if picker is not None:
                raise ConfigError(
                    f"{rwhere}.pluginRef {quote(spec.name)}: profile {quote(entry.name)} already "
                    f"has picker {quote(picker)}; a profile takes exactly one picker"
                )
            if weight is not None:
                raise ConfigError(f"{rwhere}.weight: only scorers take a weight")
            picker = spec.name
        elif issubclass(cls, Scorer) and (weight is not None or not issubclass(cls, Filter)):
            scorers.append((spec.name, 1.0 if weight is None else float(weight)))
        else:
            if weight is not None:
                raise ConfigError(f"{rwhere}.weight: only scorers take a weight")
            filters.append(spec.name)
    if picker is None:
        picker = table.inject(DEFAULT_PICKER).name
    return ProfileSpec(entry.name, tuple(filters), tuple(scorers), picker, where)


def _profiles(table: PluginTable, entries: Sequence[SchedulingProfile]) -> tuple[ProfileSpec, ...]:
    if not entries:
        raise ConfigError("schedulingProfiles: at least one scheduling profile is required")
    seen: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if entry.name in seen:
            raise ConfigError(
                f"schedulingProfiles[{i}] (name {quote(entry.name)}): duplicate profile name; "
                f"first declared at {seen[entry.name]}"
            )
        seen[entry.name] = f"schedulingProfiles[{i}]"
    return tuple(_profile(table, i, entry) for i, entry in enumerate(entries))


def _profile_handler(table: PluginTable, profiles: Sequence[ProfileSpec]) -> str:
    handlers = table.of_kind(ProfileHandler)
    if len(handlers) > 1:
        raise ConfigError(
            f"{handlers[1].location} (name {quote(handlers[1].name)}): only one profile handler "
            f"may be configured; {quote(handlers[0].name)} is one already"
        )
    if not handlers:
        if len(profiles) != 1:
            raise ConfigError(
                f"schedulingProfiles: {len(profiles)} profiles need a profile handler plugin "
                f"to choose between them ({DEFAULT_PROFILE_HANDLER} runs exactly one)"
            )
        return table.inject(DEFAULT_PROFILE_HANDLER).name
    h = handlers[0]
    if h.type_name == DEFAULT_PROFILE_HANDLER and len(profiles) != 1:
        raise ConfigError(
            f"{h.location} (type {quote(h.type_name)}): runs exactly one profile, but "
            f"{len(profiles)} are configured"
        )
    return h.name


def _saturation_detector(table: PluginTable, section: PluginRef | None) -> str:
    if section is None:
        return table.inject(DEFAULT_SATURATION_DETECTOR).name
    return table.ref(section.plugin_ref, "saturationDetector.pluginRef", SaturationDetector,
                     "saturation detector").name


def _only(table: PluginTable, base: type, chosen: PluginSpec, what: str) -> None:
    """Every declared ``base`` plugin must be ``chosen``: the picker reads one of each, and a
    declared one it does not read would be silently ignored."""
    for spec in table.of_kind(base):
        if spec is not chosen:
            raise ConfigError(
                f"{spec.location} (name {quote(spec.name)}): {what} not used: the data layer "
                f"reads one, {quote(chosen.name)}; remove this one or use it instead"
            )


def _data_layer(table: PluginTable, section: DataLayer | None) -> DataSourceSpec:
    if section is None:  # the declared source / extractor, else GIE's defaults
        src = next(iter(table.of_kind(DataSource)), None) or table.inject(DEFAULT_DATA_SOURCE)
        ext = next(iter(table.of_kind(MetricsExtractor)), None) or table.inject(DEFAULT_EXTRACTOR)
    else:
        if not section.sources:
            raise ConfigError("dataLayer.sources: at least one data source is required")
        if len(section.sources) > 1:
            raise ConfigError(
                f"dataLayer.sources[1] (pluginRef {quote(section.sources[1].plugin_ref)}): only "
                "one data source is supported"
            )
        where = "dataLayer.sources[0]"
        entry = section.sources[0]
        src = table.ref(entry.plugin_ref, f"{where}.pluginRef", DataSource, "data source")
        if len(entry.extractors) > 1:
            raise ConfigError(
                f"{where}.extractors[1] (pluginRef {quote(entry.extractors[1].plugin_ref)}): only "
                "one metrics extractor per data source is supported"
            )
        if entry.extractors:
            ext = table.ref(entry.extractors[0].plugin_ref, f"{where}.extractors[0].pluginRef",
                            MetricsExtractor, "metrics extractor")
        else:
            ext = table.inject(DEFAULT_EXTRACTOR)
    _only(table, DataSource, src, "data source")
    _only(table, MetricsExtractor, ext, "metrics extractor")
    return DataSourceSpec(src.name, ext.name)


def _parser(table: PluginTable, section: PluginRef | None) -> str:
    if section is None:
        return table.inject(DEFAULT_PARSER).name
    return table.ref(section.plugin_ref, "parser.pluginRef", Parser, "parser").name


def _flow_control(
    table: PluginTable, raw: dict[str, object] | None, gates: frozenset[str]
) -> tuple[FlowControlConfig | None, tuple[PluginSpec, ...]]:
    """The section validated by flow control's model, and its policy references resolved
    (also with the gate off: a section in the file is checked even while unused)."""
    if raw is None and "flowControl" not in gates:
        return None, ()
    try:
        fc = parse_flow_control(raw)
    except FlowControlConfigError as exc:
        raise ConfigError(str(exc)) from None
    return fc, resolve_policy_refs(fc, table)


# --------------------------------------------------------------------------- entry point


def load_config(text: str | None, registry: PluginRegistry | None = None) -> PickerConfig:
    """Parse and validate an EndpointPickerConfig. ``None`` (or an empty document) gives
    GIE's defaults (§4.5). Raises ConfigError naming the offending field."""
    is_default = text is None or not text.strip()
    try:
        reg = registry if registry is not None else discover_plugins()
    except PluginRegistryError as exc:
        raise ConfigError(f"plugins: {exc}") from None
    doc = parse_document(DEFAULT_CONFIG_YAML if is_default or text is None else text)
    gates = _feature_gates(doc.feature_gates)
    table = PluginTable(reg)
    table.declare(doc.plugins)
    profiles = _profiles(table, doc.scheduling_profiles)
    handler = _profile_handler(table, profiles)
    detector = _saturation_detector(table, doc.saturation_detector)
    data_source = _data_layer(table, doc.data_layer)
    parser = _parser(table, doc.parser)
    flow_control, policies = _flow_control(table, doc.flow_control, gates)
    return PickerConfig(
        feature_gates=gates,
        plugins=tuple(table.specs.values()),
        profiles=profiles,
        profile_handler=handler,
        saturation_detector=detector,
        data_source=data_source,
        parser=parser,
        flow_control=flow_control,
        policies=policies,
        is_default=is_default,
    )
