"""P/D deciders (llm-d): given the chosen decode endpoint, should this request get a separate
prefill leg on a prefill pod?

``prefix-based-pd-decider`` disaggregates only when the prompt is long *and* most of it is
not already cached on the decode pod (a prefill it would mostly skip is not worth the KV
transfer). ``always-disagg-pd-decider`` says yes to everything (tests, benchmarks).

Deciders are referenced by name from ``disagg-profile-handler`` (``deciders.prefill``); the
handler resolves the name when the config is loaded (``Plugin.bind``).

How "not cached" is estimated (approximation, documented in docs/pd.md): the prompt length
is ``LLMRequest.estimated_prompt_tokens`` (bytes of the hashed prompt text / 4); the cached
part is the approximate prefix index's consecutive block match for the decode endpoint ×
the block size in tokens (the index cuts text into ``block_tokens × 4``-byte blocks, so both
sides use the same 4-bytes-per-token unit). It is the picker's own routing history, not the
engine's real cache; a precise (KV-event) index can later supply exact token counts through
the same ``request.state`` entry.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Self

from pydantic import BaseModel, Field

from epp.framework.datalayer import Endpoint
from epp.framework.plugin import Plugin, PluginContext, PluginParams
from epp.framework.scheduling import LLMRequest
from epp.plugins.scheduling.prefix_cache import PrefixIndexParams, shared_index
from epp.plugins.scheduling.prefix_index import CHARS_PER_TOKEN, PrefixIndex, PrefixMatch

# Decision reasons (metric label values).
REASON_ALWAYS = "always"
REASON_UNCACHED = "uncached-prompt"
REASON_DISABLED = "threshold-disabled"
REASON_SHORT = "short-prompt"
REASON_CACHED = "cached-on-decode"


@dataclass(slots=True, frozen=True)
class PDDecision:
    disaggregate: bool
    reason: str
    prompt_tokens: int = 0
    cached_tokens: int = 0


class PDDecider(Plugin):
    """Base of every P/D decider (not a plugin type by itself)."""

    @abstractmethod
    def decide(self, request: LLMRequest, decode: Endpoint) -> PDDecision: ...


class AlwaysDisaggPDDecider(PDDecider):
    """Disaggregate every request (for tests and benchmarks)."""

    type_name = "always-disagg-pd-decider"

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        return cls(name)

    def decide(self, request: LLMRequest, decode: Endpoint) -> PDDecision:
        return PDDecision(True, REASON_ALWAYS, request.estimated_prompt_tokens)


class PrefixBasedParams(PluginParams):
    #: disaggregate only when at least this many prompt tokens are not cached on the decode
    #: endpoint; 0 (the default) never disaggregates
    non_cached_tokens: int = Field(0, ge=0)
    #: and only when the prompt has at least this many tokens
    prompt_tokens: int = Field(0, ge=0)


class PrefixBasedPDDecider(PDDecider):
    """Disaggregate iff ``prompt ≥ promptTokens`` and ``prompt − cached_on_decode ≥ nonCachedTokens``
    (and ``nonCachedTokens > 0``)."""

    type_name = "prefix-based-pd-decider"
    Params = PrefixBasedParams

    def __init__(self, name: str, index: PrefixIndex | None = None, non_cached_tokens: int = 0,
                 prompt_tokens: int = 0) -> None:
        super().__init__(name)
        self.index = index if index is not None else PrefixIndex()
        self.non_cached_tokens = non_cached_tokens
        self.prompt_tokens = prompt_tokens

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, PrefixBasedParams)
        # The one shared approximate index (created with defaults if the prefix plugins come
        # later in the config; they re-configure it then).
        index = shared_index(ctx, PrefixIndexParams(), name)
        return cls(name, index, params.non_cached_tokens, params.prompt_tokens)

    def _match(self, request: LLMRequest, decode: Endpoint) -> PrefixMatch:
        index = self.index
        st = request.state.get(index.state_key)
        if st is None:  # the decode profile has no prefix scorer: compute (and share) it here
            st = index.prepare(request.prefix_text, request.target_model, request.cache_salt, (decode,))
            request.state.set(index.state_key, st)
        return st

    def decide(self, request: LLMRequest, decode: Endpoint) -> PDDecision:
        threshold = self.non_cached_tokens
        prompt = request.estimated_prompt_tokens
        if threshold <= 0:
            return PDDecision(False, REASON_DISABLED, prompt)
        if prompt < self.prompt_tokens or prompt < threshold:
            return PDDecision(False, REASON_SHORT, prompt)
        st = self._match(request, decode)
        blocks = st.matches.get(decode.key, 0)
        cached = min(prompt, blocks * (st.block_chars // CHARS_PER_TOKEN))
        if prompt - cached < threshold:
            return PDDecision(False, REASON_CACHED, prompt, cached)
        return PDDecision(True, REASON_UNCACHED, prompt, cached)
