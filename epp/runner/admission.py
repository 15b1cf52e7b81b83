"""Choosing and building admission for the runner (``epp serve``).

Glue at the runner's level: it reads the loaded configuration and picks one of flow
control's ``Admission`` implementations, with the ``Demand`` the KEDA scaler reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from epp.config.loader import ConfigError, PickerConfig, SchedulingBundle
from epp.datalayer.datastore import Datastore
from epp.flowcontrol.config import FlowControlConfig, FlowControlConfigError, parse_flow_control
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.demand import DatastoreDemand
from epp.flowcontrol.hold import HoldingAdmission
from epp.flowcontrol.legacy import LegacyAdmission
from epp.framework.flowcontrol import FairnessPolicy, OrderingPolicy
from epp.framework.plugin import Plugin, PluginContext
from epp.framework.requestcontrol import Admission, Demand
from epp.metrics import EppMetrics
from epp.plugins.registry import discover_plugins

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AdmissionSetup:
    admission: Admission
    #: queued / inflight counts and activity notifications (KEDA scaler, demand gauges)
    demand: Demand
    controller: FlowController | None = None


def _policy_lookup(bundle: SchedulingBundle, ctx: PluginContext) -> Any:
    """fairnessPolicyRef / orderingPolicyRef → a declared plugin by name, else a built-in
    type with default parameters (GIE instantiates its default policies by type name)."""
    registry = discover_plugins()
    made: dict[str, Plugin] = {}

    def lookup(ref: str) -> Plugin | None:
        p = bundle.plugins.get(ref) or made.get(ref)
        if p is None:
            cls = registry.get(ref)
            if cls is None:
                return None
            p = made[ref] = cls.from_config(ref, cls.Params.model_validate({}), ctx)
        return p

    return lookup


def _validate_refs(cfg: FlowControlConfig, lookup: Any) -> None:
    bands = [("defaultPriorityBand", cfg.default_priority_band)] + [
        (f"priorityBands[{i}]", b) for i, b in enumerate(cfg.priority_bands)
    ]
    for where, b in bands:
        for key, ref, base in (
            ("fairnessPolicyRef", b.fairness_policy_ref, FairnessPolicy),
            ("orderingPolicyRef", b.ordering_policy_ref, OrderingPolicy),
        ):
            p = lookup(ref)
            if p is None:
                raise ConfigError(f'flowControl.{where}.{key} "{ref}": no plugin or plugin type named "{ref}"')
            if not isinstance(p, base):
                raise ConfigError(
                    f'flowControl.{where}.{key} "{ref}": plugin type "{type(p).type_name}" is not a '
                    + ("fairness policy" if base is FairnessPolicy else "ordering policy")
                )


def build_admission(
    cfg: PickerConfig,
    bundle: SchedulingBundle,
    ctx: PluginContext,
    datastore: Datastore,
    metrics: EppMetrics | None,
    empty_pool_wait: float,
) -> AdmissionSetup:
    """Choose admission: the flow controller (gate on), legacy + empty-pool holding (gate off,
    ``empty_pool_wait`` > 0), or plain legacy admission (gate off, no holding: the request
    path costs nothing extra). Raises ConfigError for a bad ``flowControl`` section."""
    detector = bundle.saturation_detector
    if cfg.flow_control_enabled:
        try:
            fc = parse_flow_control(cfg.flow_control)
        except FlowControlConfigError as exc:
            raise ConfigError(str(exc)) from None
        lookup = _policy_lookup(bundle, ctx)
        _validate_refs(fc, lookup)
        controller = FlowController(fc, detector, datastore, metrics, lookup, empty_pool_wait)
        return AdmissionSetup(controller, controller, controller)
    if cfg.flow_control:
        log.info("flowControl section ignored: the flowControl feature gate is off")
    if empty_pool_wait > 0:
        hold = HoldingAdmission(detector, datastore, empty_pool_wait)
        return AdmissionSetup(hold, hold)
    return AdmissionSetup(LegacyAdmission(detector), DatastoreDemand(datastore))
