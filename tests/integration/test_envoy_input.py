"""Hostile and unusual input through a real Envoy 1.40: HTTP/2 trailers, deep JSON, oversized
bodies, HTTP/1.0, and a flood of model names. What is asserted is what the client gets and
what the operator's /metrics shows."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import urllib.request
from typing import Any

import aiohttp
import orjson
import pytest

from epp.envoy.bootstrap import EnvoySpec, bootstrap_dict
from epp.local.topology import HOST, envoy_binary, free_port_block, http_ok
from tests.promtext import scrape

from .conftest import Cluster, wait_until
from .rawhttp import h2_request, http10_request

pytestmark = [pytest.mark.envoy]

MODEL = "sim-model"
CHAT = orjson.dumps({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hello there"}]})
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def picker(cluster: Cluster) -> dict[str, int]:
    return cluster.picker(extra=("--max-request-body-bytes", "64Ki"))


@pytest.fixture(scope="module")
def duplex(cluster: Cluster, picker: dict[str, int]) -> int:
    return cluster.envoy(picker)


@pytest.fixture(scope="module")
def buffered(cluster: Cluster, picker: dict[str, int]) -> int:
    return cluster.envoy(picker, request_body_mode="BUFFERED", response_body_mode="BUFFERED")


def _mode_port(request: pytest.FixtureRequest, mode: str) -> int:
    return int(request.getfixturevalue("duplex" if mode == "FULL_DUPLEX_STREAMED" else "buffered"))


async def _post(port: int, body: bytes, headers: dict[str, str] | None = None,
                path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{HOST}:{port}{path}", data=body, headers={**JSON, **(headers or {})},
        timeout=aiohttp.ClientTimeout(total=30),
    ) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


# ---------------------------------------------------------------- HTTP/2 request trailers


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_http2_request_with_trailers_is_routed_and_its_body_forwarded(
        cluster: Cluster, request: pytest.FixtureRequest, mode: str) -> None:
    port = _mode_port(request, mode)
    reply = await asyncio.to_thread(
        h2_request, port, "POST", "/v1/chat/completions", {**JSON, "te": "trailers"}, CHAT,
        {"x-checksum": "abc"}, chunk=20,
    )
    assert reply.status == 200, reply
    assert int(reply.headers["x-inference-port"]) in cluster.pod_ports
    doc = orjson.loads(reply.body)
    assert doc["model"] == MODEL and doc["choices"][0]["message"]["content"]


async def test_http2_without_trailers_still_works(duplex: int) -> None:
    reply = await asyncio.to_thread(h2_request, duplex, "POST", "/v1/chat/completions", JSON, CHAT, None)
    assert reply.status == 200, reply


# ---------------------------------------------------------------- response trailers


class TrailerPod:
    """A model server that answers every POST with a chunked body and trailers (as an HTTP/2
    or gRPC-style backend would); the JSON document / last SSE line is split across chunks."""

    def __init__(self, content_type: str, parts: list[bytes]) -> None:
        self.content_type = content_type.encode()
        self.parts = parts
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"POST"):  # the picker's metric scrapes
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                return
            lower = head.lower()
            if b"content-length:" in lower:
                n = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                await reader.readexactly(n)
            else:  # chunked request body
                while (size := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)) > 0:
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            out = (b"HTTP/1.1 200 OK\r\ncontent-type: " + self.content_type
                   + b"\r\ntransfer-encoding: chunked\r\ntrailer: x-done\r\nconnection: close\r\n\r\n")
            for part in self.parts:
                out += b"%x\r\n" % len(part) + part + b"\r\n"
            writer.write(out + b"0\r\nx-done: yes\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            await writer.drain()
            writer.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def _trailers_envoy(cluster: Cluster, picker: dict[str, int], pod: int, mode: str) -> int:
    """An Envoy whose upstream HTTP/1 codec keeps trailers (so they reach ext_proc)."""
    listen = free_port_block(2)
    spec = EnvoySpec(pool=[(HOST, pod)], pickers=[(HOST, picker["grpc"])], listen=(HOST, listen),
                     admin=(HOST, listen + 1), request_body_mode=mode, response_body_mode=mode)  # type: ignore[arg-type]
    cfg = bootstrap_dict(spec)
    for c in cfg["staticResources"]["clusters"]:
        if c["name"] == "pool":
            c["typedExtensionProtocolOptions"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicitHttpConfig": {"httpProtocolOptions": {"enableTrailers": True}}}}
    path = cluster.topo.workdir / f"envoy-trailers-{listen}.json"
    path.write_text(orjson.dumps(cfg).decode())
    argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--log-level", "warn",
            "--base-id", str(random.randrange(1, 1_000_000)), "--drain-time-s", "1"]
    cluster.topo.start(f"envoy-trailers-{listen}", argv,
                       ready=lambda: http_ok(f"http://{HOST}:{listen + 1}/ready", expect=b"LIVE"), timeout=30)
    return listen


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
@pytest.mark.parametrize("kind", ["json", "sse"])
async def test_response_trailers_flush_the_held_body_restored(cluster: Cluster, mode: str, kind: str) -> None:
    if kind == "json":
        parts = [b'{"model":"pod-model","choices":[{"text":"abc"}],', b'"usage":{"prompt_tokens":3}}']
        ctype = "application/json"
    else:  # the last SSE line has no newline: only the trailers say it is complete
        parts = [b'data: {"model":"pod-model","choices":[]}\n\n', b'data: {"model":"pod-model","usage":{}}']
        ctype = "text/event-stream"
    pod = TrailerPod(ctype, parts)
    await pod.start()
    try:
        picker = cluster.picker(pool=[(HOST, pod.port)])
        port = await asyncio.to_thread(_trailers_envoy, cluster, picker, pod.port, mode)
        body = orjson.dumps({"model": "client-name", "prompt": "hi"})
        reply = await asyncio.to_thread(h2_request, port, "POST", "/v1/completions",
                                        {**JSON, "x-gateway-model-name-rewrite": "pod-model"}, body, None)
    finally:
        pod.stop()
    assert reply.status == 200, reply
    assert reply.body == b"".join(parts).replace(b'"model":"pod-model"', b'"model":"client-name"'), reply.body


# ---------------------------------------------------------------- deep JSON


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [300, 1000])
@pytest.mark.parametrize("rewrite", [False, True], ids=["plain", "rewrite"])
async def test_deeply_nested_json_reaches_a_pod_instead_of_a_500(
        cluster: Cluster, duplex: int, depth: int, rewrite: bool) -> None:
    model = "client-alias" if rewrite else MODEL
    headers = {"x-gateway-model-name-rewrite": MODEL} if rewrite else {}
    # deep in a field the pod ignores: the pod serves it
    body = (b'{"model":"' + model.encode() + b'","max_tokens":2,"messages":[{"role":"user","content":"hi"}],'
            b'"metadata":' + _deep(depth) + b"}")
    status, hdrs, data = await _post(duplex, body, headers)
    assert status == 200, data
    assert int(hdrs["x-inference-port"]) in cluster.pod_ports
    assert orjson.loads(data)["model"] == model
    # deep in the prompt itself: the pod is the judge (it refuses the content), not the picker
    body = b'{"model":"' + model.encode() + b'","messages":[{"role":"user","content":' + _deep(depth) + b"}]}"
    status, hdrs, data = await _post(duplex, body, headers)
    assert status != 500 and "x-inference-port" in hdrs, (status, data)


async def test_json_deeper_than_any_parser_allows_is_a_400_json(duplex: int) -> None:
    status, hdrs, data = await _post(duplex, b'{"model":"m","x":' + _deep(2000) + b"}")
    assert status == 400 and hdrs["content-type"] == "application/json"
    assert orjson.loads(data)["error"]["code"] == 400


# ---------------------------------------------------------------- body size, HTTP/1.0


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_oversized_body_is_a_413_with_a_json_body(request: pytest.FixtureRequest, mode: str) -> None:
    port = _mode_port(request, mode)
    big = orjson.dumps({"model": MODEL, "prompt": "x" * 100_000})
    status, hdrs, data = await _post(port, big, path="/v1/completions")
    assert status == 413 and hdrs["content-type"] == "application/json"
    err = orjson.loads(data)["error"]
    assert err["code"] == 413 and "65536 bytes" in err["message"]
    status, _, _ = await _post(port, CHAT)  # the next request is fine
    assert status == 200


def test_serve_help_documents_the_413() -> None:
    out = subprocess.run([sys.executable, "-m", "epp", "serve", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    flag = out[out.rindex("--max-request-body-bytes"):]
    assert "413" in " ".join(flag[:300].split())


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_http10_clients_are_served(cluster: Cluster, request: pytest.FixtureRequest, mode: str) -> None:
    port = _mode_port(request, mode)
    line, reply = await asyncio.to_thread(http10_request, port, "POST", "/v1/chat/completions", JSON, CHAT)
    assert reply.status == 200, (line, reply)
    assert int(reply.headers["x-inference-port"]) in cluster.pod_ports
    assert orjson.loads(reply.body)["choices"]
    line, reply = await asyncio.to_thread(http10_request, port, "GET", "/v1/models", {})  # no Host header
    assert reply.status == 200, (line, reply)
    assert orjson.loads(reply.body)["data"][0]["id"] == MODEL


# ---------------------------------------------------------------- label cardinality


def _metrics_size(port: int) -> int:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
        return len(r.read())


async def test_a_flood_of_model_names_does_not_grow_metrics(duplex: int, picker: dict[str, int]) -> None:
    status, _, _ = await _post(duplex, CHAT)
    assert status == 200
    await _post(duplex, orjson.dumps({"model": "warm-up-unknown", "prompt": "x"}), path="/v1/completions")
    before = _metrics_size(picker["metrics"])
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> int:
        async with sem:
            s, _, _ = await _post(duplex, orjson.dumps({"model": f"flood-{i}", "prompt": "x"}), path="/v1/completions")
            return s

    statuses = await asyncio.gather(*(one(i) for i in range(400)))
    assert set(statuses) == {404}  # the pods refuse names they do not serve
    after = _metrics_size(picker["metrics"])
    assert after < before + 8192, (before, after)
    models = {lbl["model_name"] for lbl, _ in scrape(picker["metrics"])["inference_objective_request_total"]}
    assert models == {MODEL, "other"}, models
    assert wait_until(lambda: _running(picker["metrics"]) == [0.0, 0.0]), _running(picker["metrics"])


def _running(port: int) -> list[Any]:
    return sorted(v for _, v in scrape(port).get("inference_objective_running_requests", []))
