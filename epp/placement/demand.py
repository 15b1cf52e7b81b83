"""Pool demand including the requests model placement holds for a load.

Admission's ``Demand`` counts what flow control queues or holds and what is in flight; a
request that waits for its adapter to be loaded waits in placement, before admission. Added
to ``queued`` here, it keeps the pool-level signal honest: the demand gauge and the KEDA
scaler see it, so a request for an adapter on a pool scaled to zero wakes the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from epp.framework.requestcontrol import Demand
from epp.placement.manager import ModelPlacement


@dataclass(slots=True)
class DemandWithHeld:
    admission: Demand
    placement: ModelPlacement

    @property
    def queued(self) -> int:
        return self.admission.queued + self.placement.held

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    def add_activity_listener(self, listener: Callable[[], None]) -> None:
        self.admission.add_activity_listener(listener)
        self.placement.add_activity_listener(listener)
