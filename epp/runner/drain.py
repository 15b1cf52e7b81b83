"""Graceful shutdown of ``epp serve``: what the picker does between SIGTERM and exit.

Envoy opens one ext_proc stream per HTTP request and keeps it for the whole response, so a
picker that stops its gRPC server at SIGTERM turns every new request into an HTTP 500 with an
empty body and cuts every response still streaming. Instead, on SIGTERM:

1. readiness (gRPC health ``readiness``, ``envoy.service.ext_proc.v3.ExternalProcessor``,
   ``""``) turns NOT_SERVING and an HA leader releases its Lease, so gateways and the
   Kubernetes endpoints stop choosing this picker (a standby takes over at once);
2. the picker keeps answering **new and running** streams, because a gateway needs a moment
   to notice (its health check interval, or EndpointSlice → xDS propagation);
3. the drain ends when no stream is open and none has started for ``idle`` seconds (the
   gateway has moved on), or when ``grace`` (``--shutdown-grace``) has passed since SIGTERM,
   or at a second SIGTERM/SIGINT;
4. then requests still waiting in flow control (or held for an empty pool) get a 503 JSON
   body, streams still open get ``grace_period`` more seconds, and everything stops.

A stream shorter than the grace is therefore never cut; one running past it is. In
Kubernetes the pod's ``preStop`` sleep runs before SIGTERM (the endpoint is removed while the
picker still serves normally) and ``terminationGracePeriodSeconds`` must cover preStop +
``--shutdown-grace`` + a few seconds of teardown (see docs/faults.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StreamTracker:
    """Open ext_proc streams and when the last one started (read by the drain)."""

    open: int = 0
    started: int = 0
    last_start: float = -math.inf


class CountingExtProc(pb_grpc.ExternalProcessorServicer):
    """The ext_proc service as registered on the gRPC server: the real servicer, plus the
    open-stream count the drain needs. One extra async-generator step per response message
    (well under a microsecond against ~70 µs of gRPC per message)."""

    def __init__(self, inner: pb_grpc.ExternalProcessorServicer, tracker: StreamTracker) -> None:
        self.inner = inner
        self.tracker = tracker

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        t = self.tracker
        t.open += 1
        t.started += 1
        t.last_start = time.monotonic()
        gen = self.inner.Process(request_iterator, context)
        try:
            async for out in gen:
                yield out
        finally:
            t.open -= 1
            # closed early (the RPC ended while we were suspended at yield): close the inner
            # stream now so it releases its request (in-flight counts) deterministically
            await gen.aclose()


@dataclass(slots=True)
class Drain:
    """The drain's clock and its early exit (a second signal)."""

    grace: float
    idle: float
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    poll: float = 0.1

    async def wait(self, tracker: StreamTracker) -> str:
        """Serve on until idle, the grace or a cut; returns which ended it."""
        start = time.monotonic()
        deadline = start + self.grace
        report = start + 10.0
        while True:
            now = time.monotonic()
            if self.cut.is_set():
                return "signal"
            if now >= deadline:
                return "grace"
            if tracker.open == 0 and now - max(start, tracker.last_start) >= self.idle:
                return "idle"
            if now >= report:
                report = now + 10.0
                log.info("draining: %d ext_proc streams open, %.0fs of the grace left",
                         tracker.open, deadline - now)
            try:
                async with asyncio.timeout(self.poll):
                    await self.cut.wait()
            except TimeoutError:
                pass
