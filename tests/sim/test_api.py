"""OpenAI surface: SSE framing, usage, headers, errors, chunked bodies, pod stop/start, CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from epp.sim import SimConfig, SimPool
from epp.sim.cli import fields_without_flags
from tests.waiting import eventually


async def _sse(r: aiohttp.ClientResponse) -> list[bytes]:
    raw = await r.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    return events[:-1]


async def test_completion_stream_format(fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    async with SimPool(fast_config, replicas=1, names=["pod-a"]) as pool:
        pod = pool.pods[0]
        r = await http.post(f"{pod.url}/v1/completions", json={
            "model": "sim-model", "prompt": "hello there", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}})
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-inference-pod"] == "pod-a"
        assert r.headers["x-inference-port"] == str(pod.port)
        assert r.headers["x-inference-namespace"] == "default"
        events = await _sse(r)
        assert all(e.startswith(b"data: ") for e in events)
        chunks = [orjson.loads(e[6:]) for e in events[:-1]]
        assert len(chunks) == 6
        assert [c["choices"][0]["finish_reason"] for c in chunks[:5]] == [None] * 4 + ["length"]
        assert all(c["object"] == "text_completion" and c["model"] == "sim-model" for c in chunks)
        assert chunks[5]["choices"] == []
        usage = chunks[5]["usage"]
        assert usage["completion_tokens"] == 5 and usage["total_tokens"] == usage["prompt_tokens"] + 5
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_chat_stream_without_usage_and_non_stream(fast_config: SimConfig,
                                                        http: aiohttp.ClientSession) -> None:
    async with SimPool(fast_config, replicas=1) as pool:
        url = pool.pods[0].url
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text",
                                                                                          "text": "hi"}]}]
        r = await http.post(f"{url}/v1/chat/completions", json={"model": "sim-model", "messages": msgs,
                                                                 "max_completion_tokens": 3, "stream": True})
        chunks = [orjson.loads(e[6:]) for e in (await _sse(r))[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert len(chunks) == 4 and all("usage" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)

        r = await http.post(f"{url}/v1/chat/completions", json={"model": "sim-model", "messages": msgs,
                                                                 "max_tokens": 4})
        out = await r.json()
        assert out["object"] == "chat.completion"
        assert out["choices"][0]["message"]["role"] == "assistant"
        assert out["choices"][0]["message"]["content"]
        assert out["usage"]["completion_tokens"] == 4
        # Same conversation again: its full blocks are cached.
        r = await http.post(f"{url}/v1/chat/completions", json={"model": "sim-model", "messages": msgs * 8,
                                                                 "max_tokens": 1})
        r = await http.post(f"{url}/v1/chat/completions", json={"model": "sim-model", "messages": msgs * 8,
                                                                 "max_tokens": 1})
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_chunked_request_body(fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    async def body() -> AsyncIterator[bytes]:
        data = orjson.dumps({"model": "sim-model", "prompt": "chunked " * 30, "max_tokens": 2})
        for i in range(0, len(data), 17):
            yield data[i : i + 17]

    async with SimPool(fast_config, replicas=1) as pool:
        r = await http.post(f"{pool.pods[0].url}/v1/completions", data=body(),
                            headers={"content-type": "application/json"})
        assert r.status == 200
        assert (await r.json())["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"{not json", 400),
        (b'{"prompt": "x"}', 400),
        (b'{"model": "nope", "prompt": "x"}', 404),
        (b'{"model": "sim-model", "prompt": "x", "max_tokens": 0}', 400),
        (b'{"model": "sim-model", "prompt": "x", "max_tokens": 200000}', 400),
    ],
)
async def test_errors_are_openai_shaped(
    fast_config: SimConfig, http: aiohttp.ClientSession, payload: bytes, status: int
) -> None:
    async with SimPool(fast_config, replicas=1) as pool:
        r = await http.post(f"{pool.pods[0].url}/v1/completions", data=payload,
                            headers={"content-type": "application/json"})
        assert r.status == status
        err = (await r.json())["error"]
        assert err["code"] == status and err["message"] and err["type"].endswith("Error")


async def test_failure_header_and_injection(fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    async with SimPool(fast_config.replace(failure_injection_rate=100.0, failure_types=["rate_limit"]),
                       replicas=1) as pool:
        url = pool.pods[0].url
        body = {"model": "sim-model", "prompt": "x", "max_tokens": 1}
        r = await http.post(f"{url}/v1/completions", json=body, headers={"x-return-error": "503"})
        assert r.status == 503
        assert (await r.json())["error"] == {"message": "Simulated error (x-return-error: 503)",
                                             "type": "ServiceUnavailableError", "param": None, "code": 503}
        assert r.headers["x-inference-pod"] == pool.pods[0].name
        r = await http.post(f"{url}/v1/completions", json=body)
        assert r.status == 429 and (await r.json())["error"]["type"] == "RateLimitError"


async def test_stop_refuses_connections_and_start_restores(fast_config: SimConfig,
                                                           http: aiohttp.ClientSession) -> None:
    async with SimPool(fast_config, replicas=2) as pool:
        pod = pool.pods[1]
        port = pod.port
        assert pod.name == f"sim-{port}"
        slow = asyncio.create_task(http.post(f"{pod.url}/v1/completions", json={
            "model": "sim-model", "prompt": "x", "max_tokens": 1000}))
        # stop only once the engine is running the request, so it is aborted mid-generation
        await eventually(lambda: pod.engine is not None and bool(pod.engine.running),
                         what="the slow request running on the engine")
        await pod.stop()
        try:
            status: int | None = (await slow).status
        except aiohttp.ClientError:
            status = None
        assert status != 200  # aborted: 500 or a dropped connection
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{pod.url}/health")
        r = await http.get(f"{pool.pods[0].url}/health")
        assert r.status == 200
        await pod.start()
        assert pod.port == port
        r = await http.get(f"{pod.url}/health")
        assert r.status == 200 and r.headers["x-inference-pod"] == f"sim-{port}"


async def test_models_endpoint(fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    async with SimPool(fast_config.replace(served_model_names=["m1", "m2"]), replicas=1) as pool:
        data = (await (await http.get(f"{pool.pods[0].url}/v1/models")).json())["data"]
        assert [m["id"] for m in data] == ["m1", "m2"]
        r = await http.post(f"{pool.pods[0].url}/v1/completions", json={"model": "m2", "prompt": "x",
                                                                          "max_tokens": 1})
        assert (await r.json())["model"] == "m2"


def test_every_config_knob_has_a_flag() -> None:
    assert fields_without_flags() == []
    out = subprocess.run([sys.executable, "-m", "epp.cli", "sim", "--help"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    for flag in ("--replicas", "--port", "--kv-events-port", "--block-size", "--num-gpu-blocks", "--time-scale",
                 "--max-num-seqs", "--lora-modules", "--max-loras", "--failure-injection-rate",
                 "--pod-name-prefix", "--namespace", "--kv-events-replay-port"):
        assert flag in out


def test_cli_serves_and_exits_cleanly_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "epp.cli", "sim", "--replicas", "2", "--port", "0", "--kv-events-port", "0",
         "--time-scale", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert all(ln.startswith("sim pod sim-") and " ready on http://127.0.0.1:" in ln and "kv-events tcp://"
                   in ln for ln in lines), lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_bad_pool_settings_with_a_message() -> None:
    import subprocess
    import sys

    for args, needle in ((["--replicas", "0"], "--replicas must be at least 1"),
                         (["--block-size", "7"], "block_size: 7")):
        res = subprocess.run([sys.executable, "-m", "epp", "sim", *args], capture_output=True, text=True, timeout=30)
        assert res.returncode != 0 and needle in res.stderr and "Traceback" not in res.stderr


async def test_render_endpoints_return_the_token_ids_the_engine_prefills(
        fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    async with SimPool(fast_config, replicas=1) as pool:
        pod = pool.pods[0]
        prompt = "The council meets on Tuesdays. " * 20
        r = await http.post(f"{pod.url}/v1/completions/render", json={"model": "sim-model", "prompt": prompt})
        assert r.status == 200
        rendered = await r.json()
        assert isinstance(rendered, list) and rendered[0]["request_id"].startswith("cmpl-")
        # the same ids, sent back as a prompt, are a full prefix-cache hit after one real request
        r = await http.post(f"{pod.url}/v1/completions",
                            json={"model": "sim-model", "prompt": prompt, "max_tokens": 1})
        assert r.status == 200
        r = await http.post(f"{pod.url}/v1/completions",
                            json={"model": "sim-model", "prompt": rendered[0]["token_ids"], "max_tokens": 1})
        usage = (await r.json())["usage"]
        assert usage["prompt_tokens"] == len(rendered[0]["token_ids"])
        assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - fast_config.block_size
        chat = await http.post(f"{pod.url}/v1/chat/completions/render",
                               json={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]})
        doc = await chat.json()
        assert isinstance(doc, dict) and doc["token_ids"] and doc["request_id"].startswith("chatcmpl-")
        bad = await http.post(f"{pod.url}/v1/completions/render", json={"prompt": "no model"})
        assert bad.status == 400
