"""The ``EndpointPickerConfig`` loader (GIE §4.6): YAML text → validated ``PickerConfig`` →
instantiated plugins and a ``Scheduler`` (``build_scheduling``).

Everything that can be checked without running is checked in ``load_config``: plugin types
exist, parameters validate, references resolve to plugins of the right kind, each profile has
exactly one picker. Every failure is a ``ConfigError`` naming where it is, e.g.
``schedulingProfiles[0].plugins[1].pluginRef "foo": no plugin named "foo"``, so a bad config
fails at start with a message the operator can act on.

Injected defaults follow GIE: a profile without a picker gets ``max-score-picker``; one
profile and no handler gets ``single-profile-handler``; no ``saturationDetector`` gets
``utilization-detector``; no ``dataLayer`` gets ``metrics-data-source`` →
``core-metrics-extractor``; no ``parser`` gets ``openai-parser``. An unweighted scorer
weighs 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from epp.framework.flowcontrol import SaturationDetector
from epp.framework.plugin import Plugin, PluginContext
from epp.framework.requestcontrol import PreRequest, ResponseComplete
from epp.framework.scheduling import Filter, Picker, ProfileHandler, SchedulerProfile, Scorer, WeightedScorer
from epp.plugins.datalayer.core_metrics_extractor import CoreMetricsExtractor, CoreMetricsExtractorParams
from epp.plugins.datalayer.metrics_data_source import MetricsDataSource, MetricsDataSourceParams
from epp.plugins.registry import PluginRegistry, PluginRegistryError, discover_plugins
from epp.plugins.requestcontrol.openai_parser import OpenAIParser
from epp.scheduling.scheduler import Scheduler

API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
KIND = "EndpointPickerConfig"
FEATURE_GATES = frozenset({"flowControl", "enableLegacyMetrics"})
#: gates GIE removed; setting them is an error with this explanation
REMOVED_FEATURE_GATES = {"dataLayer": "the data layer is always enabled; remove this gate"}
TOP_LEVEL_KEYS = (
    "apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles",
    "saturationDetector", "dataLayer", "flowControl", "parser",
)

DEFAULT_PICKER = "max-score-picker"
DEFAULT_PROFILE_HANDLER = "single-profile-handler"
DEFAULT_SATURATION_DETECTOR = "utilization-detector"
DEFAULT_DATA_SOURCE = MetricsDataSource.type_name
DEFAULT_EXTRACTOR = CoreMetricsExtractor.type_name
DEFAULT_PARSER = OpenAIParser.type_name
INJECTED = "(injected default)"

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


class ConfigError(ValueError):
    """The picker configuration is invalid; the message names the location and the problem."""


# --------------------------------------------------------------------------- parsed config


@dataclass(slots=True, frozen=True)
class PluginSpec:
    """One plugin instance to build: its validated parameters and class."""

    name: str
    type_name: str
    cls: type[Plugin]
    params: BaseModel
    #: where it was declared (``plugins[2]``) or ``(injected default)``
    location: str


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
    plugin_ref: str
    extractors: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class PickerConfig:
    """A validated EndpointPickerConfig (with GIE's defaults injected)."""

    feature_gates: frozenset[str]
    #: every plugin to instantiate, declared ones first (config order), then injected ones
    plugins: tuple[PluginSpec, ...]
    profiles: tuple[ProfileSpec, ...]
    profile_handler: str
    saturation_detector: str
    data_sources: tuple[DataSourceSpec, ...]
    #: parameters of the (first) metrics-data-source: scheme, path, insecure_skip_verify
    metrics_source: MetricsDataSourceParams
    #: parameters of its (first) core-metrics-extractor (engine specs)
    metrics_extractor: CoreMetricsExtractorParams
    parser: str
    #: the raw ``flowControl`` mapping, validated later by flow control (None = absent)
    flow_control: Mapping[str, Any] | None = None
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


@dataclass(slots=True)
class SchedulingBundle:
    """Everything ``build_scheduling`` made, for request control and the runner to wire."""

    scheduler: Scheduler
    profile_handler: ProfileHandler
    profiles: dict[str, SchedulerProfile]
    #: plugins with a PreRequest hook, in config order (prefix learning, headers, ...)
    pre_request: tuple[PreRequest, ...]
    #: plugins with a ResponseComplete hook, in config order
    response_complete: tuple[ResponseComplete, ...]
    saturation_detector: SaturationDetector
    #: every instantiated plugin by name
    plugins: dict[str, Plugin] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _q(value: object) -> str:
    """Quote a config value for a message, as the examples in the docs do: "name"."""
    return '"' + str(value).replace('"', '\\"') + '"'


def _kind(cls: type[Plugin]) -> str:
    kinds = [k for k, base in (("filter", Filter), ("scorer", Scorer), ("picker", Picker),
                               ("profile handler", ProfileHandler),
                               ("saturation detector", SaturationDetector))
             if issubclass(cls, base)]
    return "/".join(kinds) or "data-layer or parser plugin"


def _format_validation(where: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = where
        for item in err.get("loc", ()):
            loc += f"[{item}]" if isinstance(item, int) else f".{item}"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _check_keys(obj: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {_q(key)}; allowed: {', '.join(allowed)}"
            )


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string")
    return value


# --------------------------------------------------------------------------- loading


class _Loader:
    def __init__(self, registry: PluginRegistry) -> None:
        self.registry = registry
        self.specs: dict[str, PluginSpec] = {}

    def params(self, cls: type[Plugin], raw: Any, where: str) -> BaseModel:
        try:
            return cls.Params.model_validate(_mapping(raw, where))
        except ValidationError as exc:
            raise ConfigError(_format_validation(where, exc)) from None

    def inject(self, name: str, type_name: str) -> PluginSpec:
        """Reuse a declared plugin called ``name`` of that type, or add a default one."""
        spec = self.specs.get(name)
        if spec is not None:
            if spec.type_name != type_name:
                raise ConfigError(
                    f"{spec.location} (name {_q(name)}): the name is reserved for the injected "
                    f"default {_q(type_name)} plugin but has type {_q(spec.type_name)}"
                )
            return spec
        cls = self.registry.get(type_name)
        if cls is None:  # pragma: no cover - built-ins are always present
            raise ConfigError(f"built-in plugin type {_q(type_name)} is missing")
        spec = PluginSpec(name, type_name, cls, cls.Params.model_validate({}), INJECTED)
        self.specs[name] = spec
        return spec

    def ref(
        self, value: Any, where: str, base: type | tuple[type, ...], what: str
    ) -> PluginSpec:
        name = _name(value, where)
        spec = self.specs.get(name)
        if spec is None:
            raise ConfigError(f"{where} {_q(name)}: no plugin named {_q(name)}")
        if not issubclass(spec.cls, base):
            raise ConfigError(
                f"{where} {_q(name)}: plugin type {_q(spec.type_name)} is a {_kind(spec.cls)}, "
                f"not a {what}"
            )
        return spec

    # ---- sections ----
    def load_plugins(self, raw: Any) -> None:
        for i, entry in enumerate(_list(raw, "plugins")):
            where = f"plugins[{i}]"
            entry = _mapping(entry, where)
            _check_keys(entry, ("name", "type", "parameters"), where)
            if "type" not in entry:
                raise ConfigError(f"{where}: missing required key \"type\"")
            type_name = _name(entry["type"], f"{where}.type")
            cls = self.registry.get(type_name)
            if cls is None:
                raise ConfigError(
                    f"{where} (type {_q(type_name)}): unknown plugin type; known types: "
                    + ", ".join(self.registry.known_types())
                )
            name = _name(entry.get("name", type_name), f"{where}.name")
            if name in self.specs:
                raise ConfigError(
                    f"{where} (name {_q(name)}): duplicate plugin name; first declared at "
                    f"{self.specs[name].location}"
                )
            params = self.params(cls, entry.get("parameters"), f"{where}.parameters")
            self.specs[name] = PluginSpec(name, type_name, cls, params, where)

    def load_profiles(self, raw: Any) -> list[ProfileSpec]:
        entries = _list(raw, "schedulingProfiles")
        if not entries:
            raise ConfigError("schedulingProfiles: at least one scheduling profile is required")
        profiles: list[ProfileSpec] = []
        seen: dict[str, str] = {}
        for i, entry in enumerate(entries):
            where = f"schedulingProfiles[{i}]"
            entry = _mapping(entry, where)
            _check_keys(entry, ("name", "plugins"), where)
            if "name" not in entry:
                raise ConfigError(f"{where}: missing required key \"name\"")
            pname = _name(entry["name"], f"{where}.name")
            if pname in seen:
                raise ConfigError(
                    f"{where} (name {_q(pname)}): duplicate profile name; first declared at "
                    f"{seen[pname]}"
                )
            seen[pname] = where
            filters: list[str] = []
            scorers: list[tuple[str, float]] = []
            picker: str | None = None
            for j, ref in enumerate(_list(entry.get("plugins"), f"{where}.plugins")):
                rwhere = f"{where}.plugins[{j}]"
                ref = _mapping(ref, rwhere)
                _check_keys(ref, ("pluginRef", "weight"), rwhere)
                if "pluginRef" not in ref:
                    raise ConfigError(f"{rwhere}: missing required key \"pluginRef\"")
                spec = self.ref(ref["pluginRef"], f"{rwhere}.pluginRef",
                                (Filter, Scorer, Picker), "filter, scorer or picker")
                weight = ref.get("weight")
                if weight is not None and (
                    isinstance(weight, bool) or not isinstance(weight, int | float)
                    or weight < 0 or weight != weight
                ):
                    raise ConfigError(f"{rwhere}.weight: must be a number >= 0, got {weight!r}")
                cls = spec.cls
                if issubclass(cls, Picker):
                    if picker is not None:
                        raise ConfigError(
                            f"{rwhere}.pluginRef {_q(spec.name)}: profile {_q(pname)} already "
                            f"has picker {_q(picker)}; a profile takes exactly one picker"
                        )
                    if weight is not None:
                        raise ConfigError(f"{rwhere}.weight: only scorers take a weight")
                    picker = spec.name
                elif issubclass(cls, Scorer) and (weight is not None or not issubclass(cls, Filter)):
                    scorers.append((spec.name, float(1 if weight is None else weight)))
                else:
                    if weight is not None:
                        raise ConfigError(f"{rwhere}.weight: only scorers take a weight")
                    filters.append(spec.name)
            if picker is None:
                picker = self.inject(DEFAULT_PICKER, DEFAULT_PICKER).name
            profiles.append(ProfileSpec(pname, tuple(filters), tuple(scorers), picker, where))
        return profiles

    def profile_handler(self, profiles: list[ProfileSpec]) -> str:
        handlers = [s for s in self.specs.values() if issubclass(s.cls, ProfileHandler)]
        if len(handlers) > 1:
            raise ConfigError(
                f"{handlers[1].location} (name {_q(handlers[1].name)}): only one profile handler "
                f"may be configured; {_q(handlers[0].name)} is one already"
            )
        if not handlers:
            if len(profiles) != 1:
                raise ConfigError(
                    f"schedulingProfiles: {len(profiles)} profiles need a profile handler plugin "
                    f"to choose between them ({DEFAULT_PROFILE_HANDLER} runs exactly one)"
                )
            return self.inject(DEFAULT_PROFILE_HANDLER, DEFAULT_PROFILE_HANDLER).name
        h = handlers[0]
        if h.type_name == DEFAULT_PROFILE_HANDLER and len(profiles) != 1:
            raise ConfigError(
                f"{h.location} (type {_q(h.type_name)}): runs exactly one profile, but "
                f"{len(profiles)} are configured"
            )
        return h.name

    def saturation_detector(self, raw: Any) -> str:
        if raw is None:
            return self.inject(DEFAULT_SATURATION_DETECTOR, DEFAULT_SATURATION_DETECTOR).name
        sd = _mapping(raw, "saturationDetector")
        _check_keys(sd, ("pluginRef",), "saturationDetector")
        if "pluginRef" not in sd:
            raise ConfigError('saturationDetector: missing required key "pluginRef"')
        return self.ref(sd["pluginRef"], "saturationDetector.pluginRef", SaturationDetector,
                        "saturation detector").name

    def data_layer(self, raw: Any) -> list[DataSourceSpec]:
        if raw is None:
            src = next((s for s in self.specs.values() if s.cls is MetricsDataSource), None)
            ext = next((s for s in self.specs.values() if s.cls is CoreMetricsExtractor), None)
            src = src or self.inject(DEFAULT_DATA_SOURCE, DEFAULT_DATA_SOURCE)
            ext = ext or self.inject(DEFAULT_EXTRACTOR, DEFAULT_EXTRACTOR)
            return [DataSourceSpec(src.name, (ext.name,))]
        dl = _mapping(raw, "dataLayer")
        _check_keys(dl, ("sources",), "dataLayer")
        sources = []
        for i, entry in enumerate(_list(dl.get("sources"), "dataLayer.sources")):
            where = f"dataLayer.sources[{i}]"
            entry = _mapping(entry, where)
            _check_keys(entry, ("pluginRef", "extractors"), where)
            if "pluginRef" not in entry:
                raise ConfigError(f'{where}: missing required key "pluginRef"')
            src = self.ref(entry["pluginRef"], f"{where}.pluginRef", MetricsDataSource,
                           "data source")
            extractors = []
            for j, ex in enumerate(_list(entry.get("extractors"), f"{where}.extractors")):
                ewhere = f"{where}.extractors[{j}]"
                ex = _mapping(ex, ewhere)
                _check_keys(ex, ("pluginRef",), ewhere)
                if "pluginRef" not in ex:
                    raise ConfigError(f'{ewhere}: missing required key "pluginRef"')
                extractors.append(self.ref(ex["pluginRef"], f"{ewhere}.pluginRef",
                                           CoreMetricsExtractor, "metrics extractor").name)
            sources.append(DataSourceSpec(src.name, tuple(extractors)))
        if not sources:
            raise ConfigError("dataLayer.sources: at least one data source is required")
        return sources

    def parser(self, raw: Any) -> str:
        if raw is None:
            return self.inject(DEFAULT_PARSER, DEFAULT_PARSER).name
        p = _mapping(raw, "parser")
        _check_keys(p, ("pluginRef",), "parser")
        if "pluginRef" not in p:
            raise ConfigError('parser: missing required key "pluginRef"')
        return self.ref(p["pluginRef"], "parser.pluginRef", OpenAIParser,
                        f"supported parser (only {DEFAULT_PARSER} is)").name


def _feature_gates(raw: Any) -> frozenset[str]:
    gates = set()
    for i, gate in enumerate(_list(raw, "featureGates")):
        where = f"featureGates[{i}]"
        gate = _name(gate, where)
        if gate in REMOVED_FEATURE_GATES:
            raise ConfigError(f"{where} {_q(gate)}: {REMOVED_FEATURE_GATES[gate]}")
        if gate not in FEATURE_GATES:
            raise ConfigError(
                f"{where} {_q(gate)}: unknown feature gate; known: {', '.join(sorted(FEATURE_GATES))}"
            )
        gates.add(gate)
    return frozenset(gates)


def load_config(text: str | None, registry: PluginRegistry | None = None) -> PickerConfig:
    """Parse and validate an EndpointPickerConfig. ``None`` (or an empty document) gives
    GIE's defaults (§4.5). Raises ConfigError naming the offending field."""
    is_default = text is None or not text.strip()
    if is_default:
        text = DEFAULT_CONFIG_YAML
    assert text is not None
    try:
        reg = registry if registry is not None else discover_plugins()
    except PluginRegistryError as exc:
        raise ConfigError(f"plugins: {exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: invalid YAML: {exc}") from None
    doc = _mapping(doc, "config")
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"{key}: unknown top-level key; allowed: {', '.join(TOP_LEVEL_KEYS)}"
            )
    if "apiVersion" in doc and doc["apiVersion"] != API_VERSION:
        raise ConfigError(f"apiVersion: expected {_q(API_VERSION)}, got {_q(doc['apiVersion'])}")
    if "kind" in doc and doc["kind"] != KIND:
        raise ConfigError(f"kind: expected {_q(KIND)}, got {_q(doc['kind'])}")
    gates = _feature_gates(doc.get("featureGates"))

    ld = _Loader(reg)
    ld.load_plugins(doc.get("plugins"))
    profiles = ld.load_profiles(doc.get("schedulingProfiles"))
    handler = ld.profile_handler(profiles)
    detector = ld.saturation_detector(doc.get("saturationDetector"))
    sources = ld.data_layer(doc.get("dataLayer"))
    parser = ld.parser(doc.get("parser"))
    flow = doc.get("flowControl")
    if flow is not None and not isinstance(flow, dict):
        raise ConfigError(f"flowControl: expected a mapping, got {type(flow).__name__}")

    first = sources[0]
    src_params = ld.specs[first.plugin_ref].params
    ext_params = (ld.specs[first.extractors[0]].params if first.extractors
                  else CoreMetricsExtractorParams())
    assert isinstance(src_params, MetricsDataSourceParams)
    assert isinstance(ext_params, CoreMetricsExtractorParams)
    return PickerConfig(
        feature_gates=gates,
        plugins=tuple(ld.specs.values()),
        profiles=tuple(profiles),
        profile_handler=handler,
        saturation_detector=detector,
        data_sources=tuple(sources),
        metrics_source=src_params,
        metrics_extractor=ext_params,
        parser=parser,
        flow_control=flow,
        is_default=is_default,
    )


# --------------------------------------------------------------------------- building


def build_scheduling(cfg: PickerConfig, ctx: PluginContext) -> SchedulingBundle:
    """Instantiate every plugin of ``cfg`` and assemble the scheduler.

    Construction errors a ``Params`` model could not catch (e.g. conflicting prefix-index
    parameters) are reported as ConfigError at the plugin's location.
    """
    instances: dict[str, Plugin] = {}
    for spec in cfg.plugins:
        try:
            instances[spec.name] = spec.cls.from_config(spec.name, spec.params, ctx)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{spec.location} (name {_q(spec.name)}): {exc}") from None
    for spec in cfg.plugins:
        try:
            instances[spec.name].bind(instances)
        except ValueError as exc:
            raise ConfigError(f"{spec.location} (name {_q(spec.name)}): {exc}") from None

    def get(name: str, base: type[Any]) -> Any:
        obj = instances[name]
        assert isinstance(obj, base), (name, base)
        return obj

    profiles: dict[str, SchedulerProfile] = {}
    for p in cfg.profiles:
        profiles[p.name] = SchedulerProfile(
            name=p.name,
            filters=[get(n, Filter) for n in p.filters],
            scorers=[WeightedScorer(get(n, Scorer), w) for n, w in p.scorers],
            picker=get(p.picker, Picker),
        )
    handler: ProfileHandler = get(cfg.profile_handler, ProfileHandler)
    return SchedulingBundle(
        scheduler=Scheduler(handler, profiles, ctx.metrics),
        profile_handler=handler,
        profiles=profiles,
        pre_request=tuple(p for p in instances.values() if isinstance(p, PreRequest)),
        response_complete=tuple(p for p in instances.values() if isinstance(p, ResponseComplete)),
        saturation_detector=get(cfg.saturation_detector, SaturationDetector),
        plugins=instances,
    )
