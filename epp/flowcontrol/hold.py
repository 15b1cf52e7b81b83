"""Scale from zero without the flowControl gate: GIE's legacy admission, plus holding.

GIE holds requests for an empty pool only when flow control is on; without it they fail with
503 at once. We hold them whenever ``--empty-pool-wait`` > 0 (the default, 120 s), because a
user who scaled a pool to zero (KEDA ``idleReplicaCount: 0``) expects the first request to
wake it and be answered, not to be the casualty of the cold start. Set
``--empty-pool-wait=0`` for GIE's fail-fast behaviour.

The request path is unchanged while the pool has endpoints (one truthiness test more than
``LegacyAdmission``). Held requests wait in arrival order; when the datastore reports
endpoints they are all woken (legacy admission has no saturation gate, the model servers
queue them) and pass the legacy sheddable check as usual.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from epp.datalayer.datastore import Datastore
from epp.flowcontrol.controller import scaling_error
from epp.flowcontrol.legacy import admit as legacy_admit
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.flowcontrol import SaturationDetector
from epp.framework.requestcontrol import ResponseInfo
from epp.framework.scheduling import LLMRequest


def pool_inflight(datastore: Datastore) -> int:
    """Requests this picker has in flight across the pool (the demand KEDA scales on)."""
    return sum(max(0, ep.inflight) for ep in datastore.endpoints())


@dataclass(slots=True)
class HoldingAdmission:
    """``LegacyAdmission`` that holds requests while the pool has no endpoint."""

    detector: SaturationDetector | None
    datastore: Datastore
    empty_pool_wait: float = 120.0
    queued: int = 0
    _held: deque[asyncio.Future[None]] = field(default_factory=deque)
    _listeners: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.datastore.add_listener(self._endpoints_changed)

    @property
    def inflight(self) -> int:
        return pool_inflight(self.datastore)

    def add_activity_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    def _candidates(self, fn: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
        try:
            return fn()
        except RequestError:
            if self.datastore.endpoints():
                raise  # a subset hint naming no endpoint of a non-empty pool: 503 as before
            return ()

    async def admit(self, request: LLMRequest, candidates: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
        eps = self._candidates(candidates)
        if not eps:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.empty_pool_wait
            self.queued += 1
            self._notify()
            try:
                while not eps:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise scaling_error(self.empty_pool_wait)
                    fut: asyncio.Future[None] = loop.create_future()
                    held = self._held
                    if len(held) > 2 * self.queued + 16:  # drop futures of requests that left
                        self._held = held = deque(f for f in held if not f.done())
                    held.append(fut)
                    try:
                        async with asyncio.timeout(remaining):
                            await fut
                    except TimeoutError:
                        raise scaling_error(self.empty_pool_wait) from None
                    eps = self._candidates(candidates)
            finally:
                self.queued -= 1
                if self.queued == 0:
                    self._notify()
        legacy_admit(request, eps, self.detector)
        return eps

    def release(self, request: LLMRequest, info: ResponseInfo) -> None:
        return None

    def _endpoints_changed(self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]) -> None:
        if not self.datastore.endpoints():
            return
        held = self._held
        while held:
            fut = held.popleft()
            if not fut.done():
                fut.set_result(None)


@dataclass(slots=True)
class DatastoreDemand:
    """Demand when admission neither queues nor holds: the picker's in-flight counts."""

    datastore: Datastore
    queued: int = 0

    @property
    def inflight(self) -> int:
        return pool_inflight(self.datastore)

    def add_activity_listener(self, listener: Callable[[], None]) -> None:
        return None
