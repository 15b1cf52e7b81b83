"""KV-cache events on ZMQ, byte-compatible with vLLM's ``ZmqEventPublisher``.

Wire format (tests/data/vllm_kv_events_sample.txt): a PUB socket sends one multipart message
per engine step that produced events: ``[topic, seq (8-byte big-endian), msgpack([ts, events,
dp_rank])]`` with events as msgpack maps tagged by ``"type"``. An optional ROUTER socket
replays buffered batches: a DEALER sends ``[b"", start_seq]`` and receives ``[b"", topic, seq,
payload]`` per batch with ``seq >= start_seq``, then the end marker ``[b"", b"", 0xff*8, b""]``.

The PUB socket is a plain (non-asyncio) socket: PUB never blocks (it drops at the high-water
mark), so a send is a cheap synchronous call from the engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
import zmq.asyncio

_END_SEQ = b"\xff" * 8


def bound_port(sock: zmq.Socket[Any]) -> int:
    """The TCP port a socket bound to (useful after binding port 0 / ``*``)."""
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    text = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
    return int(text.rsplit(":", 1)[1])


def _bind(sock: zmq.Socket[Any], host: str, port: int) -> int:
    sock.bind(f"tcp://{host}:{port if port else '*'}")
    return bound_port(sock)


@dataclass(slots=True)
class KVEventPublisher:
    """One pod's publisher (and optional replay server); one sequence counter per publisher."""

    ctx: zmq.Context[Any]
    host: str
    port: int
    topic: str
    replay_port: int | None = None
    buffer_steps: int = 10000
    seq: int = 0
    _pub: zmq.Socket[Any] | None = None
    _router: zmq.asyncio.Socket | None = None
    _replay_task: asyncio.Task[None] | None = None
    _buffer: deque[tuple[int, bytes]] = field(default_factory=deque)

    def start(self) -> None:
        """Bind the sockets (resolving port 0 to the real port)."""
        pub = self.ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 100000)
        try:
            self.port = _bind(pub, self.host, self.port)
        except zmq.ZMQError:
            pub.close(linger=0)  # an unclosed socket would hang the context's term()
            raise
        self._pub = pub
        self._buffer = deque(maxlen=self.buffer_steps)
        if self.replay_port is not None:
            actx = zmq.asyncio.Context.shadow(self.ctx.underlying)
            router = actx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            try:
                self.replay_port = _bind(router, self.host, self.replay_port)
            except zmq.ZMQError:
                router.close(linger=0)
                raise
            self._router = router
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self._router is None else f"tcp://{self.host}:{self.replay_port}"

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Send one batch (one engine step's events)."""
        if self._pub is None or not events:
            return
        payload = msgpack.packb([time.time(), events, 0])
        seq_b = self.seq.to_bytes(8, "big")
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self.topic.encode(), seq_b, payload], flags=zmq.NOBLOCK)
        self._buffer.append((self.seq, payload))
        self.seq += 1

    async def _serve_replay(self) -> None:
        router = self._router
        assert router is not None
        topic = self.topic.encode()
        while True:
            frames = await router.recv_multipart()
            if len(frames) < 2:
                continue
            ident, start_b = frames[0], frames[-1]
            start = int.from_bytes(start_b, "big") if len(start_b) == 8 else 0
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await router.send_multipart([ident, b"", topic, seq.to_bytes(8, "big"), payload])
            await router.send_multipart([ident, b"", b"", _END_SEQ, b""])

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        if self._pub is not None:
            self._pub.close(linger=0)
            self._pub = None
