"""Flow control: queues, priority bands, token fair share between tenants, scale from zero.

* ``controller.FlowController`` — the ``Admission`` used with ``featureGates: [flowControl]``.
* ``hold.HoldingAdmission`` — GIE's legacy admission that also holds requests while the pool
  is empty (``--empty-pool-wait`` > 0, gate off).
* ``keda`` — the KEDA external scaler gRPC service (``--keda-scaler-port``).
* policies (fairness, ordering) are plugins in ``epp.plugins.scheduling.flow_policies``.

``wiring.build_admission`` is what the runner calls; see docs/flow-control.md.

Layering: from request control only leaf modules are imported: ``errors`` (the ``Admission``
protocol rejects with ``RequestError``) and, in ``hold``, the legacy shedding rule.
"""
