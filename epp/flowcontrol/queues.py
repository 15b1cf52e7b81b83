"""The flow controller's queue bookkeeping: items, priority bands, flows, limits, counts.

No timing and no dispatch decisions here: ``Queues`` keeps the per-band / per-flow queues and
the counts the limits, the metrics and the KEDA scaler read consistent, whatever way an item
leaves (dispatched, expired, client gone). The queues themselves are the ordering policy's
(lazy deletion: an item that leaves early is only marked and skipped at the head).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from epp.flowcontrol.config import FlowControlConfig
from epp.flowcontrol.series import Series
from epp.flowcontrol.timers import Timer
from epp.framework.datalayer import Endpoint
from epp.framework.flowcontrol import FairnessPolicy, FairnessState, FlowQueue, OrderingPolicy
from epp.framework.plugin import Plugin, parse_duration
from epp.framework.scheduling import LLMRequest
from epp.plugins.flowcontrol.fcfs_ordering_policy import FcfsOrderingPolicy
from epp.plugins.flowcontrol.global_strict_fairness_policy import GlobalStrictFairnessPolicy

#: fairnessPolicyRef / orderingPolicyRef → the plugin (None: unknown; the config loader
#: rejects unknown refs, so None only happens for bands made by tests without a lookup)
PolicyLookup = Callable[[str], Plugin | None]

#: request header with the request's own queue TTL (llm-d's name; a Go duration such as
#: ``5s`` or ``250ms``). It can only shorten ``defaultRequestTTL``, never extend it.
TTL_HEADER = "x-llm-d-inference-ttl"



class Outcome(StrEnum):
    """The ``outcome`` label: GIE's names, plus RejectedSheddable and EvictedNoEndpoints, which
    GIE folds into RejectedCapacity / EvictedTTL (separate labels tell an operator *why*)."""

    DISPATCHED = "Dispatched"
    REJECTED_CAPACITY = "RejectedCapacity"
    REJECTED_SHEDDABLE = "RejectedSheddable"
    EVICTED_TTL = "EvictedTTL"
    EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
    EVICTED_CLIENT_GONE = "EvictedContextCancelled"
    EVICTED_OTHER = "EvictedOther"



class State:
    """``QueueItem.state`` (plain ints, not an Enum: compared on every dispatch)."""

    QUEUED = 0  # waiting (or held for an empty pool)
    SENT = 1  # dispatched: admit returned, the response has not ended
    RELEASED = 2  # its response ended
    DONE = 3  # left without being dispatched (rejected, expired, client gone)


def request_bytes(request: LLMRequest) -> int:
    """Body size for the byte limits: the client's content-length, else the prompt bytes."""
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit():
        return int(cl)
    return len(request.prefix_text) + 128


def request_ttl(request: LLMRequest, default: float) -> float:
    """The request's queue TTL in seconds (0 = none): its ``x-llm-d-inference-ttl`` header,
    capped at ``default`` when the operator set one, else ``default``.

    InferenceObjectives carry no TTL (GIE's and llm-d's CRDs have priority only), so, as in
    llm-d, the per-request TTL comes from a header. A malformed or zero value is ignored (the
    default applies) rather than rejected: the header is advisory, and a client typo must not
    turn a request that would have been served into an error. The cap keeps the operator's
    ``defaultRequestTTL`` the longest any request may hold queue memory.
    """
    raw = request.headers.get(TTL_HEADER)
    if raw is None:
        return default
    try:
        ttl = parse_duration(raw)
    except ValueError:
        return default
    if ttl <= 0:
        return default
    return min(ttl, default) if default > 0 else ttl


@dataclass(slots=True, eq=False)
class QueueItem:
    """One queued (or dispatched) request; what the policies see of it is ``QueuedItem``."""

    request: LLMRequest
    candidates: Callable[[], Sequence[Endpoint]]
    band: Band
    flow: str
    seq: int
    arrival: float
    ttl: float  # 0 = no TTL
    deadline: float  # EDF's key: arrival + the request's own TTL (inf without one)
    hold_until: float  # the empty-pool wait budget ends
    size: int
    series: Series | None
    future: asyncio.Future[Sequence[Endpoint]] | None = None
    timer: Timer | None = None
    state: int = State.QUEUED
    est_tokens: float = 0.0
    queued: bool = False

    @property
    def pending(self) -> bool:
        return self.state == State.QUEUED and self.queued


@dataclass(slots=True, eq=False)
class Band:
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


class Queues:
    """Priority bands (highest first), their flows, and the global counts."""

    __slots__ = ("_bands", "_order", "_policies", "config", "queued", "queued_bytes")

    def __init__(self, config: FlowControlConfig, policies: PolicyLookup | None = None) -> None:
        self.config = config
        self._policies: PolicyLookup = policies or (lambda _ref: None)
        self._bands: dict[int, Band] = {}
        self._order: list[Band] = []
        self.queued = 0
        self.queued_bytes = 0
        for b in config.priority_bands:
            assert b.priority is not None  # parse_flow_control guarantees it
            self.band(b.priority)

    def band(self, priority: int) -> Band:
        """The band of ``priority``; an unlisted one is made from ``defaultPriorityBand``."""
        band = self._bands.get(priority)
        if band is None:
            cfg = self.config.band(priority)
            fairness = self._policies(cfg.fairness_policy_ref)
            if not isinstance(fairness, FairnessPolicy):
                fairness = GlobalStrictFairnessPolicy(cfg.fairness_policy_ref)
            ordering = self._policies(cfg.ordering_policy_ref)
            if not isinstance(ordering, OrderingPolicy):
                ordering = FcfsOrderingPolicy(cfg.ordering_policy_ref)
            band = Band(priority, cfg.max_requests, cfg.max_bytes, fairness, fairness.new_state(), ordering)
            self._bands[priority] = band
            self._order = sorted(self._bands.values(), key=lambda b: -b.priority)
        return band

    def full(self, band: Band, size: int) -> bool:
        """Would one more request of ``size`` bytes break a band or global limit (0 = none)?"""
        cfg = self.config
        return bool(
            (band.max_requests and band.requests >= band.max_requests)
            or (band.max_bytes and band.bytes + size > band.max_bytes)
            or (cfg.max_requests and self.queued >= cfg.max_requests)
            or (cfg.max_bytes and self.queued_bytes + size > cfg.max_bytes)
        )

    def push(self, item: QueueItem) -> None:
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
        self.queued += 1
        self.queued_bytes += item.size
        if item.series is not None:
            item.series.enqueued(item.size)

    def remove(self, item: QueueItem) -> None:
        """Account an item leaving (the queue object drops it lazily, or already did)."""
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
            item.series.dequeued(item.size)

    def head(self) -> tuple[Band, str, FlowQueue, QueueItem] | None:
        """The next request in (strict priority, fairness, ordering) order, not yet popped."""
        while self.queued:
            band = next((b for b in self._order if b.requests), None)
            if band is None:  # pragma: no cover - counts disagree
                return None
            flow = band.state.pick(band.backlogged)
            if flow is None:  # pragma: no cover - counts and queues disagree
                return None
            q = band.backlogged[flow]
            head = q.peek()
            if head is None:  # pragma: no cover - a live count without a live item
                band.backlogged.pop(flow, None)
                continue
            assert isinstance(head, QueueItem)
            return band, flow, q, head
        return None

    def drain(self) -> Iterator[QueueItem]:
        """Every queued item, popped (shutdown); the caller accounts each with ``remove``."""
        for band in self._order:
            for q in list(band.backlogged.values()):
                while (item := q.pop()) is not None:
                    assert isinstance(item, QueueItem)
                    yield item
