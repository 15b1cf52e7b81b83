"""A do-nothing ext_proc server with the same message pattern as epp (the baseline for
"what does the picking itself cost").

Whatever modes the Envoy config chose: FULL_DUPLEX_STREAMED request body: holds the request
headers answer until the body ends, routes round robin (header + ``envoy.lb`` metadata, like
epp), echoes the body as one streamed chunk; BUFFERED: routes on the body's answer; response
chunks are passed through when Envoy sends them. No JSON parsing, no scoring, no metrics.

It pays what epp pays besides the picking: with ``--scrape`` (the default) it runs epp's own
metric scraper over the same pods at the same interval, so "(c) epp vs (b) noop" compares
the request path, not "scrapes vs does not scrape".
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
from collections.abc import AsyncIterator

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.handlers import messages as msgs

BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


class Noop(pb_grpc.ExternalProcessorServicer):
    def __init__(self, endpoints: list[str], ask_json_body: bool = False) -> None:
        self.rr = itertools.cycle(endpoints)
        #: ask for a JSON response's body (BUFFERED) as epp's ``auto`` does for its usage
        self.ask_json_body = ask_json_body

    async def Process(
        self, it: AsyncIterator[pb.ProcessingRequest], ctx: object
    ) -> AsyncIterator[pb.ProcessingResponse]:
        body = bytearray()
        buffered = False  # the request body mode Envoy announced (first message)
        asked = False  # this response's body was asked for (answered as BUFFERED)
        async for m in it:
            kind = m.WhichOneof("request")
            if m.HasField("protocol_config"):
                buffered = m.protocol_config.request_body_mode == BUFFERED
            if kind == "request_body":
                if buffered:  # the whole body at once: the pick rides on its answer
                    dest = next(self.rr)
                    yield msgs.routed_buffered_body_response(dest, {"x-gateway-destination-endpoint": dest}, None)
                    continue
                body += m.request_body.body
                if m.request_body.end_of_stream:
                    dest = next(self.rr)
                    yield msgs.routed_headers_response(dest, {"x-gateway-destination-endpoint": dest})
                    for out in msgs.streamed_body_responses(body, request=True):
                        yield out
            elif kind == "request_headers":
                if m.request_headers.end_of_stream:
                    dest = next(self.rr)
                    yield msgs.routed_headers_response(dest, {"x-gateway-destination-endpoint": dest})
                elif buffered:
                    yield msgs.EMPTY_REQUEST_HEADERS
            elif kind == "response_headers":
                if self.ask_json_body and buffered and not any(
                        h.key == "content-type" and b"event-stream" in h.raw_value
                        for h in m.response_headers.headers.headers):
                    asked = True
                    yield msgs.ASK_RESPONSE_BODY[BUFFERED]
                else:
                    yield msgs.EMPTY_RESPONSE_HEADERS
            elif kind == "response_body":
                if asked:
                    yield msgs.EMPTY_RESPONSE_BODY
                else:
                    yield msgs.streamed_response_body(m.response_body.body, m.response_body.end_of_stream)
            elif kind == "request_trailers":
                yield msgs.EMPTY_REQUEST_TRAILERS
            elif kind == "response_trailers":
                yield msgs.EMPTY_RESPONSE_TRAILERS


async def _scraper(endpoints: list[str], interval: float) -> object:
    """epp's scraper over the pool, exactly as ``epp serve`` builds it by default."""
    from epp.datalayer.datastore import Datastore
    from epp.datalayer.scraper import MetricsScraper
    from epp.framework.datalayer import Endpoint, parse_hostport
    from epp.plugins.datalayer.core_metrics_extractor import CoreMetricsExtractor
    from epp.plugins.datalayer.metrics_data_source import MetricsDataSource

    ds = Datastore()
    eps = []
    for i, e in enumerate(endpoints):
        host, port = parse_hostport(e)
        eps.append(Endpoint(f"pod-{i}", host, port or 80))
    ds.replace_endpoints(eps)
    scraper = MetricsScraper(ds, source=MetricsDataSource("metrics-data-source"),
                             extractor=CoreMetricsExtractor("core-metrics-extractor"), interval=interval)
    await scraper.start()
    return scraper


async def main(port: int, endpoints: list[str], scrape_interval: float, ask_json_body: bool = False) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalProcessorServicer_to_server(Noop(endpoints, ask_json_body), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    scraper = await _scraper(endpoints, scrape_interval) if scrape_interval > 0 else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    if scraper is not None:
        await scraper.stop()  # type: ignore[attr-defined]
    await server.stop(1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--scrape-interval", type=float, default=0.05,
                    help="scrape the pods' /metrics like epp does (seconds; 0 = do not scrape)")
    ap.add_argument("--ask-json-body", action="store_true",
                    help="ask Envoy for each JSON response's body, as epp --response-processing auto does")
    a = ap.parse_args()
    import uvloop

    uvloop.run(main(a.port, a.endpoints.split(","), a.scrape_interval, a.ask_json_body))
