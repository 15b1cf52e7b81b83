"""Fault suite: the precise index never silently decays (issue 12).

Two simulated pods (real HTTP and ZMQ) whose KV-event streams reach the picker through a
relay that can drop messages or die; requests are routed by the precise scorer (ties go to
the group's home pod, as a balanced picker keeps groups apart). After each fault the index
must equal the blocks the engines actually hold (the simulator's own cache), either at once
or after a few requests per prompt prefix, and the metrics must say what happened.

Workload: ``GROUPS`` shared prefixes of 3 blocks, each request adding 4 unique blocks; 40
blocks per pod, so a few requests per prefix recycle every block a pod held before the fault
except the prefixes, which the recovery must re-learn from the requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import pytest
import zmq

from epp.framework.datalayer import Endpoint
from epp.metrics import EppMetrics
from epp.plugins.scheduling.precise_prefix_cache import PrecisePrefixCacheScorer
from epp.sim.config import SimConfig
from epp.sim.pool import SimPod, SimPool

from .conftest import eventually, make_scorer
from .faultkit import Relay, Router, dead_port, endpoint, post

BS = 16
GROUPS = 4
#: how long the relay stays dead in the outage test (the issue's case is 5 s; the behaviour
#: does not depend on the length once the picker's connection has dropped)
OUTAGE_SECONDS = 1.0


def prompt(g: int, n: int) -> str:
    return (f"System prompt {g}: " + " ".join(f"g{g}w{i}" for i in range(58)) + f" Question {n}: "
            + " ".join(f"q{g}x{n}y{i}" for i in range(60)))


@dataclass
class Env:
    pool: SimPool
    relays: list[Relay]
    scorer: PrecisePrefixCacheScorer | None = None
    metrics: EppMetrics | None = None
    endpoints: list[Endpoint] | None = None
    router: Router | None = None
    session: aiohttp.ClientSession | None = None
    n: int = 0  # questions asked so far per group

    async def start_picker(self, replay_port: int | None = None, **params: object) -> None:
        eps = [endpoint(pod, relay, replay_port) for pod, relay in zip(self.pool.pods, self.relays, strict=True)]
        params.setdefault("replayTimeout", "300ms")
        params.setdefault("replayRetries", 1)
        self.scorer, _, self.metrics = make_scorer(eps, blockSizeTokens=BS, **params)
        self.endpoints = eps
        await self.scorer.start()
        self.router = Router(self.scorer, self.pool, eps)
        subs = list(self.scorer.manager.subscribers.values())  # type: ignore[union-attr]
        assert await eventually(lambda: all(s.caught_up for s in subs))

    async def traffic(self, per_group: int, direct: bool = False) -> None:
        """``per_group`` new questions for every prefix group, routed by the scorer (or sent
        straight to the group's home pod when no picker runs yet)."""
        assert self.session is not None
        for _ in range(per_group):
            for g in range(GROUPS):
                if direct or self.router is None:
                    pod = self.pool.pods[g % len(self.pool.pods)]
                    await post(self.session, pod.url, {"model": "sim-model", "prompt": prompt(g, self.n),
                                                       "max_tokens": 1})
                else:
                    await self.router.send(self.session, prompt(g, self.n), home=g % len(self.pool.pods))
            self.n += 1

    async def traffic_until(self, done: Callable[[], bool], within: float = 15.0) -> None:
        deadline = time.monotonic() + within
        while not done():
            assert time.monotonic() < deadline, "the subscribers never noticed"
            await self.traffic(1)

    def differences(self) -> list[tuple[str, int, int, int]]:
        """Per pod: (endpoint, blocks only the engine holds, only the index holds, hashless)."""
        assert self.scorer is not None and self.endpoints is not None
        out = []
        for pod, ep in zip(self.pool.pods, self.endpoints, strict=True):
            assert pod.engine is not None
            engine = pod.engine.kv.published_hashes()
            index = self.scorer.index.engine_hashes(ep.key)
            out.append((ep.key, len(engine - index), len(index - engine), self.scorer.index.hashless_count(ep.key)))
        return out

    async def converged(self, within: float = 10.0) -> None:
        ok = await eventually(lambda: all(d[1:] == (0, 0, 0) for d in self.differences()), within)
        assert ok, f"index != engine: {self.differences()}"

    def metric(self, name: str, **labels: str) -> float:
        assert self.metrics is not None
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def subscriber_stat(self, name: str) -> int:
        assert self.scorer is not None and self.scorer.manager is not None
        return sum(getattr(s.stats, name) for s in self.scorer.manager.subscribers.values())


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    cfg = SimConfig(block_size=BS, num_gpu_blocks=40, time_scale=0.01, kv_events_buffer_steps=1000)
    async with SimPool(cfg, replicas=2, kv_events_base_port=0, kv_replay_base_port=0) as pool:
        relays = [Relay(pod.kv_events_endpoint or "") for pod in pool.pods]
        for r in relays:
            r.start()
        e = Env(pool, relays)
        async with aiohttp.ClientSession() as session:
            e.session = session
            try:
                yield e
            finally:
                if e.scorer is not None:
                    await e.scorer.close()
                for r in relays:
                    await r.close()


async def restart(pod: SimPod, within: float = 10.0) -> None:
    """Start the pod again on its ports; ZMQ releases a closed socket's port asynchronously,
    so the bind is retried until it is free."""
    deadline = time.monotonic() + within
    while True:
        try:
            await pod.start()
            return
        except zmq.ZMQError:
            assert time.monotonic() < deadline, "the pod's ports were never released"
            await asyncio.sleep(0.05)


def drop_every(env: Env, n: int) -> None:
    for r in env.relays:
        r.drop_every = n


async def test_one_message_in_fifty_dropped_is_replayed(env: Env) -> None:
    await env.start_picker()
    drop_every(env, 50)
    await env.traffic(30)  # ~60 batches per pod
    assert sum(r.dropped for r in env.relays) >= 2
    await env.traffic(1)  # a batch after the last drop reveals it
    await env.converged()
    gaps = env.metric("epp_kv_events_gaps_total")
    assert gaps >= 2 and env.metric("epp_kv_events_replays_total", outcome="ok") >= gaps + 2  # + the catch-ups
    assert env.subscriber_stat("resyncs") == 0


async def test_one_message_in_fifty_dropped_without_replay_recovers_from_requests(env: Env) -> None:
    await env.start_picker(replay_port=0)  # no replay socket: every gap is a resync
    await env.traffic(6)
    drop_every(env, 50)
    await env.traffic(30)
    drop_every(env, 0)
    assert await eventually(lambda: env.metric("epp_kv_events_resyncs_total", reason="gap") >= 1)
    await env.traffic(5)  # a few requests per prefix
    await env.converged()
    assert env.metric("epp_kv_events_orphan_blocks_total", outcome="anchored") > 0


async def test_relay_killed_for_a_while(env: Env) -> None:
    await env.start_picker()
    await env.traffic(4)
    await env.converged()
    for r in env.relays:
        await r.kill()
    await env.traffic(4)  # published while nobody relays: lost on the wire
    await asyncio.sleep(OUTAGE_SECONDS)  # the outage itself, not a synchronisation
    for r in env.relays:
        r.start()
    # the first batches after the revival may go out before the connections are back up:
    # keep the traffic going until both subscribers have noticed the outage
    await env.traffic_until(lambda: env.subscriber_stat("reconnects") >= 2)
    await env.converged()
    assert env.metric("epp_kv_events_gaps_total") >= 2
    assert env.subscriber_stat("resyncs") == 0 and env.subscriber_stat("reconnects") >= 1


async def test_replay_port_dead(env: Env) -> None:
    await env.start_picker(replay_port=dead_port())
    assert env.metric("epp_kv_events_replays_total", outcome="timeout") >= 2  # the catch-up tried, and retried
    await env.traffic(6)
    drop_every(env, 25)
    await env.traffic(15)
    drop_every(env, 0)
    assert await eventually(lambda: env.metric("epp_kv_events_resyncs_total", reason="gap") >= 1)
    await env.traffic(5)
    await env.converged()
    assert env.metric("epp_kv_events_orphan_blocks_total", outcome="anchored") > 0


async def test_picker_started_after_a_full_replay_buffer(env: Env) -> None:
    for pod in env.pool.pods:
        assert pod.publisher is not None
        pod.publisher.buffer_steps = 20
        pod.publisher._buffer = type(pod.publisher._buffer)(pod.publisher._buffer, maxlen=20)
    await env.traffic(12, direct=True)  # ~24 batches per pod: the first ones are gone
    await env.start_picker()
    assert env.metric("epp_kv_events_replays_total", outcome="truncated") == 2
    assert env.metric("epp_kv_events_orphan_blocks_total", outcome="anchored") == 0
    await env.traffic(5)
    await env.converged()
    assert env.metric("epp_kv_events_orphan_blocks_total", outcome="anchored") > 0


async def test_pod_restarted_soon_after_start(env: Env) -> None:
    await env.start_picker()
    await env.traffic(2)
    await env.converged()
    pod = env.pool.pods[0]
    await env.relays[0].kill()
    await pod.stop()
    await restart(pod)  # a fresh engine on the same ports: empty cache, sequence from 0
    for _ in range(3):  # its sequence passes the old engine's before the picker hears it again
        await env.traffic(1, direct=True)
    env.relays[0].start()
    await env.traffic_until(lambda: env.subscriber_stat("restarts") >= 1)
    await env.converged()
    assert env.metric("epp_kv_events_resyncs_total", reason="restart") == 1
