"""``utilization-detector`` (GIE default): saturation from scraped queue depth and KV usage.

It is a SaturationDetector (admission and the flow-control dispatch gate ask it whether the
pool can take more) and a Filter (drop endpoints that are already over the limits).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Self

from pydantic import BaseModel, Field

from epp.framework.datalayer import Endpoint
from epp.framework.flowcontrol import SaturationDetector
from epp.framework.plugin import Duration, PluginContext, PluginParams
from epp.framework.scheduling import Filter, LLMRequest


class UtilizationParams(PluginParams):
    queue_depth_threshold: int = Field(5, gt=0)
    kv_cache_util_threshold: float = Field(0.8, gt=0.0, le=1.0)
    metrics_staleness_threshold: Duration = Field(0.2, gt=0.0)
    headroom: float = Field(0.0, ge=0.0)


class UtilizationDetector(SaturationDetector, Filter):
    """Per endpoint: max(queue / Q, kv / K), or 1.0 when its metrics are stale or missing.
    Pool saturation is the unweighted mean over the candidates (≥ 1.0 = saturated).

    Stale counts as saturated because a pod that stopped answering its metrics endpoint is
    more likely overloaded or dying than idle; admitting sheddable work on a guess is what
    this detector exists to prevent.
    """

    type_name = "utilization-detector"

    def __init__(
        self,
        name: str,
        queue_depth_threshold: int = 5,
        kv_cache_util_threshold: float = 0.8,
        metrics_staleness_threshold: float = 0.2,
        headroom: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name)
        self.queue_threshold = queue_depth_threshold
        self.kv_threshold = kv_cache_util_threshold
        self.staleness = metrics_staleness_threshold
        self.headroom = headroom
        self.clock = clock

    Params = UtilizationParams

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, UtilizationParams)
        return cls(
            name,
            params.queue_depth_threshold,
            params.kv_cache_util_threshold,
            params.metrics_staleness_threshold,
            params.headroom,
        )

    def endpoint_saturation(self, ep: Endpoint, now: float) -> float:
        m = ep.metrics
        if m.updated_at <= 0 or now - m.updated_at > self.staleness:
            return 1.0
        return max(m.waiting_queue_size / self.queue_threshold, m.kv_cache_usage / self.kv_threshold)

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0  # nothing can serve: as saturated as it gets
        now = self.clock()
        return sum(self.endpoint_saturation(ep, now) for ep in endpoints) / len(endpoints)

    def filter(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        """Drop stale endpoints and those over Q·(1+h) queued or min(1, K·(1+h)) KV usage.

        Fail-open: if that would drop every endpoint the original list is kept, so the filter
        only steers; refusing work is admission's job (via ``saturation``).
        """
        now = self.clock()
        q_limit = self.queue_threshold * (1.0 + self.headroom)
        kv_limit = min(1.0, self.kv_threshold * (1.0 + self.headroom))
        staleness = self.staleness
        kept = []
        for ep in endpoints:
            m = ep.metrics
            if m.updated_at <= 0 or now - m.updated_at > staleness:
                continue
            if m.waiting_queue_size > q_limit or m.kv_cache_usage > kv_limit:
                continue
            kept.append(ep)
        return kept if kept else list(endpoints)
