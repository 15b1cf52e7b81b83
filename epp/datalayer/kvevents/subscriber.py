"""One endpoint's KV-event subscription: ZMQ SUB, ordered by sequence number, with recovery.

The engine's PUB socket numbers batches 0, 1, 2, … per publisher. The subscriber applies
them in order and treats every irregularity as a reason to distrust its view of the pod:

* **gap** (``seq > expected``; PUB drops at its high-water mark, a reconnect loses messages):
  fetch the missing batches from the engine's replay ROUTER socket when one is configured;
  if there is none, or it no longer holds them, *resync*: forget the pod's entries and start
  again from the live stream (a clean, smaller view beats a wrong one);
* **sequence going back** (``seq < expected`` outside a replay window): the engine restarted
  with an empty cache, so its old entries are dropped;
* on start, when a replay socket is configured, the buffered history is replayed from 0 so a
  picker replica that starts late holds the same view as one that ran all along.

ZMQ reconnects on its own; nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from epp.datalayer.kvevents.decode import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventDecodeError,
    decode_payload,
    decode_seq,
    topic_model,
)
from epp.datalayer.kvevents.index import KVBlockIndex

if TYPE_CHECKING:
    from epp.metrics import EppMetrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SubscriberStats:
    batches: int = 0
    events: int = 0
    gaps: int = 0
    replays: int = 0
    replay_failures: int = 0
    resyncs: int = 0
    restarts: int = 0
    duplicates: int = 0
    decode_errors: int = 0


@dataclass(slots=True)
class KVEventSubscriber:
    endpoint: str  # the endpoint's key (ip:port) in the datastore and the index
    url: str  # tcp://ip:port of the engine's PUB socket
    index: KVBlockIndex
    ctx: zmq.asyncio.Context
    replay_url: str | None = None
    topic_filter: str = ""
    replay_timeout: float = 2.0
    metrics: EppMetrics | None = None
    stats: SubscriberStats = field(default_factory=SubscriberStats)
    #: next sequence number expected (None until the first batch)
    expected: int | None = None
    #: live batches with ``dup_floor <= seq < expected`` were already applied by a replay
    dup_floor: int = 0
    _task: asyncio.Task[None] | None = None
    _sock: zmq.asyncio.Socket | None = None
    _model_seen: bool = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events {self.endpoint}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def cancel(self) -> None:
        """Stop without waiting (from a synchronous datastore listener)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def _run(self) -> None:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic_filter.encode())
        sock.connect(self.url)
        self._sock = sock
        try:
            if self.replay_url is not None:
                await self._catch_up()
            while True:
                frames = await sock.recv_multipart()
                if len(frames) < 3:
                    continue
                await self.handle(frames[-3], frames[-2], frames[-1])
        except asyncio.CancelledError:
            raise
        except Exception:  # never let one pod's stream kill the picker
            log.exception("kv-event subscriber failed", extra={"endpoint": self.endpoint})
        finally:
            sock.close(linger=0)
            self._sock = None

    async def _catch_up(self) -> None:
        """Replay the engine's buffered history (from 0) before following the live stream."""
        batches = await self._fetch_replay(0)
        if batches is None:
            return
        # an empty history means the engine has published nothing yet: expect seq 0
        self.expected = 0
        for seq, topic, payload in batches:
            self._apply(topic, payload)
            self.expected = seq + 1
        self.dup_floor = 0

    async def handle(self, topic: bytes, seq_frame: bytes, payload: bytes) -> None:
        """One live batch."""
        try:
            seq = decode_seq(seq_frame)
        except EventDecodeError:
            self._count_decode_error()
            return
        expected = self.expected
        if expected is None or seq == expected:
            pass
        elif seq > expected:
            self.stats.gaps += 1
            if self.metrics is not None:
                self.metrics.kv_events_gaps.inc()
            log.info("kv-event gap", extra={"endpoint": self.endpoint, "expected": expected, "got": seq})
            recovered = False
            if self.replay_url is not None:
                recovered = await self._replay_range(expected, seq)
            if not recovered:
                self._resync("gap")
        elif seq >= self.dup_floor:
            self.stats.duplicates += 1  # already applied through a replay
            return
        else:
            self.stats.restarts += 1
            log.info("kv-event sequence restarted", extra={"endpoint": self.endpoint, "expected": expected,
                                                           "got": seq})
            self._resync("restart")
        self._apply(topic, payload)
        self.expected = seq + 1
        self.dup_floor = seq + 1

    def _resync(self, reason: str) -> None:
        self.stats.resyncs += 1
        if self.metrics is not None:
            self.metrics.kv_events_resyncs.labels(reason).inc()
        self.index.clear_endpoint(self.endpoint)

    async def _replay_range(self, start: int, end: int) -> bool:
        """Apply batches ``start..end-1`` from the replay socket; False when it could not."""
        batches = await self._fetch_replay(start)
        if batches is None:
            return False
        wanted = [(s, t, p) for s, t, p in batches if start <= s < end]
        if len(wanted) != end - start or (wanted and wanted[0][0] != start):
            self._count_replay("incomplete")
            return False
        for _, topic, payload in wanted:
            self._apply(topic, payload)
        # batches beyond ``end`` were replayed too; the live stream delivers them again
        return True

    async def _fetch_replay(self, start: int) -> list[tuple[int, bytes, bytes]] | None:
        assert self.replay_url is not None
        self.stats.replays += 1
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        out: list[tuple[int, bytes, bytes]] = []
        try:
            dealer.connect(self.replay_url)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.replay_timeout
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await dealer.poll(int(remaining * 1000)):
                    self._count_replay("timeout")
                    return None
                frames = await dealer.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]
                if len(frames) < 3:
                    continue
                topic, seq_b, payload = frames[-3], frames[-2], frames[-1]
                if seq_b == END_SEQ:
                    break
                try:
                    out.append((decode_seq(seq_b), topic, payload))
                except EventDecodeError:
                    self._count_decode_error()
        finally:
            dealer.close(linger=0)
        self._count_replay("ok")
        return out

    def _count_replay(self, outcome: str) -> None:
        if outcome != "ok":
            self.stats.replay_failures += 1
        if self.metrics is not None:
            self.metrics.kv_events_replays.labels(outcome).inc()

    def _count_decode_error(self) -> None:
        self.stats.decode_errors += 1
        if self.metrics is not None:
            self.metrics.kv_events_decode_errors.inc()

    def _apply(self, topic: bytes, payload: bytes) -> None:
        try:
            batch = decode_payload(payload)
        except EventDecodeError:
            self._count_decode_error()
            return
        if not self._model_seen:
            self._model_seen = True
            self.index.set_pod_model(self.endpoint, topic_model(topic.decode("utf-8", "replace")))
        self.index.apply(self.endpoint, batch.events)
        self.stats.batches += 1
        self.stats.events += len(batch.events)
        if self.metrics is not None:
            _count_events(self.metrics, batch)


def _count_events(metrics: EppMetrics, batch: EventBatch) -> None:
    stored = removed = cleared = 0
    for ev in batch.events:
        if isinstance(ev, BlockStored):
            stored += 1
        elif isinstance(ev, BlockRemoved):
            removed += 1
        elif isinstance(ev, AllBlocksCleared):
            cleared += 1
    c = metrics.kv_events
    if stored:
        c.labels("BlockStored").inc(stored)
    if removed:
        c.labels("BlockRemoved").inc(removed)
    if cleared:
        c.labels("AllBlocksCleared").inc(cleared)

