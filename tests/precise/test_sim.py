"""Against simulated vLLM pods (in-process, real HTTP and ZMQ): the picker's view equals what
the engines hold, evictions take the routing preference away, LoRA requests stay separate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from epp.datalayer.kvevents.manager import PORT_LABEL, REPLAY_PORT_LABEL
from epp.framework.datalayer import Endpoint
from epp.plugins.scheduling.precise_prefix_cache import PrecisePrefixCacheScorer
from epp.sim.config import LoraModule, SimConfig
from epp.sim.kvcache import published_hash
from epp.sim.pool import SimPool

from .conftest import chat_request, completion, eventually, make_scorer

BS = 16


@pytest.fixture
async def pool() -> AsyncIterator[SimPool]:
    cfg = SimConfig(block_size=BS, num_gpu_blocks=64, time_scale=0.01, kv_events_buffer_steps=1000,
                    lora_modules=[LoraModule("my-lora", "/adapters/my-lora")])
    async with SimPool(cfg, replicas=2, kv_events_base_port=0, kv_replay_base_port=0) as p:
        yield p


def endpoints(pool: SimPool) -> list[Endpoint]:
    return [Endpoint(pod.name, pod.host, pod.port, labels={PORT_LABEL: str(pod.kv_events_port),
                                                           REPLAY_PORT_LABEL: str(pod.kv_replay_port)})
            for pod in pool.pods]


@pytest.fixture
async def scorer(pool: SimPool) -> AsyncIterator[PrecisePrefixCacheScorer]:
    s, _, _ = make_scorer(endpoints(pool), speculativeIndexing=False)
    await s.start()
    subs = list(s.manager.subscribers.values())  # type: ignore[union-attr]
    assert await eventually(lambda: all(sub.expected is not None for sub in subs))
    yield s
    await s.close()


async def post(pod_url: str, body: dict[str, Any], path: str = "/v1/completions") -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(pod_url + path, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


def engine_view(pool: SimPool, i: int) -> set[int]:
    engine = pool.pods[i].engine
    assert engine is not None
    return {published_hash(d) for d in engine.kv.cached}


PROMPT = "You are a meticulous assistant that answers questions about tax law. " * 6


async def test_view_equals_engine_after_requests_and_evictions(pool: SimPool,
                                                                scorer: PrecisePrefixCacheScorer) -> None:
    url = pool.pods[0].url
    key = f"{pool.pods[0].host}:{pool.pods[0].port}"
    for i in range(12):  # 64 blocks: these evict one another
        await post(url, {"model": "sim-model", "prompt": f"{i} " + PROMPT * (1 + i % 3), "max_tokens": 3})
    # the view converges to exactly the engine's cached blocks
    assert await eventually(lambda: scorer.index.engine_hashes(key) == engine_view(pool, 0))
    assert scorer.index.stats.removed > 0


async def test_request_tokens_match_engine_blocks_and_eviction_removes_preference(
        pool: SimPool, scorer: PrecisePrefixCacheScorer) -> None:
    eps = endpoints(pool)
    req = chat_request([{"role": "system", "content": PROMPT}, {"role": "user", "content": "rule 7?"}])
    await post(pool.pods[0].url, req.body, "/v1/chat/completions")
    assert await eventually(lambda: scorer.score(chat_request(req.body["messages"]), eps)[0] == 1.0)
    assert scorer.score(chat_request(req.body["messages"]), eps)[1] == 0.0
    # fill pod 0's cache with other prompts until the chat prefix is evicted
    for i in range(8):
        await post(pool.pods[0].url, {"model": "sim-model", "prompt": f"filler {i} " * 150, "max_tokens": 2})
    assert await eventually(lambda: scorer.score(chat_request(req.body["messages"]), eps)[0] == 0.0)


async def test_lora_requests_match_only_lora_blocks(pool: SimPool, scorer: PrecisePrefixCacheScorer) -> None:
    eps = endpoints(pool)
    await post(pool.pods[1].url, {"model": "my-lora", "prompt": PROMPT, "max_tokens": 2})
    assert await eventually(lambda: scorer.score(completion(PROMPT, model="my-lora"), eps)[1] == 1.0)
    assert scorer.score(completion(PROMPT), eps) == [0.0, 0.0]  # base model: nothing cached
