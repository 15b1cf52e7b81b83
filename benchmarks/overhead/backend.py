"""A trivially fast OpenAI-shaped backend (several ports, one process) for overhead runs.

Answers every POST with a fixed small completion at once, so what a benchmark measures is
the proxy and the picker, not the model server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

BODY = (
    b'{"id":"cmpl-1","object":"text_completion","model":"sim-model","choices":[{"index":0,'
    b'"text":" ok","finish_reason":"length"}],"usage":{"prompt_tokens":50,"completion_tokens":1,'
    b'"total_tokens":51,"prompt_tokens_details":{"cached_tokens":0}}}'
)
PAGE = (
    "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\",model_name=\"sim-model\"} 0\n"
    "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine=\"0\",model_name=\"sim-model\"} 0\n"
    "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine=\"0\",model_name=\"sim-model\"} 0\n"
)


def app(port: int) -> web.Application:
    headers = {"content-type": "application/json", "x-inference-port": str(port)}

    async def complete(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=BODY, headers=headers)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=PAGE)

    a = web.Application()
    a.router.add_post("/{tail:.*}", complete)
    a.router.add_get("/metrics", metrics)
    a.router.add_get("/health", metrics)
    return a


async def main(ports: list[int]) -> None:
    runners = []
    for p in ports:
        r = web.AppRunner(app(p), access_log=None)
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
    import uvloop

    uvloop.run(main(ap.parse_args().ports))
