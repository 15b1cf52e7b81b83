"""The subscriber over real ZMQ sockets: ordered apply, gap → replay, gap without replay →
resync, engine restart, late start catching up from the replay buffer, purge on removal."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest

from epp.datalayer.kvevents.index import block_keys
from epp.datalayer.kvevents.manager import PORT_LABEL, REPLAY_PORT_LABEL, KVEventsConfig, event_ports
from epp.framework.datalayer import Endpoint

from .conftest import FakePublisher, eventually, make_scorer, removed, stored

BS = 4
KEY = "127.0.0.1:8000"
T = list(range(1000, 1040))  # 10 blocks


def keys(n: int) -> list[int]:
    return block_keys(T[: n * BS], BS)


@pytest.fixture
async def pub() -> AsyncIterator[FakePublisher]:
    p = FakePublisher()
    yield p
    await p.close()


def endpoint(pub: FakePublisher, replay: bool = True) -> Endpoint:
    labels = {PORT_LABEL: str(pub.port)}
    if replay and pub.replay_port:
        labels[REPLAY_PORT_LABEL] = str(pub.replay_port)
    return Endpoint("pod", "127.0.0.1", 8000, labels=labels)




async def test_gap_is_filled_from_the_replay_socket(pub: FakePublisher) -> None:
    pub.buffer_only([stored([1, 2], T[:8], BS)])  # seq 0: published before the picker started
    scorer, _, metrics = make_scorer([endpoint(pub)], blockSizeTokens=BS)
    await scorer.start()
    try:
        idx = scorer.index
        # late start: the history is replayed from 0
        assert await eventually(lambda: idx.match(keys(2)) == {KEY: 2.0})
        sub = scorer.manager.subscribers[KEY]  # type: ignore[union-attr]
        assert await eventually(lambda: sub.expected == 1)
        await pub.send([stored([3], T[8:12], BS, parent=2)])  # seq 1, live
        assert await eventually(lambda: idx.match(keys(3)) == {KEY: 3.0})
        pub.buffer_only([stored([4], T[12:16], BS, parent=3)])  # seq 2 lost on the wire
        await pub.send([stored([5], T[16:20], BS, parent=4)])  # seq 3 reveals the gap
        assert await eventually(lambda: idx.match(keys(5)) == {KEY: 5.0})
        # the gap replay starts at the last applied batch, to prove the engine is the same one
        assert sub.stats.gaps == 1 and sub.stats.resyncs == 0 and pub.replay_requests == [0, 1]
        assert metrics.kv_events_gaps._value.get() == 1
    finally:
        await scorer.close()


async def test_catch_up_reads_a_full_default_replay_buffer() -> None:
    # vLLM keeps 10,000 batches; streaming them takes longer than the replay timeout, and the
    # engine's ROUTER drops what the receiver cannot queue: every batch must still arrive, in
    # order, and the outcome must say so
    n = 10_000
    pub = FakePublisher(pace_every=5000, pace=0.4)
    tokens = list(range(5000, 5000 + n * BS))
    for i in range(n):
        pub.buffer_only([stored([i + 1], tokens[i * BS:(i + 1) * BS], BS, parent=i or None)])
    scorer, _, metrics = make_scorer([endpoint(pub)], blockSizeTokens=BS, replayTimeout="500ms")
    await scorer.start()
    try:
        sub = scorer.manager.subscribers[KEY]  # type: ignore[union-attr]
        assert await eventually(lambda: sub.caught_up, within=30)
        assert sub.expected == n and scorer.index.entries == n and scorer.index.stats.orphans == 0
        assert scorer.index.match(block_keys(tokens, BS)) == {KEY: float(n)}
        assert metrics.kv_events_replays.labels("ok")._value.get() == 1
    finally:
        await scorer.close()
        await pub.close()


async def test_replay_holes_are_not_ok() -> None:
    pub = FakePublisher()
    pub.buffer_only([stored([1], T[:4], BS)])
    pub.buffer_only([stored([2], T[4:8], BS, parent=1)])
    pub.buffer_only([stored([3], T[8:12], BS, parent=2)])
    del pub.buffer[1]  # the engine's answer skips seq 1
    scorer, _, metrics = make_scorer([endpoint(pub)], blockSizeTokens=BS, replayTimeout="300ms",
                                     replayRetries=1)
    await scorer.start()
    try:
        sub = scorer.manager.subscribers[KEY]  # type: ignore[union-attr]
        assert await eventually(lambda: sub.caught_up)
        assert metrics.kv_events_replays.labels("incomplete")._value.get() == 2  # tried, retried
        assert metrics.kv_events_replays.labels("ok")._value.get() == 0
        assert scorer.index.entries == 0 and sub.expected is None  # nothing half-applied
    finally:
        await scorer.close()
        await pub.close()


async def test_gap_without_replay_resyncs_the_pod() -> None:
    pub = FakePublisher(replay=False)
    scorer, _, metrics = make_scorer([endpoint(pub, replay=False)], blockSizeTokens=BS)
    await scorer.start()
    try:
        idx = scorer.index
        await first_batch(pub, lambda: bool(idx.match(keys(2))))
        pub.buffer_only([removed([1])])  # lost: the picker would keep a block the pod evicted
        await pub.send([stored([9], [7, 7, 7, 7], BS)])
        assert await eventually(lambda: metrics.kv_events_resyncs.labels("gap")._value.get() == 1)
        assert idx.match(keys(2)) == {}  # the stale blocks are gone; the new batch is applied
        assert idx.match(block_keys([7, 7, 7, 7], BS)) == {KEY: 1.0}
        assert metrics.kv_events_resyncs.labels("gap")._value.get() == 1
    finally:
        await scorer.close()
        await pub.close()




async def first_batch(pub: FakePublisher, arrived: Callable[[], bool], within: float = 5.0) -> None:
    """PUB/SUB joins asynchronously (a batch published before is dropped): publish the first
    batch (sequence 0) again until it arrives."""
    deadline = time.monotonic() + within
    while not arrived():
        assert time.monotonic() < deadline, "the subscriber never received a batch"
        pub.restart()
        await pub.send([stored([1, 2], T[:8], BS)])
        await eventually(arrived, within=0.2)


async def test_engine_restart_drops_the_old_view(pub: FakePublisher) -> None:
    scorer, _, _ = make_scorer([endpoint(pub)], blockSizeTokens=BS)
    await scorer.start()
    try:
        idx = scorer.index
        sub = scorer.manager.subscribers[KEY]  # type: ignore[union-attr]
        assert await eventually(lambda: sub.expected == 0)  # caught up on an empty history
        for i in range(3):
            await pub.send([stored([10 + i], T[i * BS:(i + 1) * BS], BS, parent=None if i == 0 else 9 + i)])
        assert await eventually(lambda: idx.match(keys(3)) == {KEY: 3.0})
        pub.restart()  # a fresh engine: empty cache, sequence from 0
        await pub.send([stored([50], [9, 9, 9, 9], BS)])
        assert await eventually(lambda: idx.match(block_keys([9, 9, 9, 9], BS)) == {KEY: 1.0})
        assert sub.stats.restarts == 1 and idx.match(keys(3)) == {}
    finally:
        await scorer.close()


async def test_removed_endpoint_is_purged_and_unsubscribed(pub: FakePublisher) -> None:
    scorer, ds, _ = make_scorer([endpoint(pub)], blockSizeTokens=BS)
    await scorer.start()
    try:
        sub = scorer.manager.subscribers[KEY]  # type: ignore[union-attr]
        assert await eventually(lambda: sub.expected == 0)
        await pub.send([stored([1, 2], T[:8], BS)])
        assert await eventually(lambda: scorer.index.match(keys(2)) == {KEY: 2.0})
        ds.clear()
        assert scorer.index.match(keys(2)) == {} and scorer.manager.subscribers == {}  # type: ignore[union-attr]
    finally:
        await scorer.close()


def test_event_port_resolution() -> None:
    ep = Endpoint("p", "10.0.0.1", 8000)
    assert event_ports(ep, KVEventsConfig()) == (5557, None)
    assert event_ports(ep, KVEventsConfig(port_offset=-2443, replay_port_offset=-2442)) == (5557, 5558)
    ep.labels = {PORT_LABEL: "6000", REPLAY_PORT_LABEL: "6001"}
    assert event_ports(ep, KVEventsConfig(port_offset=1)) == (6000, 6001)
