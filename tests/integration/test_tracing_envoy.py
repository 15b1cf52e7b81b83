"""OpenTelemetry tracing end to end: a real ``epp serve`` configured only by the standard OTEL_*
environment exports its spans over OTLP/gRPC to a collector (a tiny in-process one here that
records what it receives), for requests that went client → Envoy 1.40 → picker → pod.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from epp.local.topology import HOST
from tests.waiting import wait_until

from .conftest import Cluster
from .test_envoy_picker import chat, post

pytestmark = [pytest.mark.envoy]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
GATEWAY_SPAN = "b7ad6b7169203331"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver on 127.0.0.1 that keeps every span with its resource."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        self.server.start()

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method name
        with self._lock:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans.extend((resource, span) for span in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def in_trace(self, trace_id: str) -> list[tuple[dict[str, Any], Any]]:
        with self._lock:
            return [(r, s) for r, s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.stop(0)


@pytest.fixture(scope="module")
def traced_route(cluster: Cluster, collector: Collector) -> int:
    with pytest.MonkeyPatch.context() as mp:  # the picker's environment, nothing else
        mp.setenv("OTEL_TRACES_EXPORTER", "otlp")
        mp.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{HOST}:{collector.port}")
        mp.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        mp.setenv("OTEL_SERVICE_NAME", "epp-under-test")
        mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        picker = cluster.picker()
    return cluster.envoy(picker)


def _attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = getattr(v, v.WhichOneof("value"))
    return out


async def test_spans_join_the_gateways_trace(cluster: Cluster, collector: Collector, traced_route: int) -> None:
    status, headers, body = await post(traced_route, chat("traced request " * 10),
                                       {"traceparent": f"00-{TRACE_ID}-{GATEWAY_SPAN}-01"})
    assert status == 200, body
    names = {"epp.request", "epp.admission", "epp.scheduling", "epp.pick"}
    wait_until(lambda: names <= {s.name for _, s in collector.in_trace(TRACE_ID)},
               timeout=20, what=lambda: [s.name for _, s in collector.spans])
    spans = {s.name: (r, s) for r, s in collector.in_trace(TRACE_ID)}
    resource, root = spans["epp.request"]
    assert resource["service.name"] == "epp-under-test"
    assert root.parent_span_id.hex() == GATEWAY_SPAN
    for name in names - {"epp.request"}:
        assert spans[name][1].parent_span_id == root.span_id, name
    attrs = _attrs(root)
    assert attrs["http.response.status_code"] == 200
    served = f"{HOST}:{headers['x-inference-port']}"
    assert attrs["epp.destination"] == served and attrs["epp.served_endpoint"] == served
    assert _attrs(spans["epp.pick"][1])["epp.destination"] == served
