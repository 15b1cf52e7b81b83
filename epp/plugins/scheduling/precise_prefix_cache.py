"""``precise-prefix-cache-scorer``: prefix-cache affinity from the engines' own KV events.

Unlike ``prefix-cache-scorer`` (which guesses each pod's cache from the picker's own routing),
this scorer reads what every vLLM pod reports it stores and evicts (``BlockStored`` /
``BlockRemoved`` / ``AllBlocksCleared`` over ZMQ), so its view survives evictions and
restarts, and every picker replica subscribed to the same pods holds the same view.

Per request (hot path, no I/O): tokenize the prompt exactly as the engine will (prefix-cached),
compute the chained block keys, and look them up. Score = weighted length of the longest
consecutive prefix the endpoint holds / the request's full blocks (GPU blocks weigh 1.0, CPU
0.8). As a PreRequest plugin it inserts the request's keys for the chosen endpoint as
*speculative* entries (``speculativeTTL``, default 2 s) so a burst of same-prefix requests
sticks before the engine's events arrive.

Subscriptions run in background tasks started by the runner (``start``) and stopped at
shutdown (``close``). Configuration and limits: docs/precise-prefix.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

from pydantic import BaseModel, Field

from epp.datalayer.kvevents.index import DEFAULT_MEDIUM_WEIGHTS, KVBlockIndex, block_keys
from epp.datalayer.kvevents.manager import KVEventsConfig, KVEventsManager
from epp.framework.datalayer import Endpoint
from epp.framework.plugin import Duration, PluginContext, PluginParams, StateKey
from epp.framework.requestcontrol import PreRequest
from epp.framework.scheduling import LLMRequest, SchedulingResult, Scorer
from epp.tokenization import RequestTokenizer

PREFILL_PROFILE = "prefill"
DEFAULT_BLOCK_SIZE = 16


class PrecisePrefixParams(PluginParams):
    #: tokens per KV block; default: what the engine's events say, then vllm:cache_config_info, then 16
    block_size_tokens: int | None = Field(None, gt=0)
    max_prefix_blocks_to_match: int = Field(1024, gt=0)
    #: the pods' KV-event PUB port (vLLM default tcp://*:5557) ...
    kv_events_port: int = Field(5557, gt=0, lt=65536)
    #: ... or serving port + this offset (local pools sharing one IP); label epp.kv-events-port wins
    kv_events_port_offset_from_serving_port: int | None = None
    #: the pods' replay ROUTER port (vLLM "replay_endpoint"); default: no replay (resync on gaps)
    kv_events_replay_port: int | None = Field(None, gt=0, lt=65536)
    kv_events_replay_port_offset_from_serving_port: int | None = None
    #: ZMQ topic prefix to subscribe to ("" = every topic; vLLM's default topic is "")
    topic_filter: str = ""
    replay_timeout: Duration = 2.0
    #: distinct block keys kept (LRU); ~150 bytes per (block, pod) entry
    index_max_blocks: int = Field(1_000_000, gt=0)
    medium_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MEDIUM_WEIGHTS))
    speculative_indexing: bool = True
    speculative_ttl: Duration = Field(2.0, alias="speculativeTTL")
    #: "builtin" (the simulator's tokenizer) or a local Hugging Face tokenizer directory
    tokenizer: str = "builtin"
    #: per target model: "builtin" or a tokenizer directory (others use ``tokenizer``)
    tokenizers: dict[str, str] = Field(default_factory=dict)
    tokenization_cache_segments: int = Field(8192, gt=0)


@dataclass(slots=True)
class _Match:
    """Per-request state shared by several profiles and the PreRequest hook."""

    tokens: list[int] | None
    #: block size → the request's keys at that size
    keys: dict[int, list[int]] = field(default_factory=dict)
    #: block size → endpoint key → weighted consecutive matched blocks
    matches: dict[int, dict[str, float]] = field(default_factory=dict)
    learned: bool = False


class PrecisePrefixCacheScorer(Scorer, PreRequest):
    type_name = "precise-prefix-cache-scorer"
    category = "Affinity"
    Params = PrecisePrefixParams

    def __init__(self, name: str, index: KVBlockIndex, tokenizer: RequestTokenizer,
                 manager: KVEventsManager | None = None, params: PrecisePrefixParams | None = None) -> None:
        super().__init__(name)
        self.index = index
        self.tokenizer = tokenizer
        self.manager = manager
        self.params = params or PrecisePrefixParams()
        self._state_key: StateKey[_Match] = StateKey("precise-prefix-match")
        self._metrics = manager.metrics if manager is not None else None

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, PrecisePrefixParams)
        index = KVBlockIndex(max_keys=params.index_max_blocks, medium_weights=dict(params.medium_weights),
                             metrics=ctx.metrics)
        tokenizer = RequestTokenizer.build(params.tokenizer, params.tokenizers,
                                           max_segments=params.tokenization_cache_segments)
        manager = KVEventsManager(
            ctx.datastore, index,
            KVEventsConfig(
                port=params.kv_events_port,
                port_offset=params.kv_events_port_offset_from_serving_port,
                replay_port=params.kv_events_replay_port,
                replay_port_offset=params.kv_events_replay_port_offset_from_serving_port,
                topic_filter=params.topic_filter,
                replay_timeout=params.replay_timeout,
            ),
            ctx.metrics,
        )
        return cls(name, index, tokenizer, manager, params)

    # ---- lifecycle (called by the runner) ----
    async def start(self) -> None:
        if self.manager is not None:
            await self.manager.start()

    async def close(self) -> None:
        if self.manager is not None:
            await self.manager.close()

    # ---- hot path ----
    def _block_size(self, ep: Endpoint) -> int:
        return (self.params.block_size_tokens or self.index.block_size(ep.key) or ep.metrics.cache_block_size
                or DEFAULT_BLOCK_SIZE)

    def _state(self, request: LLMRequest) -> _Match:
        st = request.state.get(self._state_key)
        if st is None:
            st = _Match(self.tokenizer.tokenize(request.api, request.body, request.target_model))
            request.state.set(self._state_key, st)
        return st

    def _keys(self, request: LLMRequest, st: _Match, block_size: int) -> list[int]:
        keys = st.keys.get(block_size)
        if keys is None:
            tokens = st.tokens
            if not tokens:
                keys = []
            else:
                ns = self.index.namespace_for(request.target_model)
                extras = (request.cache_salt,) if request.cache_salt else ()
                keys = block_keys(tokens, block_size, ns, self.params.max_prefix_blocks_to_match, extras=extras)
            st.keys[block_size] = keys
            st.matches[block_size] = self.index.match(keys) if keys else {}
        return keys

    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        st = self._state(request)
        if not st.tokens:
            return [0.0] * len(endpoints)
        out: list[float] = []
        for ep in endpoints:
            bs = self._block_size(ep)
            keys = self._keys(request, st, bs)
            total = len(keys)
            out.append(st.matches[bs].get(ep.key, 0.0) / total if total else 0.0)
        return out

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        primary = result.profile_results.get(result.primary_profile_name)
        if primary is None or not primary.target_endpoints:
            return
        st = self._state(request)
        if st.learned or not st.tokens:
            return
        st.learned = True
        target = primary.target_endpoints[0]
        bs = self._block_size(target)
        keys = self._keys(request, st, bs)
        if not keys:
            return
        if self._metrics is not None:
            self._metrics.precise_hit_ratio.observe(min(1.0, st.matches[bs].get(target.key, 0.0) / len(keys)))
        if not self.params.speculative_indexing:
            return
        ttl = self.params.speculative_ttl
        self.index.add_speculative(target.key, keys, ttl)
        prefill = result.profile_results.get(PREFILL_PROFILE)
        if prefill is not None and prefill.target_endpoints:
            pf = prefill.target_endpoints[0]
            if pf is not target:
                self.index.add_speculative(pf.key, self._keys(request, st, self._block_size(pf)), ttl)
        if self._metrics is not None:
            self._metrics.precise_speculative_entries.set(self.index.speculative_count)
