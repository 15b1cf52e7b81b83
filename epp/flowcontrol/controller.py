"""The flow controller: an ``Admission`` that queues instead of overloading the pool.

Shape (GIE §5.3, three tiers):

1. **Priority bands**, strict: the dispatcher always serves the highest non-empty band first,
   and when the head of that band cannot go (pool saturated, or no endpoint yet) *nothing*
   below it goes either (lower priorities never leapfrog).
2. **Fairness** between the flows (fairness ids) of a band: a ``FairnessPolicy`` plugin
   (``token-fair-share-policy`` for solidarity fair share in tokens).
3. **Ordering** inside a flow: an ``OrderingPolicy`` plugin (FCFS, or EDF on each request's
   own deadline: arrival + its TTL, see ``queues.request_ttl``).

A request is *dispatched* (``admit`` returns its candidates and the director schedules it)
only while the saturation detector says its candidates can take more. Otherwise it waits in
memory, bounded by per-band and global request/byte limits (429 when full), by its TTL (503)
and, while the pool has no endpoint at all, by the empty-pool wait budget (503 "the pool is
scaling up"; ``hold.EmptyPoolWaiter``). A client that goes away while queued is removed at
once (its coroutine is cancelled). Every outcome is counted in
``inference_extension_flow_control_request_queue_duration_seconds{outcome}``.

Fast path: when nothing is queued and the pool is not saturated, ``admit`` dispatches inline
(no task hop); fairness counters are still charged, so a tenant that never had to queue is
not "owed" anything when contention starts.

The dispatcher is one task woken by events: enqueue, release (capacity freed), endpoint
changes, and a re-check ``dispatchPollInterval`` (20 ms) after a cycle that ended blocked,
because scraped saturation changes without any event of ours. Between two dispatches it
yields once, so the dispatched request is scheduled (and counted in the endpoints' in-flight
numbers the concurrency detector reads) before the next decision.

Time: every deadline (TTLs, the empty-pool budget, the re-check) is armed on one ``Timers``
heap running on the injected ``Clock``, so tests drive time with a ``ManualClock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence

from epp.datalayer.datastore import Datastore
from epp.flowcontrol.clock import Clock, MonotonicClock
from epp.flowcontrol.config import FlowControlConfig
from epp.flowcontrol.demand import Activity
from epp.flowcontrol.hold import EmptyPoolWaiter
from epp.flowcontrol.queues import Outcome, PolicyLookup, QueueItem, Queues, State, request_bytes, request_ttl
from epp.flowcontrol.series import FlowMetrics
from epp.flowcontrol.timers import Timer, Timers
from epp.framework import errors
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.flowcontrol import SaturationDetector
from epp.framework.plugin import StateKey
from epp.framework.requestcontrol import ResponseInfo
from epp.framework.scheduling import LLMRequest
from epp.metrics import EppMetrics

log = logging.getLogger(__name__)

#: key of the controller's bookkeeping in ``LLMRequest.state``
STATE_KEY: StateKey[QueueItem] = StateKey("flow-control-item")


class FlowController:
    """``Admission`` with queues, priority bands, fairness and scale-from-zero holding."""

    def __init__(
        self,
        config: FlowControlConfig,
        detector: SaturationDetector | None,
        datastore: Datastore,
        metrics: EppMetrics | None = None,
        policies: PolicyLookup | None = None,
        empty_pool_wait: float = 120.0,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.detector = detector
        self.datastore = datastore
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        #: ``defaultRequestTTL`` (0 = none); a request may ask for less (``request_ttl``)
        self.ttl = config.default_request_ttl
        self.poll = config.dispatch_poll_interval
        self.inflight = 0
        self.activity = Activity()
        self._queues = Queues(config, policies)
        self._metrics = FlowMetrics(metrics, datastore)
        self._timers = Timers(self.clock)
        self._wake = asyncio.Event()
        wait = config.no_endpoint_request_ttl
        self.pool = EmptyPoolWaiter(datastore, empty_pool_wait if wait is None else wait, self._timers)
        self.pool.on_change(self._wake.set)
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self._poll_timer: Timer | None = None
        self._stopped = False

    @property
    def queued(self) -> int:
        """Requests waiting (queued or held for an empty pool): ``Demand.queued``."""
        return self._queues.queued

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._stopped = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="flow-control-dispatcher")

    async def stop(self) -> None:
        """Stop dispatching; every queued request gets 503 (the picker is going away)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for item in self._queues.drain():
            self._finish(item, Outcome.EVICTED_OTHER, errors.unavailable("the endpoint picker is shutting down"))
        self._timers.close()
        self._poll_timer = None

    def add_activity_listener(self, listener: Callable[[], None]) -> None:
        """Called when demand appears or disappears and when a request is held by an empty
        pool (the KEDA scaler's StreamIsActive pushes on it)."""
        self.activity.add(listener)

    def band_counter(self, priority: int, flow: str) -> float:
        """The fairness counter of a flow in a band (tests, debugging)."""
        return self._queues.band(priority).state.counter(flow)

    # ------------------------------------------------------------------ admission
    async def admit(self, request: LLMRequest, candidates: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
        if self._stopped:
            raise errors.unavailable("the endpoint picker is shutting down")
        now = self.clock.now()
        queues = self._queues
        band = queues.band(request.priority)
        eps = self.pool.candidates(candidates)
        series = self._metrics.series(request)
        if eps:
            saturated = self.detector is not None and self.detector.saturation(eps) >= 1.0
            if queues.queued == 0 and not saturated:
                item = QueueItem(request, candidates, band, request.fairness_id, self._next_seq(), now,
                                 0.0, math.inf, now, 0, series)
                self._dispatch(item, now)
                return eps
            if request.priority < 0 and saturated:
                if series is not None:
                    series.outcome(Outcome.REJECTED_SHEDDABLE, 0.0)
                raise errors.shed("sheddable request dropped: the pool is saturated")
        elif self.pool.budget <= 0:
            raise errors.unavailable("no ready endpoints in the inference pool")
        size = request_bytes(request)
        if queues.full(band, size):
            if series is not None:
                series.outcome(Outcome.REJECTED_CAPACITY, 0.0)
            raise errors.shed("flow control queue is full")
        ttl = request_ttl(request, self.ttl)
        item = QueueItem(
            request, candidates, band, request.fairness_id, self._next_seq(), now, ttl,
            now + ttl if ttl > 0 else math.inf, now + self.pool.budget, size, series,
        )
        fut: asyncio.Future[Sequence[Endpoint]] = asyncio.get_running_loop().create_future()
        item.future = fut
        request.state.set(STATE_KEY, item)
        self._enqueue(item)
        self._arm(item, now, bool(eps))
        self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            if item.state == State.QUEUED:  # the client went away (Envoy reset the stream)
                self._finish(item, Outcome.EVICTED_CLIENT_GONE, None)
            raise

    def release(self, request: LLMRequest, info: ResponseInfo) -> None:
        item = request.state.pop(STATE_KEY)
        if item is None or item.state != State.SENT:
            return
        item.state = State.RELEASED
        self.inflight -= 1
        band = item.band
        counting = self._metrics.metrics is not None
        if band.fairness.uses_tokens or counting:
            prompt = info.prompt_tokens
            completion = info.completion_tokens
            if prompt is not None or completion is not None:
                p = float(prompt if prompt is not None else item.request.estimated_prompt_tokens)
                c = float(completion or 0)
                cached = float(info.cached_tokens or 0)
                if band.fairness.uses_tokens:
                    band.state.charge(item.flow, band.fairness.cost(p, cached, c) - item.est_tokens)
                if counting:
                    self._metrics.tokens(item.flow, band.priority, p, cached, c)
        if self.queued:
            self._wake.set()
        elif self.inflight == 0:
            self.activity.notify()

    # ------------------------------------------------------------------ item transitions
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _enqueue(self, item: QueueItem) -> None:
        was_idle = self.queued == 0 and self.inflight == 0
        self._queues.push(item)
        if was_idle or not self.datastore.endpoints():
            self.activity.notify()

    def _unqueue(self, item: QueueItem) -> None:
        self._queues.remove(item)
        if item.timer is not None:
            self._timers.cancel(item.timer)
            item.timer = None

    def _finish(self, item: QueueItem, outcome: str, error: RequestError | None) -> None:
        """A queued item leaves without being dispatched."""
        if item.queued:
            self._unqueue(item)
        item.state = State.DONE
        if item.series is not None:
            item.series.outcome(outcome, self.clock.now() - item.arrival)
        item.request.state.pop(STATE_KEY)
        fut = item.future
        if fut is not None and not fut.done() and error is not None:
            fut.set_exception(error)
        if self.queued == 0 and self.inflight == 0:
            self.activity.notify()

    def _dispatch(self, item: QueueItem, now: float) -> None:
        """Hand the request to the scheduler (its admit returns) and charge its flow."""
        if item.queued:
            self._unqueue(item)
        item.state = State.SENT
        item.request.state.set(STATE_KEY, item)
        band = item.band
        if band.fairness.uses_tokens:
            req = item.request
            est = band.fairness.estimate(req.estimated_prompt_tokens, req.max_tokens)
            item.est_tokens = est
            band.state.charge(item.flow, est)
        was_idle = self.queued == 0 and self.inflight == 0
        self.inflight += 1
        if item.series is not None:
            item.series.outcome(Outcome.DISPATCHED, now - item.arrival)
        if was_idle:
            self.activity.notify()

    # ------------------------------------------------------------------ deadlines
    def _arm(self, item: QueueItem, now: float, has_endpoints: bool) -> None:
        """Arm the item's next check: its TTL expiry, or while the pool is empty the end of
        its wait budget, checked at least every TTL (the TTL only starts once the pool is up,
        so a request held past it must find out soon after the pool comes up)."""
        if has_endpoints:
            due = self._expiry(item)
        else:
            due = min(item.hold_until, now + item.ttl) if item.ttl > 0 else item.hold_until
        if due != math.inf:
            item.timer = self._timers.call_at(due, self._on_timer, item)

    def _expiry(self, item: QueueItem) -> float:
        """TTL deadline; time spent waiting for an empty pool to scale up does not count."""
        if item.ttl <= 0:
            return math.inf
        return max(item.arrival, self.pool.ready_at) + item.ttl

    def _on_timer(self, item: QueueItem) -> None:
        item.timer = None
        if item.state != State.QUEUED:
            return
        now = self.clock.now()
        try:
            eps = self.pool.candidates(item.candidates)
        except RequestError as exc:
            self._finish(item, Outcome.EVICTED_OTHER, exc)
            return
        if not eps:
            if now >= item.hold_until:
                self._finish(item, Outcome.EVICTED_NO_ENDPOINTS, self.pool.error())
                return
        elif now >= self._expiry(item):
            expired = errors.unavailable("request expired in the flow control queue (TTL)")
            self._finish(item, Outcome.EVICTED_TTL, expired)
            return
        self._arm(item, now, bool(eps))

    def _poll_due(self) -> None:
        self._poll_timer = None
        self._wake.set()

    # ------------------------------------------------------------------ dispatcher
    async def _run(self) -> None:
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            if not self.queued:
                continue
            try:
                await self._cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - a bug must not stop dispatching forever
                log.exception("flow-control dispatch cycle failed")
            if self.queued and self._poll_timer is None:  # blocked: re-check saturation soon
                self._poll_timer = self._timers.call_at(self.clock.now() + self.poll, self._poll_due)

    async def _cycle(self) -> None:
        """Dispatch in (band, fairness, ordering) order until empty or blocked.

        After every dispatch the scan restarts at the highest band: a request of a higher
        priority that arrived meanwhile goes next.
        """
        start = time.perf_counter()
        detector = self.detector
        dispatched = 0
        try:
            while (head := self._queues.head()) is not None:
                band, flow, q, item = head
                try:
                    eps = self.pool.candidates(item.candidates)
                except RequestError as exc:
                    self._finish(item, Outcome.EVICTED_OTHER, exc)
                    continue
                now = self.clock.now()
                if not eps:
                    if now >= item.hold_until:
                        self._finish(item, Outcome.EVICTED_NO_ENDPOINTS, self.pool.error())
                        continue
                    return  # head blocked until endpoints appear: nothing else may pass it
                sat = detector.saturation(eps) if detector is not None else 0.0
                self._metrics.saturation(sat)
                if sat >= 1.0:
                    return  # paused: strict priority, no leapfrogging
                q.pop()
                band.state.dispatched(flow)
                self._dispatch(item, now)
                fut = item.future
                if fut is not None and not fut.done():
                    fut.set_result(eps)
                dispatched += 1
                # let the admitted request run its scheduling (in-flight counts) first
                await asyncio.sleep(0)
        finally:
            if dispatched:
                self._metrics.dispatch_cycle(time.perf_counter() - start)
