"""``concurrency-detector``: open-loop saturation from the picker's own in-flight counts.

Unlike the utilization detector this needs no fresh metrics: ``Endpoint.inflight`` and
``inflight_tokens`` are counted by request control at pick time and on response end, so it
reacts to a burst before any scrape does. Set the limits to roughly 110% of the engine's
batch size (``max_num_seqs`` / ``max_num_batched_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Self

from pydantic import BaseModel, Field

from epp.framework.datalayer import Endpoint
from epp.framework.flowcontrol import SaturationDetector
from epp.framework.plugin import PluginContext, PluginParams
from epp.framework.scheduling import Filter, LLMRequest


class ConcurrencyParams(PluginParams):
    max_concurrency: int = Field(100, gt=0)
    max_token_concurrency: int = Field(1_000_000, gt=0)
    concurrency_mode: Literal["requests", "tokens"] = "requests"
    headroom: float = Field(0.0, ge=0.0)


class ConcurrencyDetector(SaturationDetector, Filter):
    """Pool saturation = Σ in-flight / Σ capacity; as a filter, drop endpoints at or over
    capacity x (1 + headroom), failing open (keep all) when that would drop every one."""

    type_name = "concurrency-detector"
    Params = ConcurrencyParams

    def __init__(
        self,
        name: str,
        max_concurrency: int = 100,
        max_token_concurrency: int = 1_000_000,
        concurrency_mode: str = "requests",
        headroom: float = 0.0,
    ) -> None:
        super().__init__(name)
        if concurrency_mode not in ("requests", "tokens"):
            raise ValueError(f"concurrencyMode must be 'requests' or 'tokens', not {concurrency_mode!r}")
        self.tokens = concurrency_mode == "tokens"
        self.capacity = max_token_concurrency if self.tokens else max_concurrency
        self.headroom = headroom

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, ConcurrencyParams)
        return cls(
            name,
            params.max_concurrency,
            params.max_token_concurrency,
            params.concurrency_mode,
            params.headroom,
        )

    def _load(self, ep: Endpoint) -> int:
        return ep.inflight_tokens if self.tokens else ep.inflight

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        total = sum(max(0, self._load(ep)) for ep in endpoints)
        return total / (self.capacity * len(endpoints))

    def filter(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        limit = self.capacity * (1.0 + self.headroom)
        kept = [ep for ep in endpoints if self._load(ep) < limit]
        return kept if kept else list(endpoints)
