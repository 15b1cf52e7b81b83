"""The flow controller: an ``Admission`` that queues instead of overloading the pool.

Shape (GIE §5.3, three tiers):

1. **Priority bands**, strict: the dispatcher always serves the highest non-empty band first,
   and when the head of that band cannot go (pool saturated, or no endpoint yet) *nothing*
   below it goes either (lower priorities never leapfrog).
2. **Fairness** between the flows (fairness ids) of a band: a ``FairnessPolicy`` plugin
   (``token-fair-share-policy`` for solidarity fair share in tokens).
3. **Ordering** inside a flow: an ``OrderingPolicy`` plugin (FCFS, EDF).

A request is *dispatched* (``admit`` returns its candidates and the director schedules it)
only while the saturation detector says its candidates can take more. Otherwise it waits in
memory, bounded by per-band and global request/byte limits (429 when full), by the request
TTL (503) and, while the pool has no endpoint at all, by the empty-pool wait budget (503
"the pool is scaling up"). A client that goes away while queued is removed at once (its
coroutine is cancelled). Every outcome is counted in
``inference_extension_flow_control_request_queue_duration_seconds{outcome}``.

Fast path: when nothing is queued and the pool is not saturated, ``admit`` dispatches inline
(no task hop); fairness counters are still charged, so a tenant that never had to queue is
not "owed" anything when contention starts.

The dispatcher is one task woken by events: enqueue, release (capacity freed), endpoint
changes, and a periodic re-check every ``dispatchPollInterval`` (20 ms) only while something
is queued and blocked, because scraped saturation changes without any event of ours. Between
two dispatches it yields once, so the dispatched request is scheduled (and counted in the
endpoints' in-flight numbers the concurrency detector reads) before the next decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from epp.datalayer.datastore import Datastore
from epp.flowcontrol.config import FlowControlConfig
from epp.framework import errors
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.flowcontrol import FairnessPolicy, FairnessState, FlowQueue, OrderingPolicy, SaturationDetector
from epp.framework.plugin import StateKey
from epp.framework.requestcontrol import ResponseInfo
from epp.framework.scheduling import LLMRequest
from epp.metrics import EppMetrics
from epp.plugins.flowcontrol.fcfs_ordering_policy import FcfsOrderingPolicy
from epp.plugins.flowcontrol.global_strict_fairness_policy import GlobalStrictFairnessPolicy

log = logging.getLogger(__name__)

#: key of the controller's bookkeeping in ``LLMRequest.state``
STATE_KEY: StateKey[_Item] = StateKey("flow-control-item")

# Outcomes (GIE's names, plus RejectedSheddable and EvictedNoEndpoints which GIE folds into
# RejectedCapacity / EvictedTTL; separate labels tell an operator *why*).
DISPATCHED = "Dispatched"
REJECTED_CAPACITY = "RejectedCapacity"
REJECTED_SHEDDABLE = "RejectedSheddable"
EVICTED_TTL = "EvictedTTL"
EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
EVICTED_CLIENT_GONE = "EvictedContextCancelled"
EVICTED_OTHER = "EvictedOther"

_QUEUED, _DISPATCHED, _RELEASED, _DONE = 0, 1, 2, 3


def scaling_error(waited: float) -> RequestError:
    """503 for a request that waited for an empty pool (scaled to zero) past its budget."""
    return errors.unavailable(
        f"the inference pool is scaling up from zero: no endpoint became ready within {waited:.0f}s; "
        "retry later"
    )


def request_bytes(request: LLMRequest) -> int:
    """Body size for the byte limits: the client's content-length, else the prompt bytes."""
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit():
        return int(cl)
    return len(request.prefix_text) + 128


@dataclass(slots=True, eq=False)
class _Series:
    """Metric children of one (fairness id, priority, pool, model, target)."""

    labels: tuple[str, str, str, str, str]
    queue_size: Any
    queue_bytes: Any
    outcomes: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Item:
    """One queued (or dispatched) request."""

    request: LLMRequest
    candidates: Callable[[], Sequence[Endpoint]]
    band: _Band
    flow: str
    seq: int
    arrival: float
    deadline: float  # for EDF: arrival + TTL (inf without TTL)
    hold_until: float  # empty-pool wait budget ends
    size: int
    series: _Series | None
    future: asyncio.Future[Sequence[Endpoint]] | None = None
    timer: asyncio.TimerHandle | None = None
    state: int = _QUEUED
    est_tokens: float = 0.0
    queued: bool = False

    @property
    def pending(self) -> bool:
        return self.state == _QUEUED and self.queued


@dataclass(slots=True, eq=False)
class _Band:
    priority: int
    max_requests: int
    max_bytes: int
    fairness: FairnessPolicy
    state: FairnessState
    ordering: OrderingPolicy
    flows: dict[str, FlowQueue] = field(default_factory=dict)
    live: dict[str, int] = field(default_factory=dict)
    backlogged: dict[str, FlowQueue] = field(default_factory=dict)
    requests: int = 0
    bytes: int = 0


PolicyLookup = Callable[[str], Any]


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.detector = detector
        self.datastore = datastore
        self.metrics = metrics
        self.clock = clock
        self.ttl = config.default_request_ttl
        wait = config.no_endpoint_request_ttl
        self.empty_pool_wait = empty_pool_wait if wait is None else wait
        self.poll = config.dispatch_poll_interval
        self._policies = policies or (lambda _ref: None)
        self._bands: dict[int, _Band] = {}
        self._order: list[_Band] = []  # highest priority first
        for b in config.priority_bands:
            assert b.priority is not None
            self._band(b.priority)
        self._seq = 0
        self.queued = 0
        self.queued_bytes = 0
        self.inflight = 0
        self._pool_up_at = -math.inf
        self._had_endpoints = bool(datastore.endpoints())
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._series: dict[tuple[str, int, str, str], _Series] = {}
        self._listeners: list[Callable[[], None]] = []
        self._saturation_child: Any = None
        self._stopped = False
        self.last_saturation = 0.0
        datastore.add_listener(self._endpoints_changed)

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
        for band in self._order:
            for q in list(band.backlogged.values()):
                while (queued := q.pop()) is not None:
                    self._finish(
                        cast(_Item, queued), EVICTED_OTHER, errors.unavailable("the endpoint picker is shutting down")
                    )

    def add_activity_listener(self, listener: Callable[[], None]) -> None:
        """Called when demand appears or disappears and when a request is held by an empty
        pool (the KEDA scaler's StreamIsActive pushes on it)."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for cb in self._listeners:
            try:
                cb()
            except Exception:  # pragma: no cover - listeners are ours and trivial
                log.exception("flow-control activity listener failed")

    # ------------------------------------------------------------------ bands
    def _band(self, priority: int) -> _Band:
        band = self._bands.get(priority)
        if band is None:
            cfg = self.config.band(priority)
            fairness = self._policies(cfg.fairness_policy_ref)
            if not isinstance(fairness, FairnessPolicy):
                fairness = GlobalStrictFairnessPolicy(cfg.fairness_policy_ref)
            ordering = self._policies(cfg.ordering_policy_ref)
            if not isinstance(ordering, OrderingPolicy):
                ordering = FcfsOrderingPolicy(cfg.ordering_policy_ref)
            band = _Band(priority, cfg.max_requests, cfg.max_bytes, fairness, fairness.new_state(), ordering)
            self._bands[priority] = band
            self._order = sorted(self._bands.values(), key=lambda b: -b.priority)
        return band

    def band_counter(self, priority: int, flow: str) -> float:
        """The fairness counter of a flow in a band (tests, debugging)."""
        return self._band(priority).state.counter(flow)

    # ------------------------------------------------------------------ metrics
    def _series_for(self, request: LLMRequest) -> _Series | None:
        m = self.metrics
        if m is None:
            return None
        key = (request.fairness_id, request.priority, request.incoming_model, request.target_model)
        s = self._series.get(key)
        if s is None:
            if len(self._series) > 10_000:
                self._series.clear()
            labels = (request.fairness_id, str(request.priority), self.datastore.pool.name,
                      request.incoming_model, request.target_model)
            s = self._series[key] = _Series(labels, m.fc_queue_size.labels(*labels), m.fc_queue_bytes.labels(*labels))
        return s

    def _observe(self, item: _Item, outcome: str, now: float) -> None:
        s = item.series
        if s is None:
            return
        child = s.outcomes.get(outcome)
        if child is None:
            child = s.outcomes[outcome] = self.metrics.fc_queue_duration.labels(*s.labels, outcome)  # type: ignore[union-attr]
        child.observe(max(0.0, now - item.arrival))

    def _set_saturation(self, value: float) -> None:
        self.last_saturation = value
        if self.metrics is not None:
            if self._saturation_child is None:
                self._saturation_child = self.metrics.fc_pool_saturation.labels(self.datastore.pool.name)
            self._saturation_child.set(value)

    # ------------------------------------------------------------------ admission
    def _safe_candidates(self, fn: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
        """Candidates; () when the pool is empty (scaled to zero: hold). A subset hint that
        names no endpoint of a non-empty pool stays an error (503, as without flow control)."""
        try:
            return fn()
        except RequestError:
            if self.datastore.endpoints():
                raise
            return ()

    async def admit(self, request: LLMRequest, candidates: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
        if self._stopped:
            raise errors.unavailable("the endpoint picker is shutting down")
        now = self.clock()
        band = self._bands.get(request.priority) or self._band(request.priority)
        eps = self._safe_candidates(candidates)
        series = self._series_for(request)
        sheddable = request.priority < 0
        saturated = False
        if eps:
            sat = self.detector.saturation(eps) if self.detector is not None else 0.0
            saturated = sat >= 1.0
            if self.queued == 0 and not saturated:
                item = _Item(request, candidates, band, request.fairness_id, self._next_seq(), now, math.inf,
                             now, 0, series)
                self._dispatch(item, now)
                return eps
            if sheddable and saturated:
                self._reject(request, series, now, REJECTED_SHEDDABLE)
                raise errors.shed("sheddable request dropped: the pool is saturated")
        elif self.empty_pool_wait <= 0:
            raise errors.unavailable("no ready endpoints in the inference pool")
        size = request_bytes(request)
        cfg = self.config
        if (
            (band.max_requests and band.requests >= band.max_requests)
            or (band.max_bytes and band.bytes + size > band.max_bytes)
            or (cfg.max_requests and self.queued >= cfg.max_requests)
            or (cfg.max_bytes and self.queued_bytes + size > cfg.max_bytes)
        ):
            self._reject(request, series, now, REJECTED_CAPACITY)
            raise errors.shed("flow control queue is full")
        ttl = self.ttl
        item = _Item(
            request, candidates, band, request.fairness_id, self._next_seq(), now,
            now + ttl if ttl > 0 else math.inf, now + self.empty_pool_wait, size, series,
        )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Sequence[Endpoint]] = loop.create_future()
        item.future = fut
        request.state.set(STATE_KEY, item)
        self._enqueue(item)
        self._arm(item, now, bool(eps))
        self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            if item.state == _QUEUED:  # the client went away (Envoy reset the stream)
                self._unqueue(item)
                self._finish(item, EVICTED_CLIENT_GONE, None)
            raise

    def release(self, request: LLMRequest, info: ResponseInfo) -> None:
        item = request.state.pop(STATE_KEY)
        if item is None or item.state != _DISPATCHED:
            return
        item.state = _RELEASED
        self.inflight -= 1
        band = item.band
        if band.fairness.uses_tokens or self.metrics is not None:
            prompt = info.prompt_tokens
            completion = info.completion_tokens
            cached = info.cached_tokens or 0
            if prompt is not None or completion is not None:
                p = float(prompt if prompt is not None else item.request.estimated_prompt_tokens)
                c = float(completion or 0)
                if band.fairness.uses_tokens:
                    band.state.charge(item.flow, band.fairness.cost(p, float(cached), c) - item.est_tokens)
                if self.metrics is not None:
                    self._count_tokens(item, p, float(cached), c)
        if self.queued:
            self._wake.set()
        elif self.inflight == 0:
            self._notify()

    def _count_tokens(self, item: _Item, prompt: float, cached: float, completion: float) -> None:
        m = self.metrics
        assert m is not None
        labels = (item.flow, str(item.band.priority), self.datastore.pool.name)
        cached = min(cached, prompt)
        if prompt - cached > 0:
            m.fc_tokens_served.labels(*labels, "prompt").inc(prompt - cached)
        if cached > 0:
            m.fc_tokens_served.labels(*labels, "cached").inc(cached)
        if completion > 0:
            m.fc_tokens_served.labels(*labels, "completion").inc(completion)

    # ------------------------------------------------------------------ queue operations
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _reject(self, request: LLMRequest, series: _Series | None, now: float, outcome: str) -> None:
        if series is not None and self.metrics is not None:
            child = series.outcomes.get(outcome)
            if child is None:
                child = series.outcomes[outcome] = self.metrics.fc_queue_duration.labels(*series.labels, outcome)
            child.observe(0.0)

    def _enqueue(self, item: _Item) -> None:
        band = item.band
        flow = item.flow
        q = band.flows.get(flow)
        if q is None:
            q = band.flows[flow] = band.ordering.new_queue()
        item.queued = True
        q.push(item)
        n = band.live.get(flow, 0)
        band.live[flow] = n + 1
        if n == 0:
            band.backlogged[flow] = q
            band.state.on_backlogged(flow, band.backlogged)
        band.requests += 1
        band.bytes += item.size
        was_idle = self.queued == 0 and self.inflight == 0
        self.queued += 1
        self.queued_bytes += item.size
        if item.series is not None:
            item.series.queue_size.inc()
            item.series.queue_bytes.inc(item.size)
        if was_idle or not self.datastore.endpoints():
            self._notify()

    def _unqueue(self, item: _Item) -> None:
        """Account an item leaving the queue (the queue object drops it lazily or already did)."""
        item.queued = False
        band = item.band
        flow = item.flow
        n = band.live[flow] - 1
        if n:
            band.live[flow] = n
        else:
            del band.live[flow]
            band.backlogged.pop(flow, None)
            if len(band.flows) > 1000:  # forget idle flows' queues (fairness-id churn)
                band.flows.pop(flow, None)
        band.requests -= 1
        band.bytes -= item.size
        self.queued -= 1
        self.queued_bytes -= item.size
        if item.series is not None:
            item.series.queue_size.dec()
            item.series.queue_bytes.dec(item.size)
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None

    def _finish(self, item: _Item, outcome: str, error: RequestError | None) -> None:
        """A queued item leaves without being dispatched."""
        if item.queued:
            self._unqueue(item)
        item.state = _DONE
        self._observe(item, outcome, self.clock())
        item.request.state.pop(STATE_KEY)
        fut = item.future
        if fut is not None and not fut.done() and error is not None:
            fut.set_exception(error)
        if self.queued == 0 and self.inflight == 0:
            self._notify()

    def _dispatch(self, item: _Item, now: float) -> None:
        """Hand the request to the scheduler (its admit returns) and charge its flow."""
        if item.queued:
            self._unqueue(item)
        item.state = _DISPATCHED
        item.request.state.set(STATE_KEY, item)
        band = item.band
        if band.fairness.uses_tokens:
            req = item.request
            est = band.fairness.estimate(req.estimated_prompt_tokens, req.max_tokens)
            item.est_tokens = est
            band.state.charge(item.flow, est)
        was_idle = self.queued == 0 and self.inflight == 0
        self.inflight += 1
        self._observe(item, DISPATCHED, now)
        if was_idle:
            self._notify()

    # ------------------------------------------------------------------ timers
    def _arm(self, item: _Item, now: float, has_endpoints: bool) -> None:
        due = item.hold_until if not has_endpoints else self._expiry(item)
        if due == math.inf:
            return
        loop = asyncio.get_running_loop()
        item.timer = loop.call_at(loop.time() + max(0.0, due - now), self._on_timer, item)

    def _expiry(self, item: _Item) -> float:
        """TTL deadline; time spent waiting for an empty pool to scale up does not count."""
        if self.ttl <= 0:
            return math.inf
        return max(item.arrival, self._pool_up_at) + self.ttl

    def _on_timer(self, item: _Item) -> None:
        item.timer = None
        if item.state != _QUEUED:
            return
        now = self.clock()
        try:
            eps = self._safe_candidates(item.candidates)
        except RequestError as exc:
            self._finish(item, EVICTED_OTHER, exc)
            return
        if not eps:
            if now >= item.hold_until:
                self._finish(item, EVICTED_NO_ENDPOINTS, scaling_error(self.empty_pool_wait))
                return
            self._arm(item, now, False)
            return
        exp = self._expiry(item)
        if now >= exp:
            self._finish(item, EVICTED_TTL, errors.unavailable("request expired in the flow control queue (TTL)"))
            return
        self._arm(item, now, True)

    # ------------------------------------------------------------------ dispatcher
    def _endpoints_changed(self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]) -> None:
        has = bool(self.datastore.endpoints())
        if has and not self._had_endpoints:
            self._pool_up_at = self.clock()
        self._had_endpoints = has
        self._wake.set()

    async def _run(self) -> None:
        wake = self._wake
        while True:
            if self.queued == 0:
                await wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll):
                        await wake.wait()
            wake.clear()
            if self.queued:
                try:
                    await self._cycle()
                except asyncio.CancelledError:
                    raise
                except Exception:  # pragma: no cover - a bug must not stop dispatching forever
                    log.exception("flow-control dispatch cycle failed")

    async def _cycle(self) -> None:
        """Dispatch in (band, fairness, ordering) order until empty or blocked.

        After every dispatch the scan restarts at the highest band: a request of a higher
        priority that arrived meanwhile goes next.
        """
        start = time.perf_counter()
        detector = self.detector
        dispatched = 0
        try:
            while self.queued:
                band = next((b for b in self._order if b.requests), None)
                if band is None:  # pragma: no cover - counts disagree
                    return
                flow = band.state.pick(band.backlogged)
                if flow is None:  # pragma: no cover - counts and queues disagree
                    return
                q = band.backlogged[flow]
                head = q.peek()
                if head is None:  # pragma: no cover
                    band.backlogged.pop(flow, None)
                    continue
                item = cast(_Item, head)
                try:
                    eps = self._safe_candidates(item.candidates)
                except RequestError as exc:
                    self._finish(item, EVICTED_OTHER, exc)
                    continue
                now = self.clock()
                if not eps:
                    if now >= item.hold_until:
                        self._finish(item, EVICTED_NO_ENDPOINTS, scaling_error(self.empty_pool_wait))
                        continue
                    return  # head blocked until endpoints appear: nothing else may pass it
                sat = detector.saturation(eps) if detector is not None else 0.0
                self._set_saturation(sat)
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
            if self.metrics is not None and dispatched:
                self.metrics.fc_dispatch_cycle.observe(time.perf_counter() - start)
