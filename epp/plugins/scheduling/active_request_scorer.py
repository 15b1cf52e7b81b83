"""``active-request-scorer`` (llm-d): prefer endpoints with fewer picker in-flight requests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from pydantic import BaseModel, Field

from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext, PluginParams
from epp.framework.scheduling import LLMRequest, Scorer


class ActiveRequestParams(PluginParams):
    #: endpoints with at most this many in-flight requests count as idle and score 1.0
    idle_threshold: int = Field(0, ge=0)
    #: the best score a busy endpoint can get (so idle endpoints stay strictly preferred)
    max_busy_score: float = Field(1.0, ge=0.0, le=1.0)


class ActiveRequestScorer(Scorer):
    """Idle (in-flight ≤ idleThreshold) → 1.0; busy → maxBusyScore x (max - n) / max.

    ``n`` is ``Endpoint.inflight``, counted synchronously at pick time, so this is the only
    load signal with no scrape lag: it spreads a burst even before any metric moves. The
    busiest candidate scores 0.
    """

    type_name = "active-request-scorer"
    category = "Distribution"
    Params = ActiveRequestParams

    def __init__(self, name: str, idle_threshold: int = 0, max_busy_score: float = 1.0) -> None:
        super().__init__(name)
        self.idle_threshold = idle_threshold
        self.max_busy_score = max_busy_score

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, ActiveRequestParams)
        return cls(name, params.idle_threshold, params.max_busy_score)

    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        counts = [ep.inflight for ep in endpoints]
        hi = max(counts, default=0)
        idle = self.idle_threshold
        busy = self.max_busy_score
        return [1.0 if n <= idle else busy * (hi - n) / hi for n in counts]
