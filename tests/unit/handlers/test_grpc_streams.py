"""Out-of-order ext_proc streams from a direct gRPC client against a running picker.

The picker guards a pool of one endpoint that takes one request at a time
(``concurrency-detector maxConcurrency: 1``, flow control on). Hostile streams (a second
request on one stream, a body after its end, a response before any request) must end with
INVALID_ARGUMENT and give back everything they took: afterwards normal requests are routed
at once, and every in-flight gauge is back to zero.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .grpc_picker import IDLE, Picker, picker
from .test_extproc_stream import CHAT, POST, _body, _dest_md, _hdrs, _resp_body, _resp_headers

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- {type: queue-scorer}
- {type: concurrency-detector, parameters: {maxConcurrency: 1}}
- {type: max-score-picker}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
saturationDetector: {pluginRef: concurrency-detector}
flowControl: {defaultRequestTTL: 1s}
"""

JSON_OK = {":status": "200", "content-type": "application/json"}
NORMAL = [_hdrs(POST), _body(CHAT, True), _resp_headers(JSON_OK), _resp_body(b'{"model":"m"}', True)]

HOSTILE = [
    [_hdrs(POST), _body(CHAT, True), _hdrs(POST), _body(CHAT, True)],
    [_hdrs(POST), _body(CHAT, True), _body(CHAT, True)],
    [_hdrs(POST), _body(CHAT[:10], False), _body(CHAT[10:], True), _body(CHAT, True)],
    [_hdrs(POST), _body(CHAT, True), _resp_headers(JSON_OK), _resp_headers(JSON_OK)],
    [_hdrs(POST), _body(CHAT, True), _resp_headers(JSON_OK), _resp_body(b"{}", True), _resp_body(b"{}", True)],
    [_resp_headers(JSON_OK), _hdrs(POST), _body(CHAT, True)],
]


@pytest.fixture(scope="module")
def one_slot() -> Iterator[Picker]:
    with picker("127.0.0.1:1", CONFIG) as p:  # nothing listens there: metrics stale, fail-open routing
        yield p


def test_twelve_hostile_streams_do_not_block_normal_requests(one_slot: Picker) -> None:
    for i in range(12):
        res = one_slot.stream(HOSTILE[i % len(HOSTILE)])
        assert res.code == grpc.StatusCode.INVALID_ARGUMENT, res
        assert "protocol violation" in res.details
    assert one_slot.gauges() == IDLE
    for _ in range(5):
        res = one_slot.stream(NORMAL)
        assert res.code == grpc.StatusCode.OK, res
        kinds = [r.WhichOneof("response") for r in res.responses]
        assert kinds == ["request_headers", "request_body", "response_headers", "response_body"], res
        assert _dest_md(res.responses[0]) == "127.0.0.1:1"
    assert one_slot.gauges() == IDLE
    violations = one_slot.server.metrics.extproc_protocol_errors
    assert sum(s.value for f in violations.collect() for s in f.samples if s.name.endswith("_total")) == 12
    assert not one_slot.errors.records


def test_an_abandoned_routed_stream_gives_its_slot_back(one_slot: Picker) -> None:
    # routed, then the client goes away without a response: the slot must come back
    res = one_slot.stream([_hdrs(POST), _body(CHAT, True)])
    assert _dest_md(res.responses[0]) == "127.0.0.1:1"
    assert one_slot.gauges() == IDLE
    assert one_slot.stream(NORMAL).code == grpc.StatusCode.OK


def test_queued_request_that_times_out_is_not_counted_as_running(one_slot: Picker) -> None:
    # Hold the only slot with a request whose response has not ended, then send another:
    # it waits in flow control and gets 503 at its TTL. Neither may leave a count behind.
    async def hold_and_queue() -> tuple[list[pb.ProcessingResponse], list[pb.ProcessingResponse]]:
        import asyncio

        release = asyncio.Event()

        async def holder():  # type: ignore[no-untyped-def]
            yield _hdrs(POST)
            yield _body(CHAT, True)
            await release.wait()

        first = one_slot.stub.Process(holder(), timeout=15)
        held = [await first.read(), await first.read()]  # routed: the slot is taken
        second = one_slot.stub.Process(iter([_hdrs(POST), _body(CHAT, True)]), timeout=15)
        queued = [r async for r in second]  # answered at the TTL (1 s)
        release.set()
        while (r := await first.read()) is not grpc.aio.EOF:
            held.append(r)
        return held, queued

    held, queued = one_slot.run(hold_and_queue())
    assert _dest_md(held[0]) == "127.0.0.1:1"
    assert queued[0].immediate_response.status.code == 503
    assert one_slot.gauges() == IDLE
