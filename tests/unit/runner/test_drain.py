"""Graceful shutdown of an in-process picker, seen from the gRPC side (what Envoy sees):
after SIGTERM readiness turns NOT_SERVING but new and running ext_proc streams are still
answered; the drain ends when the picker is idle (or at the grace, or a second signal); queued
and held requests then get a 503 JSON answer instead of a cut stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.discovery.static import StaticDiscovery
from epp.runner.server import PickerServer, ServeOptions
from tests.promtext import scrape
from tests.waiting import eventually

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
POST = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}
CHAT = orjson.dumps({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
ONE_AT_A_TIME = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
saturationDetector: {pluginRef: concurrency-detector}
"""


def _headers() -> pb.ProcessingRequest:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in POST.items()])
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=hm),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=FULL_DUPLEX, response_body_mode=FULL_DUPLEX))


def _response(status: str = "200") -> list[pb.ProcessingRequest]:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=status.encode()),
                                     base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")])
    return [pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hm)),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=b'{"model":"m"}', end_of_stream=True))]


class Stream:
    """One ext_proc stream driven message by message, as Envoy would."""

    def __init__(self, stub: Any) -> None:
        self.call = stub.Process()

    async def request(self) -> pb.ProcessingResponse:
        """Send a whole request; the first answer is the pick (or an ImmediateResponse)."""
        await self.call.write(_headers())
        await self.call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=CHAT, end_of_stream=True)))
        return await self.call.read()

    async def finish(self) -> None:
        """The response arrives and ends; the stream closes."""
        for m in _response():
            await self.call.write(m)
        await self.call.done_writing()
        while await self.call.read() is not grpc.aio.EOF:
            pass


def routed(resp: pb.ProcessingResponse) -> bool:
    mutation = resp.request_headers.response.header_mutation
    return resp.WhichOneof("response") == "request_headers" and any(
        h.header.key == "x-gateway-destination-endpoint" for h in mutation.set_headers)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[PickerServer, Any]] = []

    async def _make(endpoints: str | None = "127.0.0.1:1", **opts: Any) -> tuple[PickerServer, Any, Any]:
        if endpoints is None:  # an empty pool (scaled to zero)
            path = tmp_path / "pool.yaml"
            path.write_text("endpoints: []\n")
            discovery = StaticDiscovery.from_pool_file(path)
        else:
            discovery = StaticDiscovery.from_endpoints_flag(endpoints)
        opts.setdefault("metrics_port", -1)
        server = PickerServer(ServeOptions(discovery=discovery, grpc_port=0, grpc_health_port=0,
                                           bind_address="127.0.0.1", secure_serving=False, **opts))
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_ports['grpc']}")
        made.append((server, channel))
        return server, pb_grpc.ExternalProcessorStub(channel), health_pb2_grpc.HealthStub(channel)

    yield _make
    for server, channel in made:
        await server.stop()
        await channel.close()


async def readiness(health: Any) -> int:
    resp = await health.Check(health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"))
    return int(resp.status)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def test_drain_answers_new_and_running_streams_and_ends_once_idle(make: Any) -> None:
    server, stub, health = await make(shutdown_grace=60.0, shutdown_idle=0.3)
    assert await readiness(health) == SERVING
    running = Stream(stub)
    assert routed(await running.request())

    drain = asyncio.create_task(server.drain())
    await eventually(lambda: _is(readiness(health), NOT_SERVING), what="readiness NOT_SERVING")

    late = Stream(stub)  # a gateway that has not noticed yet: still answered, still routed
    assert routed(await late.request())
    await late.finish()
    assert not drain.done()  # `running` is still open: the drain must wait for it

    await running.finish()  # the long response completes normally
    assert await asyncio.wait_for(drain, 10) == "idle"
    assert server.streams.open == 0 and server.streams.started == 2


async def _is(coro: Any, value: int) -> bool:
    return bool(await coro == value)


async def test_second_signal_ends_the_drain_at_once(make: Any) -> None:
    server, stub, _ = await make(shutdown_grace=600.0, shutdown_idle=600.0)
    running = Stream(stub)
    assert routed(await running.request())
    drain = asyncio.create_task(server.drain())
    await eventually(lambda: server._drain is not None, what="drain started")
    server.cut_drain()
    assert await asyncio.wait_for(drain, 10) == "signal"


async def test_queued_requests_get_a_503_json_when_the_grace_ends(make: Any) -> None:
    server, stub, _ = await make(config_text=ONE_AT_A_TIME, shutdown_grace=0.5, shutdown_idle=0.1, grace_period=0.5)
    running = Stream(stub)
    assert routed(await running.request())  # takes the only slot, and keeps it past the grace
    queued = Stream(stub)
    answer = asyncio.create_task(queued.request())
    await eventually(lambda: server._admission.demand.queued == 1, what="second request queued")

    assert await asyncio.wait_for(server.drain(), 10) == "grace"
    await server.stop()
    resp = await asyncio.wait_for(answer, 10)
    assert resp.WhichOneof("response") == "immediate_response"
    assert resp.immediate_response.status.code == 503
    body = orjson.loads(resp.immediate_response.body)
    assert "shutting down" in body["error"]["message"]
    # the stream still running after the grace is cut (not answered with an error body)
    with pytest.raises(grpc.aio.AioRpcError):
        await asyncio.wait_for(running.finish(), 10)


async def test_requests_held_for_an_empty_pool_get_a_503_json_on_stop(make: Any) -> None:
    server, stub, _ = await make(endpoints=None, empty_pool_wait=600.0)
    held = Stream(stub)
    answer = asyncio.create_task(held.request())
    await eventually(lambda: server._admission.demand.queued == 1, what="request held for the empty pool")
    await server.stop()
    resp = await asyncio.wait_for(answer, 10)
    assert resp.immediate_response.status.code == 503
    assert "shutting down" in orjson.loads(resp.immediate_response.body)["error"]["message"]


async def test_open_streams_tasks_and_process_gauges_are_exported(make: Any) -> None:
    server, stub, _ = await make(metrics_port=0)
    port = server.bound_ports["metrics"]
    running = Stream(stub)
    assert routed(await running.request())
    m = await asyncio.to_thread(scrape, port)
    assert m["epp_ext_proc_streams_open"][0][1] == 1
    assert m["epp_asyncio_tasks"][0][1] >= 1
    assert m["process_open_fds"][0][1] > 0 and m["process_resident_memory_bytes"][0][1] > 0
    await running.finish()
    await eventually(lambda: server.streams.open == 0, what="stream closed")
    m = await asyncio.to_thread(scrape, port)
    assert m["epp_ext_proc_streams_open"][0][1] == 0
