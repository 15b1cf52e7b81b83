"""Helpers for the precise prefix-cache tests: a controllable KV-event publisher, in-process
simulated pods, and a scorer wired to a datastore."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext
from epp.framework.scheduling import LLMRequest
from epp.metrics import EppMetrics
from epp.plugins.scheduling.precise_prefix_cache import PrecisePrefixCacheScorer, PrecisePrefixParams

END = b"\xff" * 8


class FakePublisher:
    """A vLLM-shaped PUB (+ ROUTER replay) whose sequence numbers the test controls: ``send``
    publishes live and buffers, ``buffer_only`` buffers without publishing (a lost message)."""

    def __init__(self, topic: str = "kv@fake@sim-model", replay: bool = True, pace_every: int = 0,
                 pace: float = 0.0) -> None:
        #: the replay answer pauses ``pace`` seconds after every ``pace_every`` batches (a
        #: large buffer streamed by a busy engine)
        self.pace_every = pace_every
        self.pace = pace
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.port = int(self.pub.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        self.topic = topic.encode()
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.router: zmq.asyncio.Socket | None = None
        self.replay_port: int | None = None
        self.replay_requests: list[int] = []
        self._task: asyncio.Task[None] | None = None
        if replay:
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind("tcp://127.0.0.1:*")
            self.replay_port = int(self.router.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
            self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        assert self.router is not None
        while True:
            ident, *rest = await self.router.recv_multipart()
            start = int.from_bytes(rest[-1], "big")
            self.replay_requests.append(start)
            sent = 0
            for seq, payload in self.buffer:
                if seq >= start:
                    await self.router.send_multipart([ident, b"", self.topic, seq.to_bytes(8, "big"), payload])
                    sent += 1
                    if self.pace_every and sent % self.pace_every == 0:
                        await asyncio.sleep(self.pace)
            await self.router.send_multipart([ident, b"", b"", END, b""])

    def _payload(self, events: list[Any]) -> bytes:
        return msgpack.packb([time.time(), events, 0])

    async def send(self, events: list[Any]) -> int:
        payload = self._payload(events)
        seq = self.seq
        self.buffer.append((seq, payload))
        await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        self.seq += 1
        return seq

    def buffer_only(self, events: list[Any]) -> None:
        self.buffer.append((self.seq, self._payload(events)))
        self.seq += 1

    def restart(self) -> None:
        self.seq = 0
        self.buffer.clear()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.ctx.destroy(linger=0)


def stored(hashes: list[int], tokens: list[int], block_size: int, parent: int | None = None,
           lora: str | None = None, medium: str = "GPU") -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": block_size, "lora_id": 1 if lora else None, "medium": medium, "lora_name": lora,
            "extra_keys": [[lora] if lora else None for _ in hashes], "group_idx": 0,
            "kv_cache_spec_kind": "full_attention"}


def removed(hashes: list[int], medium: str = "GPU") -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium, "group_idx": 0}


async def eventually(pred: Callable[[], bool], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


def make_scorer(endpoints: list[Endpoint], **params: Any) -> tuple[PrecisePrefixCacheScorer, Datastore, EppMetrics]:
    ds = Datastore()
    ds.replace_endpoints(endpoints)
    metrics = EppMetrics()
    params.setdefault("tokenizer", "builtin")  # simulated pods
    p = PrecisePrefixParams.model_validate(params)
    scorer = PrecisePrefixCacheScorer.from_config("precise", p, PluginContext(ds, metrics))
    return scorer, ds, metrics


def completion(prompt: str, model: str = "sim-model", **kw: Any) -> LLMRequest:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, **kw}
    return LLMRequest(request_id="r", target_model=model, incoming_model=model, api="completions", body=body)


def chat_request(messages: list[dict[str, Any]], model: str = "sim-model") -> LLMRequest:
    body = {"model": model, "messages": messages, "max_tokens": 1}
    return LLMRequest(request_id="r", target_model=model, incoming_model=model, api="chat/completions", body=body)
