"""``token-load-scorer``: prefer endpoints with fewer in-flight tokens (GIE / llm-d)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from pydantic import BaseModel, Field

from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext, PluginParams
from epp.framework.scheduling import LLMRequest, Scorer


class TokenLoadParams(PluginParams):
    #: in-flight tokens at which an endpoint scores 0
    queue_threshold_tokens: int = Field(4_194_304, gt=0)


class TokenLoadScorer(Scorer):
    """1 - min(1, inflight_tokens / queueThresholdTokens).

    ``Endpoint.inflight_tokens`` is the picker's live estimate (prompt + expected output of
    requests it sent and that are not finished), so this reacts within one request, unlike
    the scraped gauges.
    """

    type_name = "token-load-scorer"
    category = "Distribution"
    Params = TokenLoadParams

    def __init__(self, name: str, queue_threshold_tokens: int = 4_194_304) -> None:
        super().__init__(name)
        self.threshold = queue_threshold_tokens

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, TokenLoadParams)
        return cls(name, params.queue_threshold_tokens)

    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        t = self.threshold
        return [1.0 - min(1.0, max(0, ep.inflight_tokens) / t) for ep in endpoints]
