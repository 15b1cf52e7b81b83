"""Instantiate a loaded ``PickerConfig``: every plugin, the ``Scheduler``, and the plugins the
runner wires elsewhere (the parser for the Director, the data source and extractor for the
metrics scraper, the flow-control policy lookup for the flow controller).

Construction errors a ``Params`` model could not catch (e.g. conflicting prefix-index
parameters) are reported as ConfigError at the plugin's location.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from epp.config.errors import ConfigError, quote
from epp.config.policies import PolicyLookup, build_policy_lookup
from epp.framework.datalayer import DataSource, MetricsExtractor
from epp.framework.flowcontrol import SaturationDetector
from epp.framework.plugin import Plugin, PluginContext
from epp.framework.requestcontrol import Parser, PrepareRequest, PreRequest, ResponseComplete
from epp.framework.scheduling import Filter, Picker, ProfileHandler, SchedulerProfile, Scorer, WeightedScorer
from epp.scheduling.scheduler import Scheduler

if TYPE_CHECKING:  # the loader re-exports this module's names, so no runtime import back
    from epp.config.loader import PickerConfig

def _no_policies(ref: str) -> Plugin | None:
    """The policy lookup while flow control is off (nothing asks it)."""
    return None


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
    #: the configured ``parser`` (the Director parses every request body with it)
    parser: Parser
    #: the data layer's source and extractor (the metrics scraper reads through them)
    data_source: DataSource
    metrics_extractor: MetricsExtractor
    #: flow-control policy references → plugins (declared by name, else built by type);
    #: resolves nothing while the flowControl gate is off
    policies: PolicyLookup
    #: every instantiated plugin by name
    plugins: dict[str, Plugin] = field(default_factory=dict)
    #: plugins with a PrepareRequest hook (awaited before admission), in config order
    prepare_request: tuple[PrepareRequest, ...] = ()


def _instantiate(cfg: PickerConfig, ctx: PluginContext) -> dict[str, Plugin]:
    instances: dict[str, Plugin] = {}
    for spec in cfg.plugins:
        try:
            instances[spec.name] = spec.cls.from_config(spec.name, spec.params, ctx)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{spec.location} (name {quote(spec.name)}): {exc}") from None
    for spec in cfg.plugins:
        try:
            instances[spec.name].bind(instances)
        except ValueError as exc:
            raise ConfigError(f"{spec.location} (name {quote(spec.name)}): {exc}") from None
    return instances


def build_scheduling(cfg: PickerConfig, ctx: PluginContext) -> SchedulingBundle:
    """Instantiate every plugin of ``cfg`` and assemble the scheduler."""
    instances = _instantiate(cfg, ctx)

    def get(name: str, base: type[Any]) -> Any:  # Any: mypy takes no abstract class as type[T]
        obj = instances[name]
        assert isinstance(obj, base), (name, base)  # the loader checked the kind
        return obj

    profiles: dict[str, SchedulerProfile] = {}
    for p in cfg.profiles:
        profiles[p.name] = SchedulerProfile(
            name=p.name,
            filters=[get(n, Filter) for n in p.filters],
            scorers=[WeightedScorer(get(n, Scorer), w) for n, w in p.scorers],
            picker=get(p.picker, Picker),
        )
    handler = get(cfg.profile_handler, ProfileHandler)
    policies = build_policy_lookup(cfg.policies, instances, ctx) if cfg.flow_control_enabled else _no_policies
    return SchedulingBundle(
        scheduler=Scheduler(handler, profiles, ctx.metrics),
        profile_handler=handler,
        profiles=profiles,
        pre_request=tuple(p for p in instances.values() if isinstance(p, PreRequest)),
        prepare_request=tuple(p for p in instances.values() if isinstance(p, PrepareRequest)),
        response_complete=tuple(p for p in instances.values() if isinstance(p, ResponseComplete)),
        saturation_detector=get(cfg.saturation_detector, SaturationDetector),
        parser=get(cfg.parser, Parser),
        data_source=get(cfg.data_source.plugin_ref, DataSource),
        metrics_extractor=get(cfg.data_source.extractor, MetricsExtractor),
        policies=policies,
        plugins=instances,
    )
