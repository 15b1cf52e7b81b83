"""``kv-cache-utilization-scorer``: prefer endpoints with free KV-cache (GIE, Distribution)."""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import LLMRequest, Scorer


class KVCacheUtilizationScorer(Scorer):
    """1 - KV-cache usage (a fraction in [0, 1]; out-of-range values are clamped)."""

    type_name = "kv-cache-utilization-scorer"
    category = "Distribution"

    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        out = []
        for ep in endpoints:
            s = 1.0 - ep.metrics.kv_cache_usage
            out.append(0.0 if s < 0.0 else (1.0 if s > 1.0 else s))
        return out
