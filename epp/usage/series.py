"""The per-tenant usage series the picker exports, and the report's rows built from them.

The names are shared by the exporter (``epp.metrics``) and the reader (``epp usage``), so
they live here, in a module that imports nothing of the picker.
"""

from __future__ import annotations

from dataclasses import dataclass

#: requests per tenant and tier; outcome is "served" or "rejected" (429/503 by the picker)
REQUESTS = "epp_tenant_requests_total"
#: tokens per tenant and tier from the response usage; type is prompt (uncached), cached, completion
TOKENS = "epp_tenant_tokens_total"
#: seconds spent queued in flow control, summed per tenant and tier
QUEUE_SECONDS = "epp_tenant_queue_seconds_total"
#: the label value tenants beyond the configured limit fold into (bounded cardinality)
OTHER_TENANT = "other"
TOKEN_TYPES = ("prompt", "cached", "completion")


@dataclass(slots=True)
class TenantUsage:
    """One row of the report."""

    tenant: str
    tier: str
    requests: float = 0.0
    rejected: float = 0.0
    prompt_tokens: float = 0.0
    cached_tokens: float = 0.0
    completion_tokens: float = 0.0
    queue_seconds: float = 0.0

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.cached_tokens + self.completion_tokens

    @property
    def mean_queue_seconds(self) -> float:
        served = self.requests
        return self.queue_seconds / served if served > 0 else 0.0


def add_sample(rows: dict[tuple[str, str], TenantUsage], name: str, labels: dict[str, str], value: float) -> None:
    """Fold one sample of a usage series into ``rows`` (keyed by tenant, tier)."""
    tenant = labels.get("tenant", "")
    tier = labels.get("tier", "")
    row = rows.get((tenant, tier))
    if row is None:
        row = rows[(tenant, tier)] = TenantUsage(tenant, tier)
    if name == REQUESTS:
        if labels.get("outcome") == "rejected":
            row.rejected += value
        else:
            row.requests += value
    elif name == TOKENS:
        kind = labels.get("type")
        if kind == "prompt":
            row.prompt_tokens += value
        elif kind == "cached":
            row.cached_tokens += value
        elif kind == "completion":
            row.completion_tokens += value
    elif name == QUEUE_SECONDS:
        row.queue_seconds += value
