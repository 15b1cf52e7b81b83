"""The decode-side P/D sidecar: an HTTP proxy in front of the local vLLM engine.

Without ``x-prefiller-host-port`` it is a plain streaming proxy (every path: completions,
``/metrics``, ``/health``, ``/v1/models``, ...). With it, on the completion APIs, it runs the
connector's flow; for NIXL v2 (vLLM's ``NixlConnector``, the default):

1. prefill leg → ``http://<prefiller><same path>``: the client's body with
   ``kv_transfer_params = {do_remote_decode: true, do_remote_prefill: false, remote_*: null}``,
   ``stream: false``, no ``stream_options``, token limit 1 (``max_tokens``; chat also
   ``max_completion_tokens``; Responses API ``max_output_tokens``);
2. the prefiller answers 400–451 → that response goes to the client as is (the request is
   bad, decoding it locally would fail the same way); 5xx, a connection error or the timeout
   → decode locally with the client's original body (the request still succeeds, just not
   disaggregated);
3. decode leg → local engine: the client's body (its own ``stream``, ``stream_options`` and
   token limits) plus the ``kv_transfer_params`` the prefiller returned; its response is
   streamed to the client.

Both legs carry the same ``x-request-id`` (the client's, or a new UUID). ``lmcache``: prefill
leg with token limit 1, then the original body to decode (LMCache moves the KV out of band).
``sglang``: both legs at once with ``bootstrap_host/port/room`` (SGLang's PD protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from epp.pd.allowlist import PrefillAllowlist, normalize_hostport

log = logging.getLogger(__name__)

PREFILLER_HEADER = "x-prefiller-host-port"
REQUEST_ID_HEADER = "x-request-id"
PD_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
CONNECTORS = ("nixlv2", "lmcache", "sglang")

#: request headers not forwarded (hop-by-hop, or recomputed per leg)
_DROP_REQUEST = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", PREFILLER_HEADER,
})
#: response headers not relayed (hop-by-hop; length is set from the upstream separately)
_DROP_RESPONSE = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "te", "trailer", "transfer-encoding",
    "upgrade", "content-length",
})


def nixl_prefill_params() -> dict[str, Any]:
    """What the prefiller must see: "compute the prompt, keep the KV for a remote decoder"."""
    return {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}


def prefill_body(body: dict[str, Any], path: str) -> dict[str, Any]:
    """The prefill leg: non-streaming, one output token."""
    out = dict(body)
    out["stream"] = False
    out.pop("stream_options", None)
    if path.endswith("/responses"):
        out["max_output_tokens"] = 1
    else:
        out["max_tokens"] = 1
        if path.endswith("/chat/completions") or "max_completion_tokens" in out:
            out["max_completion_tokens"] = 1
    return out


def _error(status: int, message: str, code: str = "") -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": code or "sidecar_error", "code": status}})
    return web.Response(status=status, body=body, content_type="application/json")


@dataclass(slots=True)
class SidecarConfig:
    decoder_url: str = "http://127.0.0.1:8001"
    connector: str = "nixlv2"
    prefill_timeout: float = 60.0
    connect_timeout: float = 10.0
    #: pick one of several comma-separated prefillers at random (else the first)
    prefiller_sampling: bool = False
    prefiller_scheme: str = "http"
    sglang_bootstrap_port: int = 8998
    allowlist: PrefillAllowlist = field(default_factory=PrefillAllowlist)
    pool_poll_interval: float = 1.0


@dataclass(slots=True)
class Stats:
    """Counts for logs and tests (the sidecar's /metrics path belongs to the engine)."""

    direct: int = 0
    disaggregated: int = 0
    fallback: int = 0
    prefill_rejected: int = 0
    forbidden: int = 0


class PDSidecar:
    def __init__(self, config: SidecarConfig) -> None:
        if config.connector not in CONNECTORS:
            raise ValueError(f"unknown connector {config.connector!r}; known: {', '.join(CONNECTORS)}")
        self.config = config
        self.stats = Stats()
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random()
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        for p in PD_PATHS:
            app.router.add_post(p, self.completion)
        app.router.add_route("*", "/{tail:.*}", self.passthrough)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout),
            auto_decompress=False,
        )
        if self.config.allowlist.pool_file is not None:
            self._spawn(self.config.allowlist.follow(self.config.pool_poll_interval))

    async def _stop(self, app: web.Application) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._session is not None:
            await self._session.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "sidecar app not started"
        return self._session

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _forward_headers(request: web.Request, request_id: str | None = None) -> dict[str, str]:
        out = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        if request_id is not None:
            for k in [k for k in out if k.lower() == REQUEST_ID_HEADER]:
                del out[k]
            out[REQUEST_ID_HEADER] = request_id
        return out

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers.items():
            if k.lower() not in _DROP_RESPONSE:
                resp.headers.add(k, v)
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _to_decoder(self, request: web.Request, body: bytes, headers: dict[str, str]) -> web.StreamResponse:
        url = self.config.decoder_url + request.rel_url.path_qs
        try:
            upstream = await self.session.request(request.method, url, data=body, headers=headers,
                                                  allow_redirects=False)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("local engine %s unreachable: %s", self.config.decoder_url, exc)
            return _error(502, f"the local model server is unreachable: {exc}", "bad_gateway")
        # A failure after the response started (engine died mid-stream) propagates: aiohttp
        # then cuts the client connection, which is what the client must see.
        async with upstream:
            return await self._relay(request, upstream)

    def _choose_prefiller(self, value: str) -> str:
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            return ""
        if self.config.prefiller_sampling and len(items) > 1:
            return self._rng.choice(items)
        return items[0]

    # ------------------------------------------------------------------ routes
    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.stats.direct += 1
        return await self._to_decoder(request, body, self._forward_headers(request))

    async def completion(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        target = self._choose_prefiller(request.headers.get(PREFILLER_HEADER, ""))
        if not target:
            self.stats.direct += 1
            return await self._to_decoder(request, raw, self._forward_headers(request))
        try:
            normalize_hostport(target)
        except ValueError:
            self.stats.forbidden += 1
            return _error(400, f"invalid {PREFILLER_HEADER} value", "invalid_request_error")
        if not self.config.allowlist.allows(target):
            self.stats.forbidden += 1
            log.warning("prefill target %s is not in the allowlist: request rejected", target)
            return _error(403, "the prefill target is not an allowed pool member", "forbidden")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):  # let the engine produce its own 400
            self.stats.direct += 1
            return await self._to_decoder(request, raw, self._forward_headers(request))
        rid = request.headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4())
        headers = self._forward_headers(request, rid)
        if self.config.connector == "sglang":
            return await self._sglang(request, target, body, headers)
        return await self._two_phase(request, target, raw, body, headers)

    async def _two_phase(self, request: web.Request, target: str, raw: bytes, body: dict[str, Any],
                         headers: dict[str, str]) -> web.StreamResponse:
        """nixlv2 and lmcache: prefill leg, then decode leg."""
        path = request.rel_url.path
        leg = prefill_body(body, path)
        nixl = self.config.connector == "nixlv2"
        if nixl:
            leg["kv_transfer_params"] = nixl_prefill_params()
        url = f"{self.config.prefiller_scheme}://{target}{request.rel_url.path_qs}"
        timeout = aiohttp.ClientTimeout(total=self.config.prefill_timeout,
                                        sock_connect=self.config.connect_timeout)
        try:
            async with self.session.post(url, data=orjson.dumps(leg), headers={
                    **headers, "content-type": "application/json"}, timeout=timeout) as pre:
                status = pre.status
                pre_body = await pre.read()
                pre_headers = {k: v for k, v in pre.headers.items() if k.lower() not in _DROP_RESPONSE}
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("prefill on %s failed (%s): decoding locally", target, exc or type(exc).__name__)
            self.stats.fallback += 1
            return await self._to_decoder(request, raw, headers)
        if 400 <= status <= 451:
            self.stats.prefill_rejected += 1
            return web.Response(status=status, body=pre_body, headers=pre_headers)
        if status >= 300:
            log.warning("prefill on %s answered %d: decoding locally", target, status)
            self.stats.fallback += 1
            return await self._to_decoder(request, raw, headers)
        if not nixl:
            self.stats.disaggregated += 1
            return await self._to_decoder(request, raw, headers)
        try:
            doc = orjson.loads(pre_body)
        except orjson.JSONDecodeError:
            doc = None
        params = doc.get("kv_transfer_params") if isinstance(doc, dict) else None
        if not isinstance(params, dict):
            log.warning("prefill on %s returned no kv_transfer_params: decoding locally", target)
            self.stats.fallback += 1
            return await self._to_decoder(request, raw, headers)
        decode = dict(body)
        decode["kv_transfer_params"] = params
        self.stats.disaggregated += 1
        return await self._to_decoder(request, orjson.dumps(decode), {**headers, "content-type": "application/json"})

    async def _sglang(self, request: web.Request, target: str, body: dict[str, Any],
                      headers: dict[str, str]) -> web.StreamResponse:
        """SGLang PD: prefill and decode at once, paired by bootstrap_room."""
        host, _ = normalize_hostport(target)
        boot = {"bootstrap_host": host, "bootstrap_port": self.config.sglang_bootstrap_port,
                "bootstrap_room": self._rng.getrandbits(63)}
        leg = {**body, **boot, "stream": False}
        leg.pop("stream_options", None)
        url = f"{self.config.prefiller_scheme}://{target}{request.rel_url.path_qs}"
        hdrs = {**headers, "content-type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self.config.prefill_timeout,
                                        sock_connect=self.config.connect_timeout)

        async def prefill() -> None:
            try:
                async with self.session.post(url, data=orjson.dumps(leg), headers=hdrs, timeout=timeout) as r:
                    await r.read()
                    if r.status >= 300:
                        log.warning("sglang prefill on %s answered %d", target, r.status)
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("sglang prefill on %s failed: %s", target, exc or type(exc).__name__)

        self._spawn(prefill())
        self.stats.disaggregated += 1
        return await self._to_decoder(request, orjson.dumps({**body, **boot}), hdrs)


async def serve(config: SidecarConfig, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Run until cancelled (tests embed the sidecar with this)."""
    sidecar = PDSidecar(config)
    runner = web.AppRunner(sidecar.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
