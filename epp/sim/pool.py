"""Simulated pods and pools of them, running in the caller's event loop.

A pod is an HTTP server + engine + KV-event publisher. Stopping a pod closes its listening
socket (connections are refused, like a dead pod) and aborts its requests; starting it again
brings up a *fresh* engine on the same ports (empty cache, sequence numbers from 0), as a
restarted vLLM would.

Ports may be 0: the OS picks free ones and ``pod.port`` / ``pod.kv_events_port`` report them,
so tests can run in parallel without port clashes.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import zmq
from aiohttp import web

from epp.sim.config import SimConfig
from epp.sim.engine import Engine
from epp.sim.kvevents import KVEventPublisher
from epp.sim.server import Identity, PodServer
from epp.sim.tokenizer import Tokenizer, load_tokenizer


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@dataclass(slots=True)
class SimPod:
    """One simulated vLLM server. ``engine`` is the live engine (for test assertions)."""

    config: SimConfig
    index: int
    host: str
    port: int
    zmq_ctx: zmq.Context[Any]
    tokenizer: Tokenizer
    kv_events_port: int | None = None
    kv_replay_port: int | None = None
    name: str = ""
    engine: Engine | None = None
    server: PodServer | None = None
    publisher: KVEventPublisher | None = None
    _runner: web.AppRunner | None = None
    _out: tuple[list[int], list[bytes]] = field(default_factory=lambda: ([0], [b'""']))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def kv_events_endpoint(self) -> str | None:
        return self.publisher.endpoint if self.publisher else None

    @property
    def kv_replay_endpoint(self) -> str | None:
        return self.publisher.replay_endpoint if self.publisher else None

    async def start(self) -> None:
        """Bind the ports and start serving (idempotent)."""
        if self._runner is not None:
            return
        cfg = self.config
        sock = _listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        if not self.name:
            self.name = f"{cfg.pod_name_prefix}{self.port}"
        publisher = None
        if self.kv_events_port is not None:
            topic = cfg.kv_events_topic.format(host=self.host, port=self.port, model=cfg.model_name,
                                               pod=self.name)
            publisher = KVEventPublisher(self.zmq_ctx, self.host, self.kv_events_port, topic,
                                         self.kv_replay_port, cfg.kv_events_buffer_steps)
            try:
                publisher.start()
            except Exception:
                sock.close()
                await publisher.close()
                raise
            self.kv_events_port = publisher.port
            self.kv_replay_port = publisher.replay_port
        self.publisher = publisher
        if len(self._out[0]) <= 1:
            self._out = self.tokenizer.output_tokens()
        out_ids, out_texts = self._out
        engine = Engine(cfg, publisher, cfg.kv_side_channel_port + self.index, out_ids)
        server = PodServer(cfg, engine, self.tokenizer, Identity(self.name, cfg.namespace, self.host, self.port),
                           out_texts, self.kv_events_endpoint, self.kv_replay_endpoint)
        runner = web.AppRunner(server.build_app(), access_log=None, handler_cancellation=True,
                               shutdown_timeout=0.5)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        engine.start()
        self.engine, self.server, self._runner = engine, server, runner

    async def stop(self) -> None:
        """Stop serving: the port refuses connections, in-flight requests are aborted."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self.engine is not None:
            await self.engine.stop()
        await runner.cleanup()
        if self.publisher is not None:
            await self.publisher.close()


@dataclass(slots=True)
class SimPool:
    """N pods in the current event loop: ``async with SimPool(cfg, replicas=4) as pool: ...``.

    ``base_port`` / ``kv_events_base_port`` / ``kv_replay_base_port``: pod i uses base + i;
    0 lets the OS pick; ``None`` (KV ports only) disables that socket.
    """

    config: SimConfig
    replicas: int = 1
    base_port: int = 0
    host: str = "127.0.0.1"
    kv_events_base_port: int | None = None
    kv_replay_base_port: int | None = None
    names: list[str] | None = None
    pods: list[SimPod] = field(default_factory=list)
    _ctx: zmq.Context[Any] | None = None

    def __post_init__(self) -> None:
        self.config.validate()
        self._ctx = zmq.Context()
        tokenizer = load_tokenizer(self.config.tokenizer)

        def port(base: int | None, i: int) -> int | None:
            return None if base is None else (base + i if base else 0)

        self.pods = [
            SimPod(self.config, i, self.host, self.base_port + i if self.base_port else 0, self._ctx, tokenizer,
                   port(self.kv_events_base_port, i), port(self.kv_replay_base_port, i),
                   name=self.names[i] if self.names and i < len(self.names) else "")
            for i in range(self.replicas)
        ]

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.pods]

    async def start(self) -> None:
        try:
            for pod in self.pods:
                await pod.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for pod in self.pods:
            await pod.stop()

    async def close(self) -> None:
        await self.stop()
        if self._ctx is not None:
            # destroy(linger=0), not term(): term() waits forever for any socket still open or
            # holding unsent messages (a pod stopped mid-publish, a test's relay)
            self._ctx.destroy(linger=0)
            self._ctx = None

    async def __aenter__(self) -> SimPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
