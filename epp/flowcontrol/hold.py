"""Holding requests while the pool has no endpoint (scale from zero), for every admission.

``EmptyPoolWaiter`` is the one implementation of "the pool is empty, wait for it": the
candidates helper that turns "no endpoint at all" into "hold" (and keeps a subset hint that
names no endpoint of a non-empty pool an error), the wait budget and its 503, when the pool
last came up (TTLs do not count the time spent waiting for it), and the wake-up when
endpoints appear. The flow controller holds requests in its queues with it;
``HoldingAdmission`` holds them in front of GIE's legacy admission.

Why hold without the ``flowControl`` gate: GIE fails such requests with 503 at once unless
flow control is on, but a user who scaled a pool to zero (KEDA ``idleReplicaCount: 0``)
expects the first request to wake it and be answered, not to be the casualty of the cold
start. ``--empty-pool-wait=0`` restores GIE's fail-fast behaviour.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from epp.datalayer.datastore import Datastore
from epp.flowcontrol.clock import Clock, MonotonicClock
from epp.flowcontrol.demand import Activity, pool_inflight
from epp.flowcontrol.legacy import admit as legacy_admit
from epp.flowcontrol.timers import Timers
from epp.framework import errors
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.flowcontrol import SaturationDetector
from epp.framework.requestcontrol import ResponseInfo
from epp.framework.scheduling import LLMRequest


def scaling_error(waited: float) -> RequestError:
    """503 for a request that waited for an empty pool (scaled to zero) past its budget."""
    return errors.unavailable(
        f"the inference pool is scaling up from zero: no endpoint became ready within {waited:.0f}s; "
        "retry later"
    )


@dataclass(slots=True, eq=False)
class _Held:
    """One request waiting in ``EmptyPoolWaiter.wait``: the future the next wake-up resolves
    (True: endpoints appeared, False: the budget ran out)."""

    future: asyncio.Future[bool] | None = None


def _expire(held: _Held) -> None:
    fut = held.future
    if fut is not None and not fut.done():
        fut.set_result(False)


class EmptyPoolWaiter:
    """Empty-pool holding: candidates, budget, pool-up time, wake-ups (see the module doc)."""

    __slots__ = ("_had_endpoints", "_held", "_listeners", "budget", "closed", "datastore", "ready_at", "timers",
                 "waiting")

    def __init__(self, datastore: Datastore, budget: float, timers: Timers) -> None:
        self.datastore = datastore
        #: how long a request may wait for an empty pool (seconds; <= 0: fail at once)
        self.budget = budget
        self.timers = timers
        #: when the pool last went from no endpoint to some (``-inf``: never seen empty)
        self.ready_at = -math.inf
        self._had_endpoints = bool(datastore.endpoints())
        self._listeners: list[Callable[[], None]] = []
        self._held: deque[_Held] = deque()
        #: requests suspended in ``wait``
        self.waiting = 0
        #: set by ``close``: every held and later request fails with it
        self.closed: RequestError | None = None
        datastore.add_listener(self._changed)

    def candidates(self, fn: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
        """``fn()``, or () when the pool has no endpoint at all (hold). A subset hint that
        names no endpoint of a non-empty pool stays an error (503, as without holding)."""
        try:
            return fn()
        except RequestError:
            if self.datastore.endpoints():
                raise
            return ()

    def error(self) -> RequestError:
        return scaling_error(self.budget)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` on every endpoint change, after ``ready_at`` is updated."""
        self._listeners.append(listener)

    def _changed(self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]) -> None:
        has = bool(self.datastore.endpoints())
        if has and not self._had_endpoints:
            self.ready_at = self.timers.clock.now()
        self._had_endpoints = has
        if has:
            held = self._held
            while held:
                fut = held.popleft().future
                if fut is not None and not fut.done():
                    fut.set_result(True)
        for cb in self._listeners:
            cb()

    def close(self, error: RequestError) -> None:
        """The picker is stopping: fail every held request (and any later one) with ``error``
        while their streams can still carry the answer."""
        self.closed = error
        while self._held:
            _expire(self._held.popleft())

    async def wait(self, fn: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
        """Suspend the caller until ``fn`` names an endpoint; ``scaling_error`` past the
        budget. Held requests are woken together, in arrival order, when endpoints appear."""
        if self.closed is not None:
            raise self.closed
        loop = asyncio.get_running_loop()
        held = _Held()
        timer = self.timers.call_at(self.timers.clock.now() + self.budget, _expire, held)
        self.waiting += 1
        try:
            while True:
                fut = held.future = loop.create_future()
                if len(self._held) > 2 * self.waiting + 16:  # drop requests that left
                    self._held = deque(h for h in self._held if h.future is not None and not h.future.done())
                self._held.append(held)
                if not await fut:
                    raise self.closed or self.error()
                eps = self.candidates(fn)
                if eps:
                    return eps
        finally:
            self.waiting -= 1
            held.future = None
            self.timers.cancel(timer)


@dataclass(slots=True)
class HoldingAdmission:
    """``LegacyAdmission`` that holds requests while the pool has no endpoint.

    The request path is unchanged while the pool has endpoints (one truthiness test more than
    ``LegacyAdmission``). Held requests pass the legacy sheddable check once woken (legacy
    admission has no saturation gate: the model servers queue them).
    """

    detector: SaturationDetector | None
    datastore: Datastore
    empty_pool_wait: float = 120.0
    clock: Clock = field(default_factory=MonotonicClock)
    #: requests held for the empty pool (``Demand.queued``)
    queued: int = 0
    activity: Activity = field(default_factory=Activity)
    waiter: EmptyPoolWaiter = field(init=False)

    def __post_init__(self) -> None:
        self.waiter = EmptyPoolWaiter(self.datastore, self.empty_pool_wait, Timers(self.clock))

    @property
    def inflight(self) -> int:
        return pool_inflight(self.datastore)

    def add_activity_listener(self, listener: Callable[[], None]) -> None:
        self.activity.add(listener)

    async def admit(self, request: LLMRequest, candidates: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
        eps = self.waiter.candidates(candidates)
        if not eps:
            if self.empty_pool_wait <= 0:
                raise errors.unavailable("no ready endpoints in the inference pool")
            self.queued += 1
            self.activity.notify()  # KEDA's StreamIsActive pushes "active" now
            try:
                eps = await self.waiter.wait(candidates)
            finally:
                self.queued -= 1
                if self.queued == 0:
                    self.activity.notify()
        legacy_admit(request, eps, self.detector)
        return eps

    def release(self, request: LLMRequest, info: ResponseInfo) -> None:
        return None

    def close(self) -> None:
        """Shutdown: held requests get 503 now rather than being cut with the stream."""
        self.waiter.close(errors.unavailable("the endpoint picker is shutting down"))
