"""The picker out of the response data path, through a real Envoy 1.40.

First the Envoy mechanisms ``epp envoy-config``'s default (``--response-processing auto``)
is built on, each shown with a minimal processor written here (so a change in Envoy fails
here, naming the mechanism, not somewhere inside the picker):

* response body NONE still sends the response headers, and Envoy closes the ext_proc stream
  when the response ends (not when the headers pass): that close is the picker's "response
  done" signal (in-flight release);
* a ``mode_override`` on the response_headers answer asks for one response's body (STREAMED:
  one message per chunk, chunks can be replaced; BUFFERED: the whole body once);
* Envoy ignores that override when a body mode is FULL_DUPLEX_STREAMED (why ``auto``
  buffers the request body instead).

Then ``epp serve`` in its default mode behind the default generated config: in-flight counts
released at the end of a streamed response, the served endpoint reported, a rewritten model
name restored, and a stream that needs nothing costs the same number of ext_proc messages
whatever its length.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from aiohttp import web
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.envoy.bootstrap import EnvoySpec
from epp.handlers import messages as msgs
from epp.local.topology import HOST, Topology, ext_proc_messages, free_port_block
from tests.promtext import scrape
from tests.waiting import eventually

from .conftest import Cluster

pytestmark = [pytest.mark.envoy]

Mode = processing_mode_pb2.ProcessingMode
CHUNKS = 4
EVENT = b'data: {"model":"target","choices":[{"text":"x"}]}\n\n'


# ---------------------------------------------------------------------------- mechanisms
@dataclass
class Recorder:
    """What a minimal processor saw, in order, with the backend's own events interleaved."""

    events: list[str] = field(default_factory=list)
    #: x-test header value -> what to do with the response
    action: dict[str, str] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class Processor(pb_grpc.ExternalProcessorServicer):
    """Routes every request to ``dest``; on the response does what the test asked."""

    def __init__(self, dest: str, rec: Recorder) -> None:
        self.dest = dest
        self.rec = rec

    async def Process(self, it: AsyncIterator[pb.ProcessingRequest], ctx: Any) -> AsyncIterator[pb.ProcessingResponse]:
        rec = self.rec
        action = ""
        body = bytearray()
        req_mode = resp_mode = Mode.NONE
        async for m in it:
            kind = m.WhichOneof("request")
            part = getattr(m, kind)
            rec.events.append(f"{kind}{'/eos' if getattr(part, 'end_of_stream', False) else ''}")
            if m.HasField("protocol_config"):  # the first message only
                req_mode = m.protocol_config.request_body_mode
                resp_mode = m.protocol_config.response_body_mode
            if kind == "request_headers":
                headers = {h.key: h.raw_value.decode() for h in m.request_headers.headers.headers}
                action = rec.action.get(headers.get("x-test", ""), "")
                if req_mode == Mode.BUFFERED:
                    yield msgs.EMPTY_REQUEST_HEADERS
            elif kind == "request_body":
                body += m.request_body.body
                if req_mode == Mode.BUFFERED:
                    yield msgs.routed_buffered_body_response(self.dest, {"x-gateway-destination-endpoint": self.dest},
                                                             None)
                elif m.request_body.end_of_stream:
                    yield msgs.routed_headers_response(self.dest, {"x-gateway-destination-endpoint": self.dest})
                    for out in msgs.streamed_body_responses(bytes(body), request=True):
                        yield out
            elif kind == "request_trailers":
                yield msgs.EMPTY_REQUEST_TRAILERS
            elif kind == "response_headers":
                if action == "ask-streamed":
                    yield msgs.response_headers_response({}, Mode.STREAMED)
                elif action == "ask-buffered":
                    yield msgs.response_headers_response({}, Mode.BUFFERED)
                else:
                    yield msgs.EMPTY_RESPONSE_HEADERS
            elif kind == "response_body":
                if resp_mode == Mode.FULL_DUPLEX_STREAMED:
                    yield msgs.streamed_response_body(m.response_body.body, m.response_body.end_of_stream)
                else:  # asked for: replace the model name in what passes
                    new = m.response_body.body.replace(b'"target"', b'"client"')
                    yield msgs.replaced_response_chunk(new) if new else msgs.EMPTY_RESPONSE_BODY
            elif kind == "response_trailers":
                yield msgs.EMPTY_RESPONSE_TRAILERS
        rec.events.append("stream-closed")
        rec.closed.set()


@dataclass
class Lab:
    listen: int
    rec: Recorder
    released: asyncio.Event  # set by the test to let the backend finish its stream


@pytest.fixture
async def lab(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Lab]:
    """A slow SSE backend and the minimal processor in this process, a real Envoy in front,
    configured by the test's parameter (EnvoySpec fields)."""
    rec = Recorder()
    released = asyncio.Event()

    async def stream(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(req)
        for i in range(CHUNKS):
            await resp.write(EVENT)
            if i == 0:
                await released.wait()  # the test looks at the processor mid-stream
        rec.events.append("backend-done")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/{tail:.*}", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    backend = runner.addresses[0][1]
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Processor(f"{HOST}:{backend}", rec), server)
    proc_port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    kw: dict[str, Any] = request.param
    listen = free_port_block(2)
    spec = EnvoySpec(pool=[(HOST, backend)], pickers=[(HOST, proc_port)], listen=(HOST, listen),
                     admin=(HOST, listen + 1), picker_tls=False, **kw)
    with Topology(tmp_path) as topo:
        await asyncio.to_thread(topo.start_envoy, spec)
        try:
            yield Lab(listen, rec, released)
        finally:
            released.set()
            await server.stop(0)
            await runner.cleanup()


async def _request(lab: Lab, test: str, hold: bool = True) -> tuple[int, bytes]:
    """POST through Envoy; the backend's stream is held after its first chunk until the
    client has the response headers and the processor saw them (``hold``)."""
    if not hold:
        lab.released.set()
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{HOST}:{lab.listen}/v1/completions", data=b'{"model":"client","prompt":"hi"}',
        headers={"content-type": "application/json", "x-test": test}, timeout=aiohttp.ClientTimeout(total=30),
    ) as r:
        await eventually(lambda: "response_headers" in lab.rec.events, what="response headers at the processor")
        if hold:
            assert "stream-closed" not in lab.rec.events  # the response is still going
            lab.released.set()
        return r.status, await r.read()


@pytest.mark.parametrize("lab", [{"response_processing": "none"}], indirect=True)
async def test_body_none_sends_headers_and_closes_the_stream_when_the_response_ends(lab: Lab) -> None:
    status, body = await _request(lab, "plain")
    assert status == 200 and body == EVENT * CHUNKS
    async with asyncio.timeout(10):
        await lab.rec.closed.wait()
    ev = lab.rec.events
    assert not any(e.startswith("response_body") for e in ev)
    # the close comes after the backend finished: it marks the end of the response
    assert ev.index("response_headers") < ev.index("backend-done") < ev.index("stream-closed")


@pytest.mark.parametrize("lab", [{"response_processing": "auto"}], indirect=True)
async def test_mode_override_asks_for_one_responses_body(lab: Lab) -> None:
    lab.rec.action["s"] = "ask-streamed"
    status, body = await _request(lab, "s")
    assert status == 200 and body == EVENT.replace(b'"target"', b'"client"') * CHUNKS
    chunks = [e for e in lab.rec.events if e.startswith("response_body")]
    assert len(chunks) >= 2 and chunks[-1] == "response_body/eos"


@pytest.mark.parametrize("lab", [{"response_processing": "auto"}], indirect=True)
async def test_mode_override_buffered_gives_the_whole_body_once(lab: Lab) -> None:
    lab.rec.action["b"] = "ask-buffered"
    # Envoy holds the response headers until the whole body is buffered: nothing to hold
    status, body = await _request(lab, "b", hold=False)
    assert status == 200 and body == EVENT.replace(b'"target"', b'"client"') * CHUNKS
    assert [e for e in lab.rec.events if e.startswith("response_body")] == ["response_body/eos"]


@pytest.mark.parametrize("lab", [{"request_body_mode": "FULL_DUPLEX_STREAMED", "response_body_mode": "NONE",
                                  "response_processing": "auto"}], indirect=True)
async def test_mode_override_is_ignored_with_a_full_duplex_body(lab: Lab) -> None:
    """Envoy 1.40 drops the override when a body mode is FULL_DUPLEX_STREAMED (even with
    allow_mode_override): a FULL_DUPLEX request leaves no per-response choice."""
    lab.rec.action["s"] = "ask-streamed"
    status, body = await _request(lab, "s")
    assert status == 200 and body == EVENT * CHUNKS  # untouched: no body came to the processor
    async with asyncio.timeout(10):
        await lab.rec.closed.wait()
    assert not any(e.startswith("response_body") for e in lab.rec.events)


# ---------------------------------------------------------------------------- the picker
MODEL = "sim-model"


@pytest.fixture(scope="module")
def default_mode(cluster: Cluster) -> Iterator[tuple[int, dict[str, int]]]:
    """``epp serve`` and ``epp envoy-config`` with their defaults (response processing auto)."""
    picker = cluster.picker()
    yield cluster.envoy(picker), picker


def _running(metrics_port: int) -> float:
    return sum(v for _, v in scrape(metrics_port).get("inference_objective_running_requests", []))


async def test_in_flight_released_at_the_end_of_a_streamed_response_and_served_endpoint_reported(
        default_mode: tuple[int, dict[str, int]]) -> None:
    port, picker = default_mode
    def served() -> dict[str, float]:
        out: dict[str, float] = {}
        for lbl, v in scrape(picker["metrics"]).get("epp_served_endpoint_total", []):
            out[lbl["endpoint"]] = out.get(lbl["endpoint"], 0.0) + v
        return out

    served_before = served()
    body = {"model": MODEL, "prompt": "tell me a long story " * 8, "max_tokens": 120, "stream": True,
            "ignore_eos": True}
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{HOST}:{port}/v1/completions", data=orjson.dumps(body),
        headers={"content-type": "application/json"}, timeout=aiohttp.ClientTimeout(total=60),
    ) as r:
        assert r.status == 200
        pod_port = r.headers["x-inference-port"]
        first = await r.content.readline()
        assert first.startswith(b"data: ")
        # mid-stream: the response headers went through the picker long ago, the request
        # still counts as running (it is released at the response's end, not its start)
        assert await asyncio.to_thread(_running, picker["metrics"]) == 1
        rest = await r.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    await eventually(lambda: _running(picker["metrics"]) == 0, what="the running count released")
    key = f"{HOST}:{pod_port}"
    assert served()[key] - served_before.get(key, 0.0) == 1


async def test_rewritten_model_name_restored_in_streams_and_json(default_mode: tuple[int, dict[str, int]]) -> None:
    port, _ = default_mode
    for stream in (True, False):
        body = {"model": "client-alias", "prompt": "hello", "max_tokens": 6, "stream": stream}
        async with aiohttp.ClientSession() as s, s.post(
            f"http://{HOST}:{port}/v1/completions", data=orjson.dumps(body),
            headers={"content-type": "application/json", "x-gateway-model-name-rewrite": MODEL},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as r:
            assert r.status == 200
            raw = await r.read()
        if stream:
            docs = [orjson.loads(line[6:]) for line in raw.split(b"\n")
                    if line.startswith(b"data: ") and line != b"data: [DONE]"]
        else:
            docs = [orjson.loads(raw)]
        assert docs and all(d["model"] == "client-alias" for d in docs), raw[:300]


async def test_a_stream_that_needs_nothing_costs_the_same_messages_whatever_its_length(
        cluster: Cluster, default_mode: tuple[int, dict[str, int]]) -> None:
    port, picker = default_mode
    admin = port + 1  # Cluster.envoy puts the admin port right after the listener

    async def messages_for(tokens: int, **extra: Any) -> float:
        before = await asyncio.to_thread(ext_proc_messages, admin)
        body = {"model": MODEL, "prompt": "count slowly", "max_tokens": tokens, "stream": True, "ignore_eos": True,
                **extra}
        async with aiohttp.ClientSession() as s, s.post(
            f"http://{HOST}:{port}/v1/completions", data=orjson.dumps(body),
            headers={"content-type": "application/json"}, timeout=aiohttp.ClientTimeout(total=60),
        ) as r:
            assert r.status == 200
            await r.read()
        # Envoy counts a message when it is handled: wait for the picker's count to settle
        await eventually(lambda: _running(picker["metrics"]) == 0, what="request finished")
        deadline = time.monotonic() + 5
        last = -1.0
        while time.monotonic() < deadline:
            now = await asyncio.to_thread(ext_proc_messages, admin)
            if now == last:
                break
            last = now
            await asyncio.sleep(0.05)
        return last - before

    short, long = await messages_for(4), await messages_for(48)
    assert short == long
    # asking for usage in the stream puts its body through the picker: one more per chunk
    assert await messages_for(48, stream_options={"include_usage": True}) > long + 40
