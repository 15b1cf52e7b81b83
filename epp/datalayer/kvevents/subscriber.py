"""One endpoint's KV-event subscription: ZMQ SUB, ordered by sequence number, with recovery.

The engine's PUB socket numbers batches 0, 1, 2, … per publisher. The subscriber applies
them in order and treats every irregularity as a reason to distrust its view of the pod:

* **on start** (replay socket configured) the engine's buffered history is replayed from 0
  (``replay.py``: inactivity timeout, retries with backoff, contiguity check), so a replica
  that starts late holds the same view as one that ran all along. History the buffer no
  longer holds (outcome ``truncated``) is recovered from later traffic (``recovery.py``);
* **gap** (``seq > expected``; PUB drops at its high-water mark, a relay or network outage):
  the batches from ``expected - 1`` are fetched from the replay socket. The first of them must
  be the batch applied last (same payload fingerprint): then the engine is the same one and
  the missing batches are applied. A different batch there means a *restarted* engine whose
  sequence has passed the old one's: its entries are purged and its history is rebuilt from
  0. No replay socket, a dead one, or a buffer that no longer reaches back: *resync* — the
  entries are purged (a clean, smaller view beats a wrong one) and re-learned;
* **sequence going back** (``seq < expected`` outside a replay window): a restarted engine;
* **reconnect** (the PUB connection dropped and came back; ZMQ socket monitor): the next batch
  is verified as after a gap even when its sequence number is the expected one.

Metrics: ``epp_kv_events_gaps_total``, ``epp_kv_events_replays_total{outcome}``,
``epp_kv_events_resyncs_total{reason}``. ZMQ reconnects on its own; nothing here blocks the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio
from xxhash import xxh64_intdigest
from zmq.utils.monitor import parse_monitor_message

from epp.datalayer.kvevents.decode import (
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
from epp.datalayer.kvevents.replay import Batch, ReplayClient

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
    reconnects: int = 0
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
    #: replay: give up when the replay socket is silent this long (inactivity, not transfer time)
    replay_timeout: float = 2.0
    #: replay: further attempts after a timeout / incomplete answer (backoff doubles from 0.25 s)
    replay_retries: int = 3
    metrics: EppMetrics | None = None
    stats: SubscriberStats = field(default_factory=SubscriberStats)
    #: next sequence number expected (None until the first batch)
    expected: int | None = None
    #: live batches with ``dup_floor <= seq < expected`` were already applied by a replay
    dup_floor: int = 0
    #: fingerprint (xxh64 of the payload) of the batch ``expected - 1``
    last_fp: int | None = None
    replay: ReplayClient | None = None
    #: the start-up catch-up is over (applied, or given up): live batches are being followed
    caught_up: bool = False
    _task: asyncio.Task[None] | None = None
    _monitor_task: asyncio.Task[None] | None = None
    _sock: zmq.asyncio.Socket | None = None
    _model_seen: bool = False
    _disconnected: bool = False
    _reconnected: bool = False

    def __post_init__(self) -> None:
        if self.replay_url is not None and self.replay is None:
            self.replay = ReplayClient(self.ctx, self.replay_url, self.replay_timeout, self.replay_retries,
                                       self._count_replay)

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
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(self.url)
        self._sock = sock
        self._monitor_task = asyncio.get_running_loop().create_task(self._watch(monitor))
        try:
            await self._catch_up()
            self.caught_up = True
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
            if self._monitor_task is not None:
                self._monitor_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._monitor_task
            with contextlib.suppress(Exception):
                sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            self._sock = None

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Notes a dropped-and-restored PUB connection: what was published meanwhile is lost,
        and the peer may be a different (restarted) engine."""
        while True:
            try:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
            except (zmq.ZMQError, RuntimeError):
                return
            if event == zmq.EVENT_DISCONNECTED:
                self._disconnected = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self._disconnected:
                self._disconnected = False
                self._reconnected = True

    async def _catch_up(self) -> None:
        """Replay the engine's buffered history (from 0) before following the live stream."""
        if self.replay is None:
            self.index.recovery.start(self.endpoint)  # the engine's earlier history is unknown
            return
        res = await self.replay.fetch(0)
        if res is None:
            self.index.recovery.start(self.endpoint)
            return
        self.expected = 0
        self._apply_all(res.batches)
        self.dup_floor = res.batches[0].seq if res.batches else 0
        if res.outcome == "truncated":
            self.index.recovery.start(self.endpoint)

    async def handle(self, topic: bytes, seq_frame: bytes, payload: bytes) -> None:
        """One live batch."""
        try:
            seq = decode_seq(seq_frame)
        except EventDecodeError:
            self._count_decode_error()
            return
        reconnected, self._reconnected = self._reconnected, False
        if reconnected:
            self.stats.reconnects += 1
        expected = self.expected
        if expected is None or (seq == expected and not reconnected):
            pass
        elif not reconnected and self.dup_floor <= seq < expected:
            self.stats.duplicates += 1  # already applied through a replay
            return
        elif not await self._recover(seq, reconnected):
            return
        self._apply(topic, seq, payload)
        self.dup_floor = seq + 1

    async def _recover(self, seq: int, reconnected: bool) -> bool:
        """The live batch ``seq`` does not follow the last applied one (or the connection was
        re-established): bring the index in line with the engine before applying it. False
        when the live batch turned out to be applied already."""
        expected = self.expected
        assert expected is not None
        if seq > expected:
            self.stats.gaps += 1
            if self.metrics is not None:
                self.metrics.kv_events_gaps.inc()
            log.debug("kv-event gap", extra={"endpoint": self.endpoint, "expected": expected, "got": seq})
        if seq < expected and not (reconnected and seq >= self.dup_floor):
            await self._restarted(seq)
            return True
        reason = "gap" if seq > expected else "reconnect"
        replay = self.replay
        if replay is None or not replay.available():
            if seq > expected or (seq < expected and reconnected):
                self._resync(reason)
            return True  # a reconnect with the expected sequence and no replay: nothing to check
        start = expected - 1 if expected > 0 and self.last_fp is not None else expected
        res = await replay.fetch(start, retries=1)
        if res is None:
            self._resync(reason)
            return True
        batches = res.batches
        if start < expected and batches and batches[0].seq == start:
            if xxh64_intdigest(batches[0].payload) != self.last_fp:
                await self._restarted(seq)  # a different engine answers for the same number
                return True
            batches = batches[1:]
        elif res.outcome == "truncated" or not batches:
            # the buffer does not reach back to the last applied batch: nothing proves the
            # engine is the one we followed; rebuild from what it holds
            self._resync(reason)
            self._apply_all([b for b in batches if b.seq < seq])
            return True
        self._apply_all([b for b in batches if expected <= b.seq < seq])
        return seq >= expected

    async def _restarted(self, seq: int) -> None:
        self.stats.restarts += 1
        log.debug("kv-event engine restart", extra={"endpoint": self.endpoint, "expected": self.expected,
                                                     "got": seq})
        self._resync("restart")
        if self.replay is not None and self.replay.available():
            res = await self.replay.fetch(0, retries=1)
            if res is not None:
                self._apply_all([b for b in res.batches if b.seq < seq])

    def _resync(self, reason: str) -> None:
        self.stats.resyncs += 1
        if self.metrics is not None:
            self.metrics.kv_events_resyncs.labels(reason).inc()
        self.index.clear_endpoint(self.endpoint)
        self.expected = None
        self.last_fp = None
        self.dup_floor = 0

    def _count_replay(self, outcome: str) -> None:
        self.stats.replays += 1
        if outcome not in ("ok", "truncated"):
            self.stats.replay_failures += 1
        if self.metrics is not None:
            self.metrics.kv_events_replays.labels(outcome).inc()

    def _count_decode_error(self) -> None:
        self.stats.decode_errors += 1
        if self.metrics is not None:
            self.metrics.kv_events_decode_errors.inc()

    def _apply_all(self, batches: list[Batch]) -> None:
        for b in batches:
            self._apply(b.topic, b.seq, b.payload)

    def _apply(self, topic: bytes, seq: int, payload: bytes) -> None:
        if self.expected is None:
            self.dup_floor = seq
        self.expected = seq + 1
        self.last_fp = xxh64_intdigest(payload)
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
