"""Choosing and building admission for the runner (``epp serve``).

Glue at the runner's level: it reads the loaded configuration and picks one of flow
control's ``Admission`` implementations, with the ``Demand`` the KEDA scaler reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from epp.config import PickerConfig, SchedulingBundle
from epp.datalayer.datastore import Datastore
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.demand import DatastoreDemand
from epp.flowcontrol.hold import HoldingAdmission
from epp.flowcontrol.legacy import LegacyAdmission
from epp.framework.plugin import PluginContext
from epp.framework.requestcontrol import Admission, Demand
from epp.metrics import EppMetrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AdmissionSetup:
    admission: Admission
    #: queued / inflight counts and activity notifications (KEDA scaler, demand gauges)
    demand: Demand
    controller: FlowController | None = None


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
    path costs nothing extra). The ``flowControl`` section and its policy references were
    validated by ``load_config``; ``bundle.policies`` resolves them."""
    detector = bundle.saturation_detector
    if cfg.flow_control_enabled and cfg.flow_control is not None:
        fc = cfg.flow_control
        controller = FlowController(fc, detector, datastore, metrics, bundle.policies, empty_pool_wait)
        return AdmissionSetup(controller, controller, controller)
    if cfg.flow_control is not None:
        log.info("flowControl section ignored: the flowControl feature gate is off")
    if empty_pool_wait > 0:
        hold = HoldingAdmission(detector, datastore, empty_pool_wait)
        return AdmissionSetup(hold, hold)
    return AdmissionSetup(LegacyAdmission(detector), DatastoreDemand(datastore))
