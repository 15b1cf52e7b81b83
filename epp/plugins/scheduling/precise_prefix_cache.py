"""``precise-prefix-cache-scorer``: prefix-cache affinity from the engines' own KV events.

Unlike ``prefix-cache-scorer`` (which guesses each pod's cache from the picker's own routing),
this scorer reads what every vLLM pod reports it stores and evicts (``BlockStored`` /
``BlockRemoved`` / ``AllBlocksCleared`` over ZMQ), so its view survives evictions and
restarts, and every picker replica subscribed to the same pods holds the same view.

Per request: ``prepare_request`` (awaited before scheduling) tokenizes the prompt exactly as
the engine will — renders and prefixes cached, large encodes on a worker pool, or the model
server's ``/tokenize`` — so the synchronous ``score`` only computes the chained block keys and
looks them up. Score = weighted length of the longest consecutive prefix the endpoint holds /
the request's full blocks (GPU blocks weigh 1.0, CPU 0.8). As a PreRequest plugin it inserts
the request's keys for the chosen endpoint as *speculative* entries (``speculativeTTL``) so a
burst of same-prefix requests sticks before the engine's events arrive, hands the request to
the index's orphan recovery, and checks a few seconds later that the engine reported the
request's first block under the picker's key (``epp_precise_prefix_tokenizer_checks_total``:
a tokenizer that is not the engine's shows as ``mismatch``).

The tokenizer is never guessed: ``tokenizer`` (or ``tokenizers``) must name the model's
tokenizer directory, ``model-server``, or ``builtin`` — the simulator's, for simulated pools
only. Configuration and limits: docs/precise-prefix.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import monotonic
from typing import Self

from pydantic import BaseModel, Field

from epp.datalayer.kvevents.index import DEFAULT_MEDIUM_WEIGHTS, KVBlockIndex, block_keys
from epp.datalayer.kvevents.manager import KVEventsConfig, KVEventsManager
from epp.framework.datalayer import Endpoint, PoolView, format_hostport
from epp.framework.plugin import Duration, PluginContext, PluginParams, StateKey
from epp.framework.requestcontrol import PrepareRequest, PreRequest
from epp.framework.scheduling import LLMRequest, SchedulingResult, Scorer
from epp.metrics import EppMetrics
from epp.tokenization import SERVER_SPEC, RequestTokenizer, ServerTokenizer

log = logging.getLogger(__name__)

PREFILL_PROFILE = "prefill"
DEFAULT_BLOCK_SIZE = 16
BUILTIN = "builtin"
#: how long after a pick the engine must have reported the request's first block
CHECK_DELAY = 5.0
TOKENIZER_REQUIRED = (
    "tokenizer is required: the directory of the model's Hugging Face tokenizer (tokenizer.json), "
    f"'{SERVER_SPEC}' (tokenize with the model server's /tokenize), or '{BUILTIN}' (the simulator's "
    "tokenizer: simulated pools only); a wrong tokenizer silently scores 0 on every request"
)


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
    #: a replay fails when the replay socket stays silent this long (inactivity, not transfer time)
    replay_timeout: Duration = 2.0
    #: further replay attempts after a timeout / incomplete answer (backoff from 0.25 s, doubling)
    replay_retries: int = Field(3, ge=0, le=10)
    #: bound on (block, endpoint) entries (~40-90 bytes each; benchmarks/precise_index.py)
    index_max_blocks: int = Field(4_000_000, gt=0)
    medium_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MEDIUM_WEIGHTS))
    speculative_indexing: bool = True
    speculative_ttl: Duration = Field(2.0, alias="speculativeTTL")
    #: the model's tokenizer directory, "model-server", or "builtin" (simulated pools); required
    tokenizer: str | None = None
    #: per target model: a directory, "model-server" or "builtin" (others use ``tokenizer``)
    tokenizers: dict[str, str] = Field(default_factory=dict)
    tokenization_cache_segments: int = Field(8192, gt=0)
    #: worker threads for encoding uncached text, and how many encodings may wait for them
    tokenizer_workers: int = Field(2, gt=0, le=64)
    tokenizer_queue: int = Field(64, gt=0)
    #: model-server tokenization: per-call timeout
    tokenizer_timeout: Duration = 1.0
    #: the engines' PYTHONHASHSEED, if set: their block-hash root depends on it (orphan recovery)
    engine_hash_seed: str | None = None


@dataclass(slots=True)
class _Match:
    """Per-request state shared by several profiles and the PreRequest hook."""

    tokens: list[int] | None
    #: block size → the request's keys at that size
    keys: dict[int, list[int]] = field(default_factory=dict)
    #: block size → endpoint key → weighted consecutive matched blocks
    matches: dict[int, dict[str, float]] = field(default_factory=dict)
    #: block size → endpoint key → leading blocks it holds for real
    held: dict[int, dict[str, int]] = field(default_factory=dict)
    learned: bool = False


def _server_urls(datastore: PoolView) -> list[str]:
    return [f"http://{format_hostport(ep.address, ep.port)}" for ep in datastore.endpoints()]


class PrecisePrefixCacheScorer(Scorer, PrepareRequest, PreRequest):
    type_name = "precise-prefix-cache-scorer"
    category = "Affinity"
    Params = PrecisePrefixParams

    def __init__(self, name: str, index: KVBlockIndex, tokenizer: RequestTokenizer,
                 manager: KVEventsManager | None = None, params: PrecisePrefixParams | None = None,
                 metrics: EppMetrics | None = None) -> None:
        super().__init__(name)
        self.index = index
        self.tokenizer = tokenizer
        self.manager = manager
        self.params = params or PrecisePrefixParams(tokenizer=BUILTIN)
        self._state_key: StateKey[_Match] = StateKey("precise-prefix-match")
        self._metrics = metrics if metrics is not None else manager.metrics if manager is not None else None
        #: (due, endpoint key, first block key) of recent picks, for the tokenizer check
        self._checks: deque[tuple[float, str, int]] = deque(maxlen=4096)
        self.checks = {"match": 0, "mismatch": 0}
        self.check_delay = CHECK_DELAY
        self._warn_task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, PrecisePrefixParams)
        if not params.tokenizer and not params.tokenizers:
            raise ValueError(TOKENIZER_REQUIRED)
        index = KVBlockIndex(max_entries=params.index_max_blocks, medium_weights=dict(params.medium_weights),
                             metrics=ctx.metrics, engine_hash_seed=params.engine_hash_seed)
        datastore = ctx.datastore
        tokenizer = RequestTokenizer.build(
            params.tokenizer, params.tokenizers, max_segments=params.tokenization_cache_segments,
            server=lambda: ServerTokenizer(lambda: _server_urls(datastore), timeout=params.tokenizer_timeout))
        tokenizer.workers = params.tokenizer_workers
        tokenizer.max_queue = params.tokenizer_queue
        manager = KVEventsManager(
            datastore, index,
            KVEventsConfig(
                port=params.kv_events_port,
                port_offset=params.kv_events_port_offset_from_serving_port,
                replay_port=params.kv_events_replay_port,
                replay_port_offset=params.kv_events_replay_port_offset_from_serving_port,
                topic_filter=params.topic_filter,
                replay_timeout=params.replay_timeout,
                replay_retries=params.replay_retries,
            ),
            ctx.metrics,
        )
        return cls(name, index, tokenizer, manager, params, ctx.metrics)

    # ---- lifecycle (called by the runner) ----
    async def start(self) -> None:
        if self.manager is not None:
            await self.manager.start()
        if self._warn_task is None:
            self._warn_task = asyncio.get_running_loop().create_task(self._warn_on_mismatch())

    async def close(self) -> None:
        if self._warn_task is not None:
            self._warn_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warn_task
            self._warn_task = None
        if self.manager is not None:
            await self.manager.close()
        await self.tokenizer.close()

    async def _warn_on_mismatch(self, every: float = 60.0) -> None:
        """Logs (off the request path) when most picks were never confirmed by the engine."""
        seen = dict(self.checks)
        while True:
            await asyncio.sleep(every)
            match = self.checks["match"] - seen["match"]
            mismatch = self.checks["mismatch"] - seen["mismatch"]
            seen = dict(self.checks)
            if mismatch >= 20 and mismatch > 4 * match:
                log.warning("precise-prefix-cache-scorer: the engines reported %d of %d recent requests under "
                            "other tokens; is %r the model's tokenizer?", match, match + mismatch,
                            self.params.tokenizer)

    # ---- tokenization (awaited before scheduling) ----
    async def prepare_request(self, request: LLMRequest) -> None:
        if request.state.get(self._state_key) is not None:
            return
        try:
            tokens, outcome = await self.tokenizer.tokenize_async(request.api, request.body, request.target_model)
        except Exception:  # never fail a request for scoring's sake
            tokens, outcome = None, "failed"
        request.state.set(self._state_key, _Match(tokens))
        if self._metrics is not None:
            self._metrics.precise_tokenizations.labels(outcome).inc()

    # ---- hot path ----
    def _block_size(self, ep: Endpoint) -> int:
        return (self.params.block_size_tokens or self.index.block_size(ep.key) or ep.metrics.cache_block_size
                or DEFAULT_BLOCK_SIZE)

    def _state(self, request: LLMRequest) -> _Match:
        st = request.state.get(self._state_key)
        if st is None:  # not prepared (a caller without the prepare hook): tokenize here
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
            held: dict[str, int] = {}
            st.matches[block_size] = self.index.match(keys, held_counts=held) if keys else {}
            st.held[block_size] = held
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
        now = monotonic()
        self.settle_checks(now)
        self._checks.append((now + self.check_delay, target.key, keys[0]))
        recovery = self.index.recovery
        if recovery.recovering(now):
            limit = self.params.max_prefix_blocks_to_match * bs
            recovery.observe(target.key, st.tokens[:limit], bs, self.index.namespace_for(request.target_model),
                             request.cache_salt, now)
        if self._metrics is not None:
            self._metrics.precise_hit_ratio.observe(min(1.0, st.matches[bs].get(target.key, 0.0) / len(keys)))
        if not self.params.speculative_indexing:
            return
        ttl = self.params.speculative_ttl
        self.index.add_speculative(target.key, keys, ttl, now, st.held[bs].get(target.key, 0))
        prefill = result.profile_results.get(PREFILL_PROFILE)
        if prefill is not None and prefill.target_endpoints:
            pf = prefill.target_endpoints[0]
            if pf is not target:
                pbs = self._block_size(pf)
                self.index.add_speculative(pf.key, self._keys(request, st, pbs), ttl, now, st.held[pbs].get(pf.key, 0))
        if self._metrics is not None:
            self._metrics.precise_speculative_entries.set(self.index.speculative_count)

    def settle_checks(self, now: float | None = None) -> bool:
        """Settle the tokenizer checks that are due: did the engine report the pick's first
        block under the picker's key? (Runs with each pick; True for use in conditions.)"""
        now = monotonic() if now is None else now
        checks = self._checks
        holds = self.index.holds
        while checks and checks[0][0] <= now:
            _, endpoint, key = checks.popleft()
            outcome = "match" if holds(endpoint, key) else "mismatch"
            self.checks[outcome] += 1
            if self._metrics is not None:
                self._metrics.precise_tokenizer_checks.labels(outcome).inc()
        return True
