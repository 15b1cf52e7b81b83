"""``prefix-cache-scorer`` and ``approx-prefix-cache-producer`` (GIE §4.4).

The producer only holds the index parameters; the scorer scores from the index and, as a
PreRequest plugin, teaches it where each request went. Both find the one index through
``PluginContext.state`` so either may carry the parameters (GIE moved them from the scorer
to the producer; old configs still put them on the scorer).

Learning is synchronous at pick time, before the request is forwarded: the next request
with the same prefix, even one arriving a microsecond later in a burst, already sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from operator import attrgetter
from typing import Self

from pydantic import BaseModel, Field, model_validator
from xxhash import xxh64_intdigest

from epp.framework.datalayer import Endpoint
from epp.framework.plugin import Plugin, PluginContext, PluginParams, StateKey
from epp.framework.requestcontrol import PreRequest
from epp.framework.scheduling import LLMRequest, SchedulingResult, Scorer
from epp.plugins.scheduling.prefix_index import PrefixIndex, PrefixIndexConfig, PrefixMatch
from epp.plugins.scheduling.prefix_sharing import PrefixPeers, worker_count
from epp.plugins.scheduling.scoring import scaled

SHARED_KEY: StateKey[_SharedIndex] = StateKey("approx-prefix-cache-index")
#: profile whose first endpoint also learns the prefix (P/D: the prefill pod holds it too)
PREFILL_PROFILE = "prefill"
_KEY = attrgetter("key")
#: coldPrefixAffinity when not configured and the picker runs several workers
DEFAULT_COLD_AFFINITY = 0.5
#: the block whose hash places a cold prefix: requests sharing this many blocks (~128
#: tokens) of prefix go to the same endpoint; shorter prompts use their last block
ANCHOR_BLOCKS = 8
_MIX = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1


@lru_cache(maxsize=65_536)
def _key_hash(key: str) -> int:
    """An endpoint's rendezvous identity (its key hashed once, not per request)."""
    return xxh64_intdigest(key.encode())


class PrefixIndexParams(PluginParams):
    """Index parameters; every field optional so "not given" differs from "default"."""

    block_size_tokens: int | None = Field(None, gt=0)
    #: deprecated (characters); accepted only next to blockSizeTokens, and then ignored
    block_size: int | None = Field(None, gt=0)
    max_prefix_blocks_to_match: int | None = Field(None, gt=0)
    max_prefix_tokens_to_match: int | None = Field(None, gt=0)
    lru_capacity_per_server: int | None = Field(None, gt=0)
    auto_tune: bool | None = None
    #: score given to one endpoint, chosen by rendezvous hashing of the prefix, when no
    #: endpoint holds any of the request's blocks (scorer only). Pickers that learn only from
    #: their own picks (``epp serve --workers``, replicas) then place a new prefix alike.
    #: Default: 0.5 with several workers, else 0 (off)
    cold_prefix_affinity: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _deprecated_block_size(self) -> Self:
        if self.block_size is not None and self.block_size_tokens is None:
            raise ValueError(
                "blockSize (characters) is deprecated: set blockSizeTokens instead "
                "(1 token = 4 characters; the default 16 tokens = 64 characters)"
            )
        return self

    def is_explicit(self) -> bool:
        return bool(self.model_fields_set - {"cold_prefix_affinity"})

    def to_config(self) -> PrefixIndexConfig:
        d = PrefixIndexConfig()
        return PrefixIndexConfig(
            block_size_tokens=self.block_size_tokens or d.block_size_tokens,
            max_prefix_blocks=self.max_prefix_blocks_to_match or d.max_prefix_blocks,
            max_prefix_tokens=self.max_prefix_tokens_to_match,
            lru_capacity_per_server=self.lru_capacity_per_server or d.lru_capacity_per_server,
            auto_tune=d.auto_tune if self.auto_tune is None else self.auto_tune,
        )


@dataclass(slots=True)
class _SharedIndex:
    index: PrefixIndex
    #: set by a plugin that was given parameters (vs created with defaults)
    owner: str | None
    #: the other workers of ``epp serve --workers`` (None: a single process)
    peers: PrefixPeers | None = None


def shared_index(ctx: PluginContext, params: PrefixIndexParams, plugin_name: str) -> PrefixIndex:
    """The context's one prefix index, created on first use.

    Parameters may come from the producer or the scorer, in any plugin order; a plugin with
    parameters re-configures an index that so far only had defaults (it is still empty at
    construction time). Two plugins both giving parameters must agree.
    """
    entry = ctx.state.get(SHARED_KEY)
    config = params.to_config()
    if entry is None:
        index = PrefixIndex(config, ctx.metrics)
        ctx.datastore.add_listener(index.on_endpoints_changed)
        ctx.state.set(SHARED_KEY, _SharedIndex(index, plugin_name if params.is_explicit() else None,
                                               PrefixPeers.from_env(index, ctx.datastore, worker_count())))
        return index
    if params.is_explicit():
        if entry.owner is None:
            entry.index.config = config
            entry.owner = plugin_name
        elif entry.index.config != config:
            raise ValueError(
                f"prefix index parameters conflict with those of plugin {entry.owner!r}: "
                "set them on one plugin only (approx-prefix-cache-producer)"
            )
    return entry.index


class ApproxPrefixCacheProducer(Plugin):
    """Holds the approximate prefix index's parameters (GIE's data producer type)."""

    type_name = "approx-prefix-cache-producer"
    Params = PrefixIndexParams

    def __init__(self, name: str, index: PrefixIndex) -> None:
        super().__init__(name)
        self.index = index

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, PrefixIndexParams)
        return cls(name, shared_index(ctx, params, name))


class PrefixCacheScorer(Scorer, PreRequest):
    """Score = consecutive prefix blocks the endpoint holds / the request's blocks.

    Also a PreRequest plugin: after the pick it records the request's blocks for the primary
    target (and the first endpoint of a ``prefill`` profile), and reports hit ratio / hit
    bytes for the primary target to ``EppMetrics``.
    """

    type_name = "prefix-cache-scorer"
    category = "Affinity"
    Params = PrefixIndexParams
    #: scores are in [0, 1] and never NaN (the scheduler need not clamp them)
    bounded = True

    def __init__(self, name: str, index: PrefixIndex | None = None, cold_affinity: float = 0.0,
                 peers: PrefixPeers | None = None) -> None:
        super().__init__(name)
        self.index = index if index is not None else PrefixIndex()
        self.cold_affinity = cold_affinity
        self.peers = peers

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, PrefixIndexParams)
        cold = params.cold_prefix_affinity
        if cold is None:
            cold = DEFAULT_COLD_AFFINITY if worker_count() > 1 else 0.0
        index = shared_index(ctx, params, name)
        entry = ctx.state.get(SHARED_KEY)
        return cls(name, index, cold, entry.peers if entry is not None else None)

    # Lifecycle: the peers' socket (several workers only)
    async def start(self) -> None:
        if self.peers is not None:
            await self.peers.start()

    async def close(self) -> None:
        if self.peers is not None:
            await self.peers.close()

    def _rendezvous(self, anchor: int, endpoints: Sequence[Endpoint]) -> int:
        """Index of the endpoint rendezvous hashing gives ``anchor`` (highest mixed weight):
        the same for every picker process, whatever order the endpoints come in."""
        best, best_w = 0, -1
        for i, ep in enumerate(endpoints):
            w = ((_key_hash(ep.key) ^ anchor) * _MIX) & _U64
            w ^= w >> 29
            if w > best_w:
                best, best_w = i, w
        return best

    def _state(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> PrefixMatch:
        index = self.index
        st = request.state.get(index.state_key)
        if st is None:
            st = index.prepare(request.prefix_text, request.target_model, request.cache_salt,
                               endpoints)
            request.state.set(index.state_key, st)
        return st

    def score(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        st = self._state(request, endpoints)
        total = len(st.hashes)
        matches = st.matches
        if not total or not matches:
            scores = [0.0] * len(endpoints)
            if total and self.cold_affinity and endpoints:
                anchor = st.hashes[min(total, ANCHOR_BLOCKS) - 1]
                scores[self._rendezvous(anchor, endpoints)] = self.cold_affinity
            return scores
        n = len(endpoints)
        return scaled(map(matches.get, map(_KEY, endpoints), repeat(0, n)), total, n)

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        primary = result.profile_results.get(result.primary_profile_name)
        if primary is None or not primary.target_endpoints:
            return
        target = primary.target_endpoints[0]
        st = self._state(request, primary.target_endpoints)
        if st.learned:  # several scorers may share one index; learn once per request
            return
        st.learned = True
        hashes = st.hashes
        if not hashes:
            return
        index = self.index
        peers = self.peers
        skipped = index.add(target, hashes, held=st.matches.get(target.key, 0))
        if peers is not None and skipped < len(hashes):
            peers.publish(target, hashes[skipped:])
        prefill = result.profile_results.get(PREFILL_PROFILE)
        if prefill is not None and prefill.target_endpoints:
            pf = prefill.target_endpoints[0]
            if pf is not target:
                index.add(pf, hashes)
                if peers is not None:
                    peers.publish(pf, hashes)
        metrics = index.metrics
        if metrics is not None:
            matched = st.matches.get(target.key, 0)
            metrics.prefix_indexer_hit_ratio.observe(matched / len(hashes))
            metrics.prefix_indexer_hit_bytes.observe(
                min(matched * st.block_chars, len(request.prefix_text)))
