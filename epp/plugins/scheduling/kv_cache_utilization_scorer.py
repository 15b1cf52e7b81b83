"""``kv-cache-utilization-scorer``: prefer endpoints with free KV-cache (GIE, Distribution)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, sub

from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import LLMRequest, Scorer

_USAGE = attrgetter("metrics.kv_cache_usage")


class KVCacheUtilizationScorer(Scorer):
    """1 - KV-cache usage (a fraction in [0, 1]; out-of-range values are clamped, NaN is 0)."""

    type_name = "kv-cache-utilization-scorer"
    category = "Distribution"
    #: scores are in [0, 1] and never NaN (the scheduler need not clamp them)
    bounded = True

    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        usage = list(map(_USAGE, endpoints))  # one C loop; the clamp below is rarely needed
        n = len(usage)
        total = sum(usage)  # NaN anywhere makes the sum NaN (min/max may skip a NaN)
        if n and total == total and 0.0 <= min(usage) and max(usage) <= 1.0:
            return list(map(sub, repeat(1.0, n), usage))
        return [1.0 - u if 0.0 <= u <= 1.0 else (0.0 if u > 1.0 else 1.0) for u in usage]
