"""A do-nothing ext_proc server with the same message pattern as epp (the baseline for
"what does the picking itself cost").

FULL_DUPLEX_STREAMED both ways: holds the request headers answer until the body ends, routes
round robin (header + ``envoy.lb`` metadata, like epp), echoes the body as one streamed
chunk, passes response chunks through. No JSON parsing, no scoring, no metrics.
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


async def main(port: int, endpoints: list[str]) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalProcessorServicer_to_server(Noop(endpoints), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--endpoints", required=True)
    a = ap.parse_args()
    import uvloop

    uvloop.run(main(a.port, a.endpoints.split(",")))
