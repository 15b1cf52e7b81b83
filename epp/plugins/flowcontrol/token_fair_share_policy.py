"""``token-fair-share-policy`` (ours): weighted max-min fair share of *tokens* between tenants.

A weighted virtual token counter per tenant (VTC, Sheng et al., OSDI'24): the backlogged
tenant that was served the fewest weighted tokens goes next. Tokens are estimated at dispatch
(prompt estimate + ``max_tokens``) and corrected with the response's real ``usage``. Cached
prompt tokens cost ``cachedTokenFactor`` of a fresh one. A tenant that becomes backlogged
again is lifted to the smallest counter among the backlogged ones, so idling neither banks
credit nor is punished; its unused share went to whoever was busy (work-conserving: policies
only *order* dispatches, they never hold capacity back).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from typing import Self

from pydantic import BaseModel, Field

from epp.framework.flowcontrol import FairnessPolicy, FairnessState, FlowQueue
from epp.framework.plugin import PluginContext, PluginParams


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
