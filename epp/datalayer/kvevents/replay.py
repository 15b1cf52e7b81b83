"""Client of vLLM's KV-event replay socket (``replay_endpoint``, a ZMQ ROUTER).

A DEALER sends ``[b"", start_seq (8 bytes BE)]``; the engine answers one message
``[b"", topic, seq, payload]`` per buffered batch with ``seq >= start_seq`` (vLLM keeps
``buffer_steps`` = 10,000 by default), then ``[b"", b"", 0xff * 8, b""]``.

What makes a fetch trustworthy:

* **an inactivity timeout**, not a transfer deadline: a full buffer takes seconds to stream
  (2.7-5.5 s measured against vLLM), so the fetch fails only when the socket is *silent* for
  ``timeout`` (dead port, engine gone);
* **no receive limit below the buffer**: the engine's ROUTER drops messages it cannot queue
  for a peer, and with ZMQ's default receive high-water mark (1,000) a 10,000-batch answer
  lost thousands of batches. The DEALER's limit is lifted (the engine's buffer bounds the
  answer) and ``max_batches`` guards against a runaway peer;
* **a contiguity check**: sequence numbers must be consecutive; holes make the outcome
  ``incomplete`` (retried), never ``ok``;
* **retries** with backoff (0.25 s, doubling) on ``timeout`` / ``incomplete``. After a fetch
  that failed every attempt the socket is considered down for ``cooldown`` seconds, so a dead
  replay port does not stall the live stream at every gap.

Outcomes (``epp_kv_events_replays_total{outcome}``, one per attempt): ``ok``; ``truncated``
(contiguous, but the buffer no longer starts at the requested sequence: older history is
gone); ``incomplete``; ``timeout``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from epp.datalayer.kvevents.decode import END_SEQ, EventDecodeError, decode_seq

BACKOFF = 0.25


@dataclass(slots=True, frozen=True)
class Batch:
    seq: int
    topic: bytes
    payload: bytes


@dataclass(slots=True)
class ReplayResult:
    outcome: str  # ok | truncated | incomplete | timeout
    batches: list[Batch] = field(default_factory=list)


@dataclass(slots=True)
class ReplayClient:
    ctx: zmq.asyncio.Context
    url: str
    timeout: float = 2.0
    retries: int = 3
    #: called with every attempt's outcome (metrics)
    on_outcome: Callable[[str], None] | None = None
    max_batches: int = 1_000_000
    cooldown: float = 10.0
    _down_until: float = 0.0

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def fetch(self, start: int, retries: int | None = None) -> ReplayResult | None:
        """Batches from ``start`` (outcome ``ok`` or ``truncated``), or None when every attempt
        failed."""
        attempts = 1 + (self.retries if retries is None else retries)
        delay = BACKOFF
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            res = await self.fetch_once(start)
            if self.on_outcome is not None:
                self.on_outcome(res.outcome)
            if res.outcome in ("ok", "truncated"):
                self._down_until = 0.0
                return res
        self._down_until = time.monotonic() + self.cooldown
        return None

    async def fetch_once(self, start: int) -> ReplayResult:
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)  # the engine's buffer bounds the answer (see above)
        out: list[Batch] = []
        timeout_ms = max(1, int(self.timeout * 1000))
        try:
            dealer.connect(self.url)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await dealer.poll(timeout_ms):
                    return ReplayResult("timeout", out)
                frames = await dealer.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]
                if len(frames) < 3:
                    continue
                topic, seq_b, payload = frames[-3], frames[-2], frames[-1]
                if seq_b == END_SEQ:
                    break
                try:
                    out.append(Batch(decode_seq(seq_b), topic, payload))
                except EventDecodeError:
                    return ReplayResult("incomplete", out)
                if len(out) > self.max_batches:
                    return ReplayResult("incomplete", out)
        finally:
            dealer.close(linger=0)
        for a, b in itertools.pairwise(out):
            if b.seq != a.seq + 1:
                return ReplayResult("incomplete", out)
        if out and out[0].seq > start:
            return ReplayResult("truncated", out)
        return ReplayResult("ok", out)
