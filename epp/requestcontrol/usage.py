"""Per-tenant usage counters: the series ``epp usage`` and the dashboard read.

A flat-rate service publishes who used what. The director records every request it routed
(``served``, with the response's token usage and the time it waited in admission) or
rejected for capacity (429 / 503), per tenant and tier (``epp.requestcontrol.tenants``).

Cardinality is bounded: the first ``max_tenants`` tenants (and ``max_tiers`` tiers) a picker
sees keep their own label values; later ones are counted as ``other``. Counters are never
dropped once exported (dropping one loses the increments since the last scrape), so the
first-come rule keeps the report exact for the tenants it names. A restarted picker learns
anew; ``epp usage`` sums whatever label values the replicas reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from epp.metrics import EppMetrics
from epp.usage.series import OTHER_TENANT

#: distinct tier label values before further tiers fold into "other" (tiers are few; a claim
#: could still carry anything)
MAX_TIERS = 32


@dataclass(slots=True, eq=False)
class _Children:
    """The counter children of one (pool, tenant, tier), resolved once."""

    served: Any
    rejected: Any
    prompt: Any
    cached: Any
    completion: Any
    queue: Any


@dataclass(slots=True)
class UsageRecorder:
    metrics: EppMetrics
    #: the pool's name (the ``inference_pool`` label); read per record, as discovery may set it late
    pool: Callable[[], str]
    max_tenants: int = 100
    max_tiers: int = MAX_TIERS
    _tenants: set[str] = field(default_factory=set)
    _tiers: set[str] = field(default_factory=set)
    _children: dict[tuple[str, str, str], _Children] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tenants < 0:
            raise ValueError(f"--usage-max-tenants must be >= 0, got {self.max_tenants}")

    def _fold(self, tenant: str, tier: str) -> tuple[str, str]:
        tenants = self._tenants
        if tenant not in tenants:
            if len(tenants) < self.max_tenants:
                tenants.add(tenant)
            else:
                tenant = OTHER_TENANT
        tiers = self._tiers
        if tier not in tiers:
            if len(tiers) < self.max_tiers:
                tiers.add(tier)
            else:
                tier = OTHER_TENANT
        return tenant, tier

    def _get(self, tenant: str, tier: str) -> _Children:
        tenant, tier = self._fold(tenant, tier)
        pool = self.pool()
        key = (pool, tenant, tier)
        c = self._children.get(key)
        if c is None:
            m = self.metrics
            tokens = m.tenant_tokens
            c = self._children[key] = _Children(
                served=m.tenant_requests.labels(pool, tenant, tier, "served"),
                rejected=m.tenant_requests.labels(pool, tenant, tier, "rejected"),
                prompt=tokens.labels(pool, tenant, tier, "prompt"),
                cached=tokens.labels(pool, tenant, tier, "cached"),
                completion=tokens.labels(pool, tenant, tier, "completion"),
                queue=m.tenant_queue_seconds.labels(pool, tenant, tier),
            )
        return c

    def served(self, tenant: str, tier: str, prompt: int | None, cached: int | None, completion: int | None,
               queue_seconds: float) -> None:
        """A routed request ended; tokens from its response ``usage`` (None: not reported)."""
        c = self._get(tenant, tier)
        c.served.inc()
        p = prompt or 0
        hit = min(max(cached or 0, 0), p)
        if p - hit > 0:
            c.prompt.inc(p - hit)
        if hit > 0:
            c.cached.inc(hit)
        if completion:
            c.completion.inc(completion)
        if queue_seconds > 0:
            c.queue.inc(queue_seconds)

    def rejected(self, tenant: str, tier: str) -> None:
        """The picker refused the request for capacity (429 shed, 503 nothing to serve it).
        Its wait is not added to the queue seconds: those are per served request, so the
        report's mean queueing time (queue seconds / served) is the wait of what was served."""
        self._get(tenant, tier).rejected.inc()

    @property
    def series(self) -> int:
        """(pool, tenant, tier) combinations exported (for tests of the bound)."""
        return len(self._children)
