"""Flow control's Prometheus series (GIE's names; see docs/flow-control.md).

Label lookups (``.labels(...)``) cost a dict lookup and a lock each; a request touches its
series several times (queue size and bytes up and down, one outcome), so the children of one
(fairness id, priority, model, target) are resolved once and cached in a ``Series``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epp.datalayer.datastore import Datastore
from epp.framework.scheduling import LLMRequest
from epp.metrics import EppMetrics

#: cached label sets before the cache is dropped (bounded memory against fairness-id churn)
MAX_SERIES = 10_000


@dataclass(slots=True, eq=False)
class Series:
    """Metric children of one (fairness id, priority, pool, model, target)."""

    metrics: EppMetrics
    labels: tuple[str, str, str, str, str]
    queue_size: Any
    queue_bytes: Any
    outcomes: dict[str, Any] = field(default_factory=dict)
    #: requests of this series in the queue now
    queued: int = 0

    def enqueued(self, size: int) -> None:
        self.queued += 1
        self.queue_size.inc()
        self.queue_bytes.inc(size)

    def dequeued(self, size: int) -> None:
        self.queued -= 1
        self.queue_size.dec()
        self.queue_bytes.dec(size)

    def outcome(self, outcome: str, waited: float) -> None:
        """One request left flow control with ``outcome`` after ``waited`` seconds."""
        child = self.outcomes.get(outcome)
        if child is None:
            child = self.outcomes[outcome] = self.metrics.fc_queue_duration.labels(*self.labels, outcome)
        child.observe(max(0.0, waited))


@dataclass(slots=True)
class FlowMetrics:
    """The flow controller's view of ``EppMetrics`` (absent metrics: every call is a no-op)."""

    metrics: EppMetrics | None
    datastore: Datastore
    _series: dict[tuple[str, int, str, str], Series] = field(default_factory=dict)
    _saturation: Any = None

    def series(self, request: LLMRequest) -> Series | None:
        m = self.metrics
        if m is None:
            return None
        model = request.model_label or request.incoming_model
        target = request.target_label or request.target_model
        key = (request.fairness_id, request.priority, model, target)
        s = self._series.get(key)
        if s is None:
            if len(self._series) > MAX_SERIES:
                self._forget()
            labels = (request.fairness_id, str(request.priority), self.datastore.pool.name, model, target)
            s = self._series[key] = Series(m, labels, m.fc_queue_size.labels(*labels),
                                           m.fc_queue_bytes.labels(*labels))
        return s

    def _forget(self) -> None:
        """Drop the cached series *and* their exported children, whose queues are empty (a
        live request keeps its own ``Series`` object, which still updates a child that
        re-appears when next touched): ``/metrics`` stays bounded under label churn."""
        m = self.metrics
        assert m is not None
        for s in self._series.values():
            if s.queued:
                continue
            for metric in (m.fc_queue_size, m.fc_queue_bytes):
                try:
                    metric.remove(*s.labels)
                except KeyError:
                    pass
            for outcome in s.outcomes:
                try:
                    m.fc_queue_duration.remove(*s.labels, outcome)
                except KeyError:
                    pass
        self._series.clear()

    def saturation(self, value: float) -> None:
        if self.metrics is not None:
            if self._saturation is None:
                self._saturation = self.metrics.fc_pool_saturation.labels(self.datastore.pool.name)
            self._saturation.set(value)

    def dispatch_cycle(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.fc_dispatch_cycle.observe(seconds)

    def tokens(self, flow: str, priority: int, prompt: float, cached: float, completion: float) -> None:
        """Tokens served to a flow, from the response's ``usage`` (cached ones apart)."""
        m = self.metrics
        if m is None:
            return
        labels = (flow, str(priority), self.datastore.pool.name)
        cached = min(cached, prompt)
        if prompt - cached > 0:
            m.fc_tokens_served.labels(*labels, "prompt").inc(prompt - cached)
        if cached > 0:
            m.fc_tokens_served.labels(*labels, "cached").inc(cached)
        if completion > 0:
            m.fc_tokens_served.labels(*labels, "completion").inc(completion)
