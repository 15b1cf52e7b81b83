"""A do-nothing ext_proc server with the same message pattern as epp (the baseline for
"what does the picking itself cost").

FULL_DUPLEX_STREAMED request body: holds the request headers answer until the body ends,
routes round robin (header + ``envoy.lb`` metadata, like epp), echoes the body as one
streamed chunk; response chunks are passed through when Envoy sends them (whatever response
body mode the Envoy config chose). No JSON parsing, no scoring, no metrics.

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
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.handlers import messages as msgs


class Noop(pb_grpc.ExternalProcessorServicer):
    def __init__(self, endpoints: list[str]) -> None:
        self.rr = itertools.cycle(endpoints)

    async def Process(
        self, it: AsyncIterator[pb.ProcessingRequest], ctx: object
    ) -> AsyncIterator[pb.ProcessingResponse]:
        body = bytearray()
        async for m in it:
            kind = m.WhichOneof("request")
            if kind == "request_body":
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
            elif kind == "response_headers":
                yield msgs.EMPTY_RESPONSE_HEADERS
            elif kind == "response_body":
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


async def main(port: int, endpoints: list[str], scrape_interval: float) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalProcessorServicer_to_server(Noop(endpoints), server)
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
    a = ap.parse_args()
    import uvloop

    uvloop.run(main(a.port, a.endpoints.split(","), a.scrape_interval))
