"""Fault injection for the precise index: a KV-event relay that drops or dies, and a minimal
router that schedules with the precise scorer alone (as the picker does, minus gRPC)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import aiohttp
import zmq
import zmq.asyncio

from epp.datalayer.kvevents.manager import PORT_LABEL, REPLAY_PORT_LABEL
from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import LLMRequest, ProfileRunResult, SchedulingResult
from epp.plugins.scheduling.precise_prefix_cache import PrecisePrefixCacheScorer
from epp.sim.pool import SimPod, SimPool

HOST = "127.0.0.1"


def dead_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Relay:
    """Forwards an engine's KV-event stream (SUB → PUB) on its own port, dropping every
    ``drop_every``-th message; ``kill`` takes it away (the picker sees a dead peer),
    ``revive`` brings it back on the same port."""

    def __init__(self, upstream: str, drop_every: int = 0) -> None:
        self.upstream = upstream
        self.drop_every = drop_every
        self.ctx = zmq.asyncio.Context()
        self.port = 0
        self.seen = 0
        self.dropped = 0
        self.forwarded = 0
        self._task: asyncio.Task[None] | None = None
        self._socks: list[zmq.asyncio.Socket] = []

    def start(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.upstream)
        pub = self.ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(f"tcp://{HOST}:{self.port or '*'}")
        last = pub.getsockopt(zmq.LAST_ENDPOINT)
        self.port = int((last.decode() if isinstance(last, bytes) else str(last)).rsplit(":", 1)[1])
        self._socks = [sub, pub]
        self._task = asyncio.get_running_loop().create_task(self._run(sub, pub))

    async def _run(self, sub: zmq.asyncio.Socket, pub: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sub.recv_multipart()
            self.seen += 1
            if self.drop_every and self.seen % self.drop_every == 0:
                self.dropped += 1
                continue
            self.forwarded += 1
            await pub.send_multipart(frames)

    async def kill(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for s in self._socks:
            s.close(linger=0)
        self._socks = []

    async def close(self) -> None:
        await self.kill()
        self.ctx.destroy(linger=0)


def endpoint(pod: SimPod, relay: Relay, replay_port: int | None = None) -> Endpoint:
    labels = {PORT_LABEL: str(relay.port)}
    replay = pod.kv_replay_port if replay_port is None else replay_port
    if replay:
        labels[REPLAY_PORT_LABEL] = str(replay)
    return Endpoint(pod.name, pod.host, pod.port, labels=labels)


class Router:
    """Schedules with the precise scorer (ties → round robin), then sends the request to the
    chosen pod over HTTP: the picker's request path without Envoy and gRPC."""

    def __init__(self, scorer: PrecisePrefixCacheScorer, pool: SimPool | list[str], endpoints: list[Endpoint],
                 model: str = "sim-model") -> None:
        self.scorer = scorer
        self.urls = pool if isinstance(pool, list) else [pod.url for pod in pool.pods]
        self.endpoints = endpoints
        self.model = model
        self.rr = 0
        self.picks: list[int] = []

    async def send(self, session: aiohttp.ClientSession, prompt: str, max_tokens: int = 1,
                   home: int | None = None) -> int:
        return (await self.complete(session, prompt, max_tokens, home))[0]

    async def complete(self, session: aiohttp.ClientSession, prompt: str, max_tokens: int = 1,
                       home: int | None = None) -> tuple[int, dict[str, Any]]:
        """(endpoint index, response usage)."""
        model = self.model
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
        req = LLMRequest(request_id="r", target_model=model, incoming_model=model, api="completions", body=body)
        await self.scorer.prepare_request(req)
        scores = self.scorer.score(req, self.endpoints)
        best = max(scores)
        tied = [i for i, s in enumerate(scores) if s == best]
        i = home if home in tied else tied[self.rr % len(tied)]
        self.rr += 1
        ep = self.endpoints[i]
        self.scorer.pre_request(req, SchedulingResult({"default": ProfileRunResult([ep])}, "default"))
        usage = await post(session, self.urls[i], body)
        self.picks.append(i)
        return i, usage


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a completion; returns its usage."""
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        doc = await r.json()
    usage: dict[str, Any] = doc.get("usage") or {}
    return usage
