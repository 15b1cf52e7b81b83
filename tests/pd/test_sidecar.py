"""The decode-side sidecar (`epp pd-sidecar`) against recording fake engines over loopback:
what each leg receives, what the client gets back, and every failure path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from epp.pd.allowlist import PrefillAllowlist
from epp.pd.proxy import PDSidecar, SidecarConfig, nixl_prefill_params
from tests.waiting import eventually

HOST = "127.0.0.1"
RETURNED = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [1, 2],
            "remote_engine_id": "eng-1", "remote_request_id": "x", "remote_host": "10.1.1.1",
            "remote_port": 5600, "tp_size": 1}


@dataclass
class Fake:
    """A recording model server. ``behave`` may return a Response to override the default."""

    name: str
    seen: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    behave: Callable[[Any], Any] | None = None
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw) if raw else None
        self.seen.append((request.path, {k.lower(): v for k, v in request.headers.items()}, body))
        if self.behave is not None:
            out = self.behave(body)
            if asyncio.iscoroutine(out):
                out = await out
            if out is not None:
                return out
        if request.method == "GET":
            return web.Response(text=f"metrics of {self.name}")
        doc: dict[str, Any] = {"served_by": self.name, "usage": {"prompt_tokens": 10}}
        if isinstance(body, dict) and (body.get("kv_transfer_params") or {}).get("do_remote_decode"):
            doc["kv_transfer_params"] = RETURNED
        if isinstance(body, dict) and body.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream", "x-served-by": self.name})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(b"data: " + orjson.dumps({"i": i}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response(doc, headers={"x-served-by": self.name})


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


@dataclass
class Rig:
    engine: Fake
    prefill: Fake
    sidecar: PDSidecar
    port: int

    @property
    def prefiller(self) -> str:
        return f"{HOST}:{self.prefill.port}"

    async def post(self, body: dict[str, Any], path: str = "/v1/chat/completions", prefiller: str | None = "",
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        hdrs = {"content-type": "application/json", **(headers or {})}
        if prefiller is not None:
            hdrs["x-prefiller-host-port"] = prefiller or self.prefiller
        async with aiohttp.ClientSession() as s, s.post(f"http://{HOST}:{self.port}{path}", data=orjson.dumps(body),
                                                        headers=hdrs, timeout=aiohttp.ClientTimeout(total=10)) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def make(**cfg: Any) -> Rig:
        fakes = []
        for name in ("engine", "prefill"):
            fake = Fake(name)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", fake.handle)
            runner, fake.port = await _serve(app)
            runners.append(runner)
            fakes.append(fake)
        engine, prefill = fakes
        allow = cfg.pop("allowlist", None)
        config = SidecarConfig(decoder_url=f"http://{HOST}:{engine.port}", **cfg)
        if allow is not None:
            config.allowlist = allow
        sidecar = PDSidecar(config)
        runner, port = await _serve(sidecar.app())
        runners.append(runner)
        return Rig(engine, prefill, sidecar, port)

    yield make
    for r in reversed(runners):
        await r.cleanup()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
        "max_completion_tokens": 50, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}


async def test_without_the_header_it_is_a_plain_proxy(make_rig: Callable[..., Any]) -> None:
    rig = await make_rig()
    status, headers, body = await rig.post(CHAT, prefiller=None)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert body.endswith(b"data: [DONE]\n\n")
    assert rig.prefill.seen == [] and rig.engine.seen[0][2] == CHAT
    async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{rig.port}/metrics") as r:
        assert await r.text() == "metrics of engine"  # every other path reaches the engine too


async def test_nixl_v2_prefill_leg_then_decode_leg_with_the_returned_params(make_rig: Callable[..., Any]) -> None:
    rig = await make_rig()
    status, headers, body = await rig.post(CHAT)
    assert status == 200 and headers["x-served-by"] == "engine"
    assert body.count(b"data: ") == 4  # the decode leg's stream reached the client
    (ppath, phdrs, pbody), = rig.prefill.seen
    assert ppath == "/v1/chat/completions"
    assert pbody["kv_transfer_params"] == nixl_prefill_params()
    assert pbody["stream"] is False and "stream_options" not in pbody
    assert pbody["max_tokens"] == 1 and pbody["max_completion_tokens"] == 1
    assert pbody["messages"] == CHAT["messages"] and pbody["temperature"] == 0
    (_, dhdrs, dbody), = rig.engine.seen
    assert dbody == {**CHAT, "kv_transfer_params": RETURNED}  # original stream/limits restored
    assert phdrs["x-request-id"] == dhdrs["x-request-id"] != ""
    assert "x-prefiller-host-port" not in phdrs and "x-prefiller-host-port" not in dhdrs
    assert rig.sidecar.stats.disaggregated == 1


async def test_client_request_id_is_shared_and_completions_get_only_max_tokens(make_rig: Callable[..., Any]) -> None:
    rig = await make_rig()
    status, _, body = await rig.post({"model": "m", "prompt": "p", "max_tokens": 9}, path="/v1/completions",
                                     headers={"x-request-id": "client-42"})
    assert status == 200 and orjson.loads(body)["served_by"] == "engine"
    pbody = rig.prefill.seen[0][2]
    assert pbody["max_tokens"] == 1 and "max_completion_tokens" not in pbody
    assert rig.prefill.seen[0][1]["x-request-id"] == rig.engine.seen[0][1]["x-request-id"] == "client-42"
    assert rig.engine.seen[0][2]["max_tokens"] == 9


async def test_responses_api_limits_max_output_tokens(make_rig: Callable[..., Any]) -> None:
    rig = await make_rig()
    status, _, _ = await rig.post({"model": "m", "input": "p", "max_output_tokens": 30}, path="/v1/responses")
    assert status == 200 and rig.prefill.seen[0][2]["max_output_tokens"] == 1
    assert rig.engine.seen[0][2]["max_output_tokens"] == 30


async def test_prefill_4xx_is_returned_to_the_client_as_is(make_rig: Callable[..., Any]) -> None:
    rig = await make_rig()
    rig.prefill.behave = lambda body: web.json_response({"error": {"message": "too long", "code": 400}}, status=400)
    status, headers, body = await rig.post(CHAT)
    assert status == 400 and orjson.loads(body)["error"]["message"] == "too long"
    assert headers["content-type"].startswith("application/json")
    assert rig.engine.seen == []


@pytest.mark.parametrize("failure", ["503", "timeout", "unreachable", "no-params"])
async def test_prefill_failure_falls_back_to_local_decode(make_rig: Callable[..., Any], failure: str) -> None:
    rig = await make_rig(prefill_timeout=0.5)
    # "timeout": the prefill leg never answers until the test releases it, so only the
    # sidecar's prefill_timeout can end it (and teardown does not wait for a fixed hang)
    released = asyncio.Event()

    async def slow(body: Any) -> None:
        await released.wait()

    behave: dict[str, Callable[[Any], Any]] = {
        "503": lambda b: web.json_response({"error": "overloaded"}, status=503),
        "timeout": slow,
        "no-params": lambda b: web.json_response({"choices": []}),
    }
    prefiller = None
    if failure == "unreachable":
        prefiller = f"{HOST}:1"
    else:
        rig.prefill.behave = behave[failure]
    try:
        status, _, body = await rig.post(CHAT, prefiller=prefiller or "")
    finally:
        released.set()
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    (_, _, dbody), = rig.engine.seen
    assert dbody == CHAT  # the client's original body, decoded (and prefilled) locally
    assert rig.sidecar.stats.fallback == 1


async def test_allowlist_rejects_a_prefill_target_outside_the_pool(make_rig: Callable[..., Any],
                                                                   tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"endpoints": [{"address": HOST, "port": 9}]}))
    allow = PrefillAllowlist.build([], str(pool))
    rig = await make_rig(allowlist=allow, pool_poll_interval=0.05)
    status, _, body = await rig.post(CHAT)
    assert status == 403 and b"not an allowed" in body
    assert rig.prefill.seen == [] and rig.engine.seen == []
    # The pool grows to include the prefill pod: the sidecar follows the file.
    pool.write_text(yaml.safe_dump({"endpoints": [{"address": HOST, "port": 9},
                                                  {"address": HOST, "port": rig.prefill.port}]}))
    await eventually(lambda: allow.allows(rig.prefiller), what="the allowlist to pick up the grown pool file")
    status, _, _ = await rig.post(CHAT)
    assert status == 200 and len(rig.prefill.seen) == 1


def test_static_allowlist_entries() -> None:
    al = PrefillAllowlist.build(["10.0.0.1:8000,10.0.1.0/24", "10.0.0.9", "[::1]:80"])
    assert al.allows("10.0.0.1:8000") and not al.allows("10.0.0.1:8001")
    assert al.allows("10.0.1.77:1234") and al.allows("10.0.0.9:1")
    assert al.allows("[::1]:80") and not al.allows("evil.example:80") and not al.allows("10.0.2.1:8000")
    assert PrefillAllowlist.build([]).allows("anything:1")  # no entries: protection off
    with pytest.raises(ValueError, match="not a CIDR"):
        PrefillAllowlist.build(["10.0.0.0/99"])


async def test_several_prefillers_the_first_is_used(make_rig: Callable[..., Any]) -> None:
    rig = await make_rig()
    status, _, _ = await rig.post(CHAT, prefiller=f"{rig.prefiller},{HOST}:1")
    assert status == 200 and len(rig.prefill.seen) == 1 and rig.sidecar.stats.fallback == 0


async def test_lmcache_connector_sends_the_unmodified_body_to_decode(make_rig: Callable[..., Any]) -> None:
    rig = await make_rig(connector="lmcache")
    status, _, _ = await rig.post(CHAT)
    assert status == 200
    pbody = rig.prefill.seen[0][2]
    assert pbody["max_tokens"] == 1 and pbody["stream"] is False and "kv_transfer_params" not in pbody
    assert rig.engine.seen[0][2] == CHAT


async def test_sglang_connector_pairs_both_legs_by_bootstrap_room(make_rig: Callable[..., Any]) -> None:
    rig = await make_rig(connector="sglang", sglang_bootstrap_port=8998)
    status, _, body = await rig.post(CHAT)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    # sglang's prefill leg runs alongside decode: the client's answer can come first
    await eventually(lambda: rig.prefill.seen, what="the prefill leg to reach the prefill server")
    pbody, dbody = rig.prefill.seen[0][2], rig.engine.seen[0][2]
    assert pbody["bootstrap_host"] == dbody["bootstrap_host"] == HOST
    assert pbody["bootstrap_port"] == dbody["bootstrap_port"] == 8998
    assert pbody["bootstrap_room"] == dbody["bootstrap_room"]
    assert dbody["stream"] is True and pbody["stream"] is False


async def test_engine_down_gives_a_502_json_error(make_rig: Callable[..., Any]) -> None:
    rig = await make_rig()
    rig.sidecar.config.decoder_url = f"http://{HOST}:1"
    status, _, body = await rig.post(CHAT, prefiller=None)
    assert status == 502 and orjson.loads(body)["error"]["code"] == 502
