"""KV events decoded with a plain pyzmq + msgpack subscriber, compared with real vLLM frames."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from epp.sim import SimConfig, SimPod, SimPool
from epp.sim.kvcache import chain_digests, published_hash

from .conftest import DATA

STORED_KEYS = ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
               "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"]


def _real_events() -> list[dict[str, Any]]:
    out = []
    for line in (DATA / "vllm_kv_events_sample.txt").read_text().splitlines():
        line = line.strip()
        if line.startswith("[17"):
            out.extend(json.loads(line)[1])
    return out


PROBE = b"\x00test-probe"
"""Topic of the test's own marker messages (never a vLLM topic, which starts with ``kv@``)."""


class Subscriber:
    """A plain SUB socket on one sim pod's KV-event stream.

    Two waits are done with marker messages the test sends on the pod's own PUB socket (the
    sim exposes no public way to send a non-event; a marker leaves the pod's sequence numbers
    and replay buffer untouched):

    - ``joined``: ZMQ's "slow joiner": a PUB drops everything sent before the subscription
      has reached it. Markers are sent until one arrives; from then on nothing is lost.
    - ``drain``: messages on one PUB->SUB connection arrive in order, so once a marker sent
      *after* a response arrives, every batch the pod published before it has arrived too.
      That makes "nothing was published" checkable without waiting for a quiet period.
    """

    def __init__(self, pod: SimPod) -> None:
        assert pod.publisher is not None and pod.kv_events_endpoint
        self.pub = pod.publisher._pub
        assert self.pub is not None
        self.markers = 0
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(pod.kv_events_endpoint)

    def _send_marker(self) -> int:
        self.markers += 1
        assert self.pub is not None
        self.pub.send_multipart([PROBE, self.markers.to_bytes(8, "big"), b""])
        return self.markers

    async def joined(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 (a deadline)
        """Return once the subscription has reached the pod (a marker came through)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._send_marker()
            try:
                frames = await asyncio.wait_for(self.sock.recv_multipart(), 0.05)
            except TimeoutError:
                continue
            assert frames[0] == PROBE, "a batch arrived before the test asked for one"
            return
        raise AssertionError(f"the subscriber received no marker within {timeout}s")

    async def recv(self, wait: float = 5.0) -> tuple[bytes, int, list[Any]]:
        """The next batch (markers still in flight from ``joined`` are skipped)."""
        while True:
            frames = await asyncio.wait_for(self.sock.recv_multipart(), wait)
            if frames[0] != PROBE:
                break
        assert len(frames) == 3
        assert len(frames[1]) == 8
        return frames[0], int.from_bytes(frames[1], "big"), msgpack.unpackb(frames[2])

    async def drain(self, wait: float = 5.0) -> list[list[Any]]:
        """Every batch published up to now (see the class docstring)."""
        mark = self._send_marker()
        out: list[list[Any]] = []
        while True:
            frames = await asyncio.wait_for(self.sock.recv_multipart(), wait)
            if frames[0] == PROBE:
                if int.from_bytes(frames[1], "big") == mark:
                    return out
                continue  # an older marker (from ``joined``)
            assert len(frames) == 3 and len(frames[1]) == 8
            out.append(msgpack.unpackb(frames[2]))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


async def _complete(s: aiohttp.ClientSession, url: str, prompt: Any, max_tokens: int = 2) -> dict[str, Any]:
    r = await s.post(f"{url}/v1/completions", json={"model": "sim-model", "prompt": prompt,
                                                     "max_tokens": max_tokens})
    assert r.status == 200, await r.text()
    return await r.json()


@pytest.fixture
def ids_512() -> list[int]:
    for ev in _real_events():
        if ev["type"] == "BlockStored" and len(ev["token_ids"]) == 512:
            return list(ev["token_ids"])
    raise AssertionError("sample section 3 missing")


async def test_stream_shape_and_hashes_match_real_vllm(
    fast_config: SimConfig, http: aiohttp.ClientSession, ids_512: list[int]
) -> None:
    cfg = fast_config.replace(block_size=128)
    async with SimPool(cfg, replicas=1, kv_events_base_port=0) as pool:
        pod = pool.pods[0]
        sub = Subscriber(pod)
        try:
            await sub.joined()
            prompt = [*ids_512, 7, 8, 9]  # 515 tokens: 4 full blocks
            await _complete(http, pod.url, prompt)
            topic, seq, batch = await sub.recv()
            assert topic == f"kv@127.0.0.1:{pod.port}@sim-model".encode()
            assert seq == 0
            ts, events, rank = batch
            assert isinstance(ts, float) and rank == 0
            ev = events[0]
            real = next(e for e in _real_events() if e["type"] == "BlockStored" and len(e["token_ids"]) == 512)
            assert list(ev) == STORED_KEYS == list(real)
            # Same token ids -> the very hashes the real vLLM published.
            assert ev["block_hashes"] == real["block_hashes"]
            assert ev["parent_block_hash"] is None and ev["token_ids"] == ids_512
            assert ev["extra_keys"] == [None] * 4 and ev["medium"] == "GPU" and ev["lora_id"] is None

            # A second request whose full blocks are all cached publishes nothing.
            out = await _complete(http, pod.url, [*ids_512, 1, 2])
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 512
            assert await sub.drain() == []
        finally:
            sub.close()


async def test_decode_blocks_published_with_parent(fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    cfg = fast_config.replace(block_size=16)
    async with SimPool(cfg, replicas=1, kv_events_base_port=0) as pool:
        pod = pool.pods[0]
        sub = Subscriber(pod)
        try:
            await sub.joined()
            prompt = list(range(1000, 1040))  # 2 full blocks + 8 tokens
            await _complete(http, pod.url, prompt, max_tokens=20)
            events = [e for b in await sub.drain() for e in b[1]]
            stored = [e for e in events if e["type"] == "BlockStored"]
            hashes = [h for e in stored for h in e["block_hashes"]]
            assert len(hashes) == 3  # 40 prompt + 19 computed output tokens = 59 -> 3 full blocks
            assert stored[-1]["parent_block_hash"] == hashes[-2]
            assert stored[0]["token_ids"] == prompt[:32]
            assert hashes[:2] == [published_hash(d) for d in chain_digests(prompt, 16, None)]
        finally:
            sub.close()


async def test_eviction_emits_block_removed_and_reset_clears(
    fast_config: SimConfig, http: aiohttp.ClientSession
) -> None:
    cfg = fast_config.replace(block_size=16, num_gpu_blocks=20)  # 19 usable blocks
    async with SimPool(cfg, replicas=1, kv_events_base_port=0, kv_replay_base_port=0) as pool:
        pod = pool.pods[0]
        sub = Subscriber(pod)
        try:
            await sub.joined()
            for i in range(4):  # 8 full blocks each: the 3rd needs evictions
                await _complete(http, pod.url, [5000 * (i + 1) + j for j in range(128)], max_tokens=1)
            batches = await sub.drain()
            removed = [e for b in batches for e in b[1] if e["type"] == "BlockRemoved"]
            assert removed
            real_removed = next(e for e in _real_events() if e["type"] == "BlockRemoved")
            assert list(removed[0]) == list(real_removed)
            assert all(len(e["block_hashes"]) == 1 for e in removed)

            r = await http.post(f"{pod.url}/reset_prefix_cache")
            assert r.status == 200
            await _complete(http, pod.url, [1, 2, 3], max_tokens=1)  # published with the next step
            later = [e for b in await sub.drain() for e in b[1]]
            assert {"type": "AllBlocksCleared"} in later

            # Replay: DEALER asks from seq 1, gets every buffered batch >= 1 and the end marker.
            ctx = zmq.asyncio.Context()
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(pod.kv_replay_endpoint or "")
            try:
                await dealer.send_multipart([b"", (1).to_bytes(8, "big")])
                replies = []
                while True:
                    frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
                    assert frames[0] == b""
                    if frames[2] == b"\xff" * 8:
                        assert frames[1:] == [b"", b"\xff" * 8, b""]
                        break
                    replies.append(frames)
                n_live = len(batches) + 1
                assert [int.from_bytes(f[2], "big") for f in replies] == list(range(1, n_live))
                assert msgpack.unpackb(replies[0][3])[1] == batches[1][1]
            finally:
                dealer.close(linger=0)
                ctx.term()
        finally:
            sub.close()
