"""A trivially fast OpenAI-shaped backend (several ports, one process) for overhead runs.

A non-streamed request gets a fixed small completion at once. A streamed request
(``"stream": true``) gets ``max_tokens`` SSE events, one per token, each written and flushed
on its own with ``--token-interval`` seconds between them (so every token crosses Envoy, and
the picker when it is in the response path, as its own body chunk, as a real engine's tokens
do), then a final event with ``usage`` and ``data: [DONE]``. What a benchmark measures is the
proxy and the picker, not the model server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import orjson
from aiohttp import web

BODY = (
    b'{"id":"cmpl-1","object":"text_completion","model":"sim-model","choices":[{"index":0,'
    b'"text":" ok","finish_reason":"length"}],"usage":{"prompt_tokens":50,"completion_tokens":1,'
    b'"total_tokens":51,"prompt_tokens_details":{"cached_tokens":0}}}'
)
TOKEN_EVENT = (
    b'data: {"id":"cmpl-1","object":"text_completion","model":"sim-model","choices":[{"index":0,'
    b'"text":" ok","finish_reason":null}]}\n\n'
)
PAGE = (
    "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\",model_name=\"sim-model\"} 0\n"
    "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine=\"0\",model_name=\"sim-model\"} 0\n"
    "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine=\"0\",model_name=\"sim-model\"} 0\n"
)


def _last_event(n: int) -> bytes:
    usage = {"prompt_tokens": 50, "completion_tokens": n, "total_tokens": 50 + n,
             "prompt_tokens_details": {"cached_tokens": 0}}
    return (b'data: {"id":"cmpl-1","object":"text_completion","model":"sim-model","choices":[],"usage":'
            + orjson.dumps(usage) + b"}\n\ndata: [DONE]\n\n")


def app(port: int, token_interval: float) -> web.Application:
    headers = {"content-type": "application/json", "x-inference-port": str(port)}
    sse_headers = {"content-type": "text/event-stream", "x-inference-port": str(port)}

    async def complete(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            req = orjson.loads(raw)
        except orjson.JSONDecodeError:
            req = {}
        if not (isinstance(req, dict) and req.get("stream")):
            return web.Response(body=BODY, headers=headers)
        n = int(req.get("max_tokens") or 16)
        resp = web.StreamResponse(headers=sse_headers)
        await resp.prepare(request)
        for _ in range(n):
            await resp.write(TOKEN_EVENT)
            if token_interval > 0:
                await asyncio.sleep(token_interval)
        await resp.write(_last_event(n))
        await resp.write_eof()
        return resp

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=PAGE)

    a = web.Application()
    a.router.add_post("/{tail:.*}", complete)
    a.router.add_get("/metrics", metrics)
    a.router.add_get("/health", metrics)
    return a


async def main(ports: list[int], token_interval: float) -> None:
    runners = []
    for p in ports:
        r = web.AppRunner(app(p, token_interval), access_log=None)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", p).start()
        runners.append(r)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    for r in runners:
        await r.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("ports", type=int, nargs="+")
    ap.add_argument("--token-interval", type=float, default=0.002,
                    help="seconds between two streamed tokens (each is its own body chunk)")
    a = ap.parse_args()
    import uvloop

    uvloop.run(main(a.ports, a.token_interval))
