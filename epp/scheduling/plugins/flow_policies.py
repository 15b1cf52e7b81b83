"""Flow-control policies: which flow of a priority band dispatches next (fairness) and which
request of a flow goes first (ordering). Used by ``epp.flowcontrol``; declared in the
EndpointPickerConfig like any plugin and referenced from a priority band with
``fairnessPolicyRef`` / ``orderingPolicyRef``.

They live here (and not in ``epp.flowcontrol``) because the plugin registry indexes this
package, and the scheduling layer must not import the flow-control layer above it.

Fairness (within one priority band; bands themselves are strict):

* ``global-strict-fairness-policy`` (GIE's default): one global arrival order across flows.
* ``round-robin-fairness-policy`` (GIE): flows take turns, one dispatch each.
* ``token-fair-share-policy`` (ours): a weighted virtual token counter per tenant (VTC, Sheng
  et al., OSDI'24). The backlogged tenant that was served the fewest weighted tokens goes
  next. Tokens are estimated at dispatch (prompt estimate + ``max_tokens``) and corrected with
  the response's real ``usage``. Cached prompt tokens cost ``cachedTokenFactor`` of a fresh
  one. A tenant that becomes backlogged again is lifted to the smallest counter among the
  backlogged ones, so idling neither banks credit nor is punished; its unused share went to
  whoever was busy (work-conserving: policies only *order* dispatches, they never hold
  capacity back).

Ordering (within one flow): ``fcfs-ordering-policy`` (GIE's default) and
``edf-ordering-policy`` (earliest deadline first; deadline = arrival + request TTL).

Queues use lazy deletion: a request that leaves early (TTL, client gone) is only marked; it is
skipped when it reaches the head. Every operation is O(1) or O(log n); picking a flow is
O(backlogged flows in the band).
"""

from __future__ import annotations

import fnmatch
import heapq
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from typing import Protocol, Self

from pydantic import BaseModel, Field

from epp.scheduling.framework import Plugin, PluginContext
from epp.scheduling.params import PluginParams

# --------------------------------------------------------------------------- queued items


class QueuedItem(Protocol):
    """What the policies read of a queued request (``epp.flowcontrol`` owns the type)."""

    #: global arrival sequence number (monotonic across the controller)
    seq: int
    #: absolute deadline used by EDF (``inf`` when the request has no TTL)
    deadline: float

    @property
    def pending(self) -> bool:
        """Still waiting (not dispatched, expired, rejected or gone)."""
        ...


# --------------------------------------------------------------------------- ordering


class FlowQueue(ABC):
    """The queue of one flow. ``len`` is not tracked here (the controller counts live items)."""

    @abstractmethod
    def push(self, item: QueuedItem) -> None: ...

    @abstractmethod
    def peek(self) -> QueuedItem | None:
        """The next live item (dead ones at the head are dropped), or None."""

    @abstractmethod
    def pop(self) -> QueuedItem | None: ...


class _FifoQueue(FlowQueue):
    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: deque[QueuedItem] = deque()

    def push(self, item: QueuedItem) -> None:
        self._q.append(item)

    def peek(self) -> QueuedItem | None:
        q = self._q
        while q and not q[0].pending:
            q.popleft()
        return q[0] if q else None

    def pop(self) -> QueuedItem | None:
        item = self.peek()
        if item is not None:
            self._q.popleft()
        return item


class _EdfQueue(FlowQueue):
    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h: list[tuple[float, int, QueuedItem]] = []

    def push(self, item: QueuedItem) -> None:
        heapq.heappush(self._h, (item.deadline, item.seq, item))

    def peek(self) -> QueuedItem | None:
        h = self._h
        while h and not h[0][2].pending:
            heapq.heappop(h)
        return h[0][2] if h else None

    def pop(self) -> QueuedItem | None:
        item = self.peek()
        if item is not None:
            heapq.heappop(self._h)
        return item


class OrderingPolicy(Plugin):
    """Makes the per-flow queues of the bands that reference it."""

    @abstractmethod
    def new_queue(self) -> FlowQueue: ...


class FcfsOrderingPolicy(OrderingPolicy):
    """First come, first served (GIE's default)."""

    type_name = "fcfs-ordering-policy"

    def new_queue(self) -> FlowQueue:
        return _FifoQueue()


class EdfOrderingPolicy(OrderingPolicy):
    """Earliest deadline first (arrival + TTL; requests without a TTL go last, FCFS)."""

    type_name = "edf-ordering-policy"

    def new_queue(self) -> FlowQueue:
        return _EdfQueue()


# --------------------------------------------------------------------------- fairness


class FairnessState(ABC):
    """Per-band fairness state. ``backlogged`` maps fairness id → its queue (only flows with
    at least one live item; the controller keeps it that way)."""

    def on_backlogged(self, flow: str, backlogged: Mapping[str, FlowQueue]) -> None:  # noqa: B027
        """``flow`` just went from empty to non-empty (it is already in ``backlogged``)."""

    @abstractmethod
    def pick(self, backlogged: Mapping[str, FlowQueue]) -> str | None:
        """The flow to dispatch from next (None if nothing is backlogged). Must not change
        the policy's state: the dispatch may still be refused (pool saturated)."""

    def dispatched(self, flow: str) -> None:  # noqa: B027
        """The flow ``pick`` chose was dispatched."""

    def charge(self, flow: str, tokens: float) -> None:  # noqa: B027
        """``tokens`` (estimated) were dispatched for ``flow``; may be negative (correction)."""

    def counter(self, flow: str) -> float:
        """The flow's service counter (for metrics and tests); 0 when the policy keeps none."""
        return 0.0


class FairnessPolicy(Plugin):
    """Makes the fairness state of the bands that reference it."""

    #: True when the policy wants token accounting (charge/correct) from the controller
    uses_tokens: bool = False

    @abstractmethod
    def new_state(self) -> FairnessState: ...

    def cost(self, prompt_tokens: float, cached_tokens: float, completion_tokens: float) -> float:
        """Unweighted service cost of a request (token policies override)."""
        return 0.0

    def estimate(self, prompt_tokens: int, max_tokens: int | None) -> float:
        """Cost charged at dispatch, before the real usage is known."""
        return 0.0


def _oldest_head(backlogged: Mapping[str, FlowQueue]) -> str | None:
    best: str | None = None
    best_seq = math.inf
    for flow, q in backlogged.items():
        head = q.peek()
        if head is not None and head.seq < best_seq:
            best, best_seq = flow, head.seq
    return best


class _GlobalStrictState(FairnessState):
    def pick(self, backlogged: Mapping[str, FlowQueue]) -> str | None:
        return _oldest_head(backlogged)


class GlobalStrictFairnessPolicy(FairnessPolicy):
    """One global arrival order across the band's flows (GIE's default): no fairness at all,
    the oldest request dispatches first."""

    type_name = "global-strict-fairness-policy"

    def new_state(self) -> FairnessState:
        return _GlobalStrictState()


class _RoundRobinState(FairnessState):
    __slots__ = ("_ring",)

    def __init__(self) -> None:
        self._ring: deque[str] = deque()

    def on_backlogged(self, flow: str, backlogged: Mapping[str, FlowQueue]) -> None:
        if flow not in self._ring:  # O(flows), only when a flow wakes up
            self._ring.append(flow)

    def pick(self, backlogged: Mapping[str, FlowQueue]) -> str | None:
        ring = self._ring
        while ring:
            if ring[0] in backlogged:
                return ring[0]
            ring.popleft()  # drained flows leave the ring; on_backlogged re-adds them
        return None

    def dispatched(self, flow: str) -> None:
        ring = self._ring
        if ring and ring[0] == flow:
            ring.rotate(-1)


class RoundRobinFairnessPolicy(FairnessPolicy):
    """Flows take turns (GIE's; the unit of fairness is one dispatch, whatever its size)."""

    type_name = "round-robin-fairness-policy"

    def new_state(self) -> FairnessState:
        return _RoundRobinState()


# ---- token fair share


class TierSpec(PluginParams):
    """A flat-rate tier: its weight is the tenant's share under contention (2 = twice the
    tokens of a weight-1 tenant)."""

    name: str
    weight: float = Field(1.0, gt=0.0)
    #: fairness ids: exact strings or shell patterns (``city-*``, ``dept-?``)
    fairness_ids: tuple[str, ...] = ()


class TokenFairShareParams(PluginParams):
    #: cost of a cached prompt token relative to a fresh one (KV reuse is cheap)
    cached_token_factor: float = Field(0.1, ge=0.0, le=1.0)
    #: cost of a prompt token relative to an output token (prefill is batched, cheaper)
    prompt_token_factor: float = Field(1.0, ge=0.0)
    #: cost of an output token
    completion_token_factor: float = Field(1.0, ge=0.0)
    #: output estimate at dispatch when the request sets no max_tokens
    default_max_tokens: int = Field(256, ge=0)
    #: weight of fairness ids that match no tier
    default_weight: float = Field(1.0, gt=0.0)
    tiers: tuple[TierSpec, ...] = ()


class _TokenFairState(FairnessState):
    __slots__ = ("_counters", "_last", "_weight")

    def __init__(self, weight: TokenFairSharePolicy) -> None:
        self._weight = weight
        self._counters: dict[str, float] = {}
        self._last = 0.0  # counter of the last flow picked: the band's "virtual time"

    def on_backlogged(self, flow: str, backlogged: Mapping[str, FlowQueue]) -> None:
        counters = self._counters
        floor = math.inf
        for other in backlogged:
            if other != flow:
                c = counters.get(other, 0.0)
                if c < floor:
                    floor = c
        if floor == math.inf:
            floor = self._last
        own = counters.get(flow)
        if own is None or own < floor:
            counters[flow] = floor
        if len(counters) > 100_000:  # bounded memory against fairness-id churn
            keep = {f: counters[f] for f in backlogged if f in counters}
            counters.clear()
            counters.update(keep)

    def pick(self, backlogged: Mapping[str, FlowQueue]) -> str | None:
        counters = self._counters
        best: str | None = None
        best_c = math.inf
        best_seq = math.inf
        for flow, q in backlogged.items():
            c = counters.get(flow, 0.0)
            if c < best_c or (c == best_c and _head_seq(q) < best_seq):
                best, best_c, best_seq = flow, c, _head_seq(q)
        return best

    def dispatched(self, flow: str) -> None:
        self._last = self._counters.get(flow, self._last)

    def charge(self, flow: str, tokens: float) -> None:
        self._counters[flow] = self._counters.get(flow, self._last) + tokens / self._weight.weight(flow)

    def counter(self, flow: str) -> float:
        return self._counters.get(flow, 0.0)


def _head_seq(q: FlowQueue) -> float:
    head = q.peek()
    return head.seq if head is not None else math.inf


class TokenFairSharePolicy(FairnessPolicy):
    """Weighted max-min fair share of *tokens* between tenants (see the module docstring)."""

    type_name = "token-fair-share-policy"
    Params = TokenFairShareParams
    uses_tokens = True

    def __init__(self, name: str, params: TokenFairShareParams | None = None) -> None:
        super().__init__(name)
        p = params or TokenFairShareParams()
        self.params = p
        self._exact: dict[str, float] = {}
        self._patterns: list[tuple[str, float]] = []
        for tier in p.tiers:
            for fid in tier.fairness_ids:
                if any(ch in fid for ch in "*?["):
                    self._patterns.append((fid, tier.weight))
                else:
                    self._exact.setdefault(fid, tier.weight)
        self._cache: dict[str, float] = {}

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, TokenFairShareParams)
        return cls(name, params)

    def weight(self, flow: str) -> float:
        """The tier weight of a fairness id: exact match first, then patterns in order."""
        w = self._cache.get(flow)
        if w is None:
            w = self._exact.get(flow)
            if w is None:
                w = self.params.default_weight
                for pattern, pw in self._patterns:
                    if fnmatch.fnmatchcase(flow, pattern):
                        w = pw
                        break
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[flow] = w
        return w

    def cost(self, prompt_tokens: float, cached_tokens: float, completion_tokens: float) -> float:
        p = self.params
        cached = min(max(cached_tokens, 0.0), prompt_tokens)
        return (
            (prompt_tokens - cached) * p.prompt_token_factor
            + cached * p.prompt_token_factor * p.cached_token_factor
            + completion_tokens * p.completion_token_factor
        )

    def estimate(self, prompt_tokens: int, max_tokens: int | None) -> float:
        out = self.params.default_max_tokens if max_tokens is None else max_tokens
        return self.cost(float(prompt_tokens), 0.0, float(out))

    def new_state(self) -> FairnessState:
        return _TokenFairState(self)


DEFAULT_FAIRNESS_POLICY = GlobalStrictFairnessPolicy.type_name
DEFAULT_ORDERING_POLICY = FcfsOrderingPolicy.type_name
