"""Demand as the KEDA scaler and the demand gauges see it (``framework.requestcontrol.Demand``).

Every admission reports ``queued`` (waiting in the picker: queued by flow control or held
for an empty pool) and ``inflight``, and tells listeners when demand appears, disappears, or a
request is held by an empty pool, so ``StreamIsActive`` can push at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from epp.datalayer.datastore import Datastore

log = logging.getLogger(__name__)


def pool_inflight(datastore: Datastore) -> int:
    """Requests this picker has in flight across the pool (the demand KEDA scales on)."""
    return sum(max(0, ep.inflight) for ep in datastore.endpoints())


@dataclass(slots=True)
class Activity:
    """The activity listeners of one admission."""

    _listeners: list[Callable[[], None]] = field(default_factory=list)

    def add(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def notify(self) -> None:
        for cb in self._listeners:
            try:
                cb()
            except Exception:  # pragma: no cover - listeners are ours and trivial
                log.exception("flow-control activity listener failed")


@dataclass(slots=True)
class DatastoreDemand:
    """Demand when admission neither queues nor holds: the picker's in-flight counts."""

    datastore: Datastore

    @property
    def queued(self) -> int:
        return 0

    @property
    def inflight(self) -> int:
        return pool_inflight(self.datastore)

    def add_activity_listener(self, listener: Callable[[], None]) -> None:
        return None  # nothing is ever held: no activity to push
