"""The HTTP face of one simulated pod: vLLM's OpenAI server routes, byte formats and errors.

Everything a router or client can observe is shaped like vLLM 0.32's OpenAI server: the SSE
framing (``data: {json}\\n\\n`` per token, optional usage chunk, ``data: [DONE]``), usage with
``prompt_tokens_details.cached_tokens``, ``kv_transfer_params`` on P/D prefill responses,
``{"error": {...}}`` bodies, the admin routes (LoRA load/unload, ``/reset_prefix_cache``), and
``/metrics``. Every response names the serving pod (``x-inference-pod``/``-port``/``-namespace``)
so tests and benchmarks can assert where the picker sent a request.

Request validation is :mod:`epp.sim.openai_request`, response bytes (bodies and the SSE frame
templates) :mod:`epp.sim.openai_response`; this module routes, runs the request through the
engine and writes.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from epp.sim.config import LoraModule, SimConfig
from epp.sim.engine import Engine, QueueFullError
from epp.sim.errors import FAILURE_TYPES, error_body, missing_field_body
from epp.sim.metrics import MetricsPage, cache_config_labels
from epp.sim.openai_request import ParsedRequest, RequestError, parse_completion
from epp.sim.openai_response import DONE, StreamFrames, completion_body
from epp.sim.sequence import Sequence
from epp.sim.tokenizer import Tokenizer

KV_BYTES_PER_TOKEN = 131072  # Llama-3.1-8B bf16: 2 x 32 layers x 8 KV heads x 128 x 2 bytes
_JSON = "application/json"
_METRICS_CT = "text/plain; version=0.0.4; charset=utf-8"


def _duplicate_message(name: str) -> str:
    return (f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
            "set 'load_inplace' to True.")


@dataclass(slots=True)
class Identity:
    """Who this pod is, as the response headers and KV-event topic tell it."""

    name: str
    namespace: str
    host: str
    port: int

    def headers(self) -> dict[str, str]:
        return {
            "x-inference-pod": self.name,
            "x-inference-port": str(self.port),
            "x-inference-namespace": self.namespace,
        }


@dataclass(slots=True)
class PodServer:
    """Request handling for one pod; owns nothing but references to the pod's parts."""

    config: SimConfig
    engine: Engine
    tokenizer: Tokenizer
    identity: Identity
    out_texts: list[bytes]
    kv_event_endpoint: str | None = None
    kv_replay_endpoint: str | None = None
    rng: random.Random = field(default_factory=random.Random)
    metrics: MetricsPage = field(init=False)
    _out_strs: list[str] = field(default_factory=list)
    _headers: dict[str, str] = field(default_factory=dict)
    _created: int = 0

    def __post_init__(self) -> None:
        cfg = self.config
        self.metrics = MetricsPage(
            cfg.model_name,
            cache_config_labels(cfg.block_size, cfg.num_gpu_blocks, cfg.enable_prefix_caching,
                                cfg.gpu_memory_utilization, cfg.max_model_len, KV_BYTES_PER_TOKEN),
            cfg.histogram_refresh,
        )
        self._out_strs = [orjson.loads(t) for t in self.out_texts]
        self._headers = self.identity.headers()
        self._created = int(time.time())
        self.rng.seed(cfg.seed ^ self.identity.port)

    # ------------------------------------------------------------------ app
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions/render", self.completions_render)
        app.router.add_post("/v1/chat/completions/render", self.chat_completions_render)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/version", self.version)
        app.router.add_get("/kv_event_sources", self.kv_event_sources)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        app.router.add_post("/v1/load_lora_adapter", self.load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self.unload_lora)
        app.router.add_get("/sim/stats", self.sim_stats)
        return app

    def _json(self, body: bytes, status: int = 200) -> web.Response:
        return web.Response(body=body, status=status, content_type=_JSON, headers=self._headers)

    def _error(self, status: int, message: str, param: str | None = None) -> web.Response:
        return self._json(error_body(status, message, param), status)

    # ------------------------------------------------------------------ simple routes
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200, headers=self._headers)

    async def version(self, request: web.Request) -> web.Response:
        return self._json(b'{"version":"0.32.0"}')

    async def metrics_page(self, request: web.Request) -> web.Response:
        body = self.metrics.render(self.engine.gauges(), self.engine.stats)
        return web.Response(body=body, headers={**self._headers, "content-type": _METRICS_CT})

    async def models(self, request: web.Request) -> web.Response:
        cfg = self.config
        root = cfg.model_path or cfg.model_name
        perm = [{"id": "modelperm-sim", "object": "model_permission", "created": self._created,
                 "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                 "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                 "organization": "*", "group": None, "is_blocking": False}]
        data: list[dict[str, Any]] = [
            {"id": name, "object": "model", "created": self._created, "owned_by": "vllm", "root": root,
             "parent": None, "max_model_len": cfg.max_model_len, "permission": perm}
            for name in cfg.served_model_names
        ]
        for lora in self.engine.lora.registry.values():
            data.append({"id": lora.name, "object": "model", "created": self._created, "owned_by": "vllm",
                         "root": lora.path, "parent": lora.base_model_name or cfg.model_name,
                         "max_model_len": None, "permission": perm})
        return self._json(orjson.dumps({"object": "list", "data": data}))

    async def kv_event_sources(self, request: web.Request) -> web.Response:
        src: dict[str, Any] = {}
        if self.kv_event_endpoint:
            src["0"] = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": self.kv_event_endpoint,
                        "replay_endpoint": self.kv_replay_endpoint,
                        "buffer_steps": self.config.kv_events_buffer_steps, "hwm": 100000,
                        "max_queue_size": 100000,
                        "topic": self.engine.publisher.topic if self.engine.publisher else ""}
        return self._json(orjson.dumps(src))

    async def sim_stats(self, request: web.Request) -> web.Response:
        """Simulator only (not a vLLM route, so not on ``/metrics``): counts a benchmark needs
        that vLLM does not export, e.g. adapter reads from disk whatever the routing policy."""
        lora = self.engine.lora
        return self._json(orjson.dumps({"lora_disk_reads": lora.disk_reads, "lora_gpu_loads": lora.gpu_loads,
                                        "lora_registered": len(lora.registry)}))

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        self.engine.reset_prefix_cache()
        return web.Response(status=200, headers=self._headers)

    async def _admin_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise RequestError(400, f"Invalid JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError(400, "Request body must be a JSON object")
        return body

    async def load_lora(self, request: web.Request) -> web.Response:
        """``POST /v1/load_lora_adapter`` with vLLM 0.32's checks, order and bodies
        (``tests/data/vllm_runtime_lora.json``): the directory must hold an adapter
        (``adapter_config.json``), the load takes ``lora_load_time`` with the engine paused."""
        try:
            body = await self._admin_body(request)
        except RequestError as e:
            return self._error(e.status, e.message)
        for key in ("lora_name", "lora_path"):
            if not isinstance(body.get(key), str):
                return self._json(missing_field_body(key, body), 400)
        name, path = body["lora_name"], body["lora_path"]
        inplace = body.get("load_inplace") is True
        if name in self.engine.lora.registry and not inplace:
            return self._json(error_body(400, _duplicate_message(name), type_="InvalidUserInput"), 400)
        if not await asyncio.to_thread(os.path.isfile, os.path.join(path, "adapter_config.json")):
            return self._error(404, f"Loading lora {name} failed: No adapter found for {path}")
        if not await self.engine.load_lora_runtime(LoraModule(name, path, self.config.model_name), inplace):
            return self._json(error_body(400, _duplicate_message(name), type_="InvalidUserInput"), 400)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.", headers=self._headers)

    async def unload_lora(self, request: web.Request) -> web.Response:
        try:
            body = await self._admin_body(request)
        except RequestError as e:
            return self._error(e.status, e.message)
        name = body.get("lora_name")
        if not isinstance(name, str):
            return self._json(missing_field_body("lora_name", body), 400)
        if not self.engine.unload_lora(name):
            return self._error(404, f"The lora adapter '{name}' cannot be found.")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.", headers=self._headers)

    # ------------------------------------------------------------------ completions
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    # ------------------------------------------------------------------ render (vLLM scale-out API)
    async def completions_render(self, request: web.Request) -> web.Response:
        """``POST /v1/completions/render``: the prompt as the engine would see it, without running
        it (vLLM serves this with ``--enable-scale-out``; routers such as vllm-router tokenize
        through it). vLLM answers a list with one entry per prompt."""
        return await self._render(request, chat=False)

    async def chat_completions_render(self, request: web.Request) -> web.Response:
        """``POST /v1/chat/completions/render``: the chat template applied and tokenized."""
        return await self._render(request, chat=True)

    async def _render(self, request: web.Request, chat: bool) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return self._error(400, f"Invalid JSON body: {exc}")
        try:
            req = self._parse(body, chat)
        except RequestError as e:
            return self._error(e.status, e.message, e.param)
        seq = req.seq
        doc = {
            "request_id": seq.request_id,
            "model": req.model,
            "token_ids": seq.token_ids,
            "sampling_params": {"max_tokens": seq.max_tokens},
        }
        payload = orjson.dumps(doc if chat else [doc])
        return web.Response(body=payload, content_type="application/json", headers=self._headers)

    def _injected_failure(self, request: web.Request) -> web.Response | None:
        forced = request.headers.get("x-return-error")
        if forced is not None:
            try:
                status = int(forced.strip())
            except ValueError:
                status = 0
            if 400 <= status <= 599:
                return self._error(status, f"Simulated error (x-return-error: {status})")
        cfg = self.config
        if cfg.failure_injection_rate > 0 and self.rng.random() * 100.0 < cfg.failure_injection_rate:
            status, message = FAILURE_TYPES[self.rng.choice(cfg.failure_types)]
            return self._error(status, message)
        return None

    def _parse(self, body: Any, chat: bool) -> ParsedRequest:
        engine = self.engine
        return parse_completion(body, chat, self.config, self.tokenizer, engine.lora.registry, engine.lora.ids)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        cfg = self.config
        if cfg.added_latency > 0:
            await asyncio.sleep(cfg.added_latency)
        failed = self._injected_failure(request)
        if failed is not None:
            return failed
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self._error(400, f"Invalid JSON body: {exc}")
        try:
            req = self._parse(body, chat)
        except RequestError as e:
            return self._error(e.status, e.message, e.param)
        seq = req.seq
        engine = self.engine
        if seq.remote_prefill:
            await self._transfer(seq)
        elif cfg.prefill_overhead > 0:
            await asyncio.sleep(cfg.prefill_overhead * cfg.time_scale)
        try:
            engine.submit(seq)
        except QueueFullError:
            return self._error(429, "The simulated server's waiting queue is full.")
        try:
            if req.stream:
                return await self._stream(request, seq, req.model, chat, req.include_usage)
            return await self._complete(seq, req.model, chat)
        finally:
            if not seq.finished:
                engine.abort(seq)

    async def _transfer(self, seq: Sequence) -> None:
        """P/D decode leg: the prompt's KV arrives over the (simulated) NIXL side channel."""
        cfg = self.config
        engine = self.engine
        tokens = max(0, seq.prompt_len - 1 - engine.cached_prefix_tokens(seq.token_ids, seq.lora))
        delay = (cfg.kv_transfer_overhead + tokens * cfg.kv_transfer_time_per_token) * cfg.time_scale
        engine.transferring += 1
        try:
            await asyncio.sleep(delay)
        finally:
            engine.transferring -= 1

    async def _wait(self, seq: Sequence, have: int) -> None:
        """Until the sequence has more than ``have`` tokens or finished."""
        while seq.generated <= have and not seq.finished:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            seq.waiter = fut
            try:
                await fut
            finally:
                seq.waiter = None

    async def _complete(self, seq: Sequence, model: str, chat: bool) -> web.Response:
        await self._wait(seq, seq.max_tokens)
        if seq.finish_reason == "abort":
            return self._error(500, "Request aborted (simulated pod stopping).")
        strs = self._out_strs
        n = len(strs)
        text = "".join(strs[i % n] for i in range(seq.generated))
        return self._json(completion_body(seq, model, chat, text))

    async def _stream(
        self, request: web.Request, seq: Sequence, model: str, chat: bool, include_usage: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=self._headers)
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        resp.headers["cache-control"] = "no-cache"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        frames = StreamFrames.build(seq, model, chat)
        head, mid, last, role = frames.head, frames.mid, frames.last, frames.role
        texts = self.out_texts
        n_texts = len(texts)
        sent = 0
        final = seq.max_tokens - 1
        while True:
            await self._wait(seq, sent)
            g = seq.generated
            if g > sent:
                parts: list[bytes] = []
                if sent == 0 and role:
                    parts.append(role)
                for i in range(sent, g):
                    parts.append(head)
                    parts.append(texts[i % n_texts])
                    parts.append(last if i == final else mid)
                sent = g
                await resp.write(b"".join(parts))
            if seq.finished:
                break
        if seq.finish_reason == "abort":
            return resp  # pod stopping: the connection is closed without [DONE]
        await resp.write((frames.usage_frame(seq) if include_usage else b"") + DONE)
        await resp.write_eof()
        return resp
