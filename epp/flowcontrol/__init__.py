"""Flow control: queues, priority bands, token fair share between tenants, scale from zero.

* ``controller.FlowController`` — the ``Admission`` used with ``featureGates: [flowControl]``;
  its queue bookkeeping is in ``queues``, its metric series in ``series``.
* ``legacy.LegacyAdmission`` — GIE's admission without flow control (shed sheddable requests
  when saturated).
* ``hold`` — holding requests while the pool has no endpoint (``EmptyPoolWaiter``, used by the
  flow controller and by ``HoldingAdmission``, the legacy admission that holds with the gate off
  and ``--empty-pool-wait`` > 0).
* ``clock`` / ``timers`` — the injectable clock every flow-control deadline runs on, and the
  one deadline heap per admission (tests drive time with ``ManualClock``).
* ``demand`` — what the KEDA scaler and the demand gauges read (``framework.requestcontrol.Demand``).
* ``keda`` — the KEDA external scaler gRPC service (``--keda-scaler-port``).
* Policies (fairness, ordering) and saturation detectors are plugins in ``epp.plugins.flowcontrol``.

``epp.runner.admission.build_admission`` chooses one for ``epp serve``; see docs/flow-control.md.

Layering: from request control only leaf modules are imported: ``errors`` (the ``Admission``
protocol rejects with ``RequestError``) and, in ``hold``, the legacy shedding rule.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mypy checks that every admission / demand source keeps the framework's protocols
    from epp.flowcontrol.controller import FlowController
    from epp.flowcontrol.demand import DatastoreDemand
    from epp.flowcontrol.hold import HoldingAdmission
    from epp.flowcontrol.legacy import LegacyAdmission
    from epp.framework.requestcontrol import Admission, Demand

    def _conforms(
        fc: FlowController, hold: HoldingAdmission, legacy: LegacyAdmission, ds: DatastoreDemand
    ) -> tuple[Admission, Admission, Admission, Demand, Demand, Demand]:
        return fc, hold, legacy, fc, hold, ds
