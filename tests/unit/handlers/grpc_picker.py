"""An in-process ``epp serve`` (``PickerServer``) on 127.0.0.1 with its own event loop in a
thread, and a grpc.aio ext_proc client: gRPC-level tests drive real streams against it from
plain (synchronous) tests, hypothesis included, each call bounded by a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.discovery.static import StaticDiscovery
from epp.runner.server import PickerServer, ServeOptions

T = TypeVar("T")


@dataclass(slots=True)
class StreamResult:
    responses: list[pb.ProcessingResponse]
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


class _ErrorLog(logging.Handler):
    """Records ERROR logs of the picker (a traceback means an internal error)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Picker:
    """A running picker: its server object, its loop, an ext_proc stub, its error log."""

    def __init__(self, server: PickerServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.stub: Any = None
        self.errors = _ErrorLog()

    def __repr__(self) -> str:
        return f"Picker(grpc port {self.server.bound_ports.get('grpc')})"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stream(self, messages: Iterable[pb.ProcessingRequest], timeout: float = 15.0) -> StreamResult:
        """Send every message (stopping early if the picker ends the stream), half-close, and
        read until the picker ends it. Uses the read/write API: with an iterator, grpc.aio
        reports a write that raced the server's end as INTERNAL instead of the server's status."""
        msgs = list(messages)

        async def go() -> StreamResult:
            call = self.stub.Process(timeout=timeout)
            out: list[pb.ProcessingResponse] = []

            async def read() -> None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    while (r := await call.read()) is not grpc.aio.EOF:
                        out.append(r)

            reader = asyncio.ensure_future(read())
            try:
                for m in msgs:
                    if call.done():
                        break
                    await call.write(m)
                if not call.done():
                    await call.done_writing()
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                pass  # the picker ended the stream while we were still sending
            await reader
            return StreamResult(out, await call.code(), await call.details() or "")

        return self.run(go(), timeout + 5)

    def violations(self) -> float:
        """Streams the picker ended as protocol violations so far."""

        async def read() -> float:
            c = self.server.metrics.extproc_protocol_errors
            return sum(x.value for f in c.collect() for x in f.samples if x.name.endswith("_total"))

        return self.run(read())

    def gauges(self) -> dict[str, float]:
        """In-flight counts: endpoints, the running gauges (sum and minimum), demand."""

        async def read() -> dict[str, float]:
            s = self.server
            eps = s.datastore.endpoints()
            running = [x.value for f in s.metrics.running_requests.collect() for x in f.samples]
            demand = {x.labels["state"]: x.value for f in s.metrics.fc_demand.collect() for x in f.samples}
            return {
                "inflight": sum(e.inflight for e in eps),
                "inflight_tokens": sum(e.inflight_tokens for e in eps),
                "running": sum(running),
                "running_min": min(running, default=0.0),
                "demand_inflight": demand.get("inflight", 0.0),
                "demand_queued": demand.get("queued", 0.0),
            }

        return self.run(read())


IDLE = {"inflight": 0, "inflight_tokens": 0, "running": 0.0, "running_min": 0.0, "demand_inflight": 0.0,
        "demand_queued": 0.0}


@contextmanager
def picker(endpoints: str, config_text: str | None = None, **opts: Any) -> Iterator[Picker]:
    """A started picker for ``endpoints`` (``ip:port,...``); stopped on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-picker-loop", daemon=True)
    thread.start()
    server = PickerServer(ServeOptions(
        discovery=StaticDiscovery.from_endpoints_flag(endpoints), grpc_port=0, grpc_health_port=0,
        metrics_port=-1, bind_address="127.0.0.1", secure_serving=False, config_text=config_text, **opts,
    ))
    p = Picker(server, loop)
    epp_log = logging.getLogger("epp")
    epp_log.addHandler(p.errors)
    channel: Any = None
    try:
        p.run(server.start(), 30)

        async def connect() -> Any:
            return grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_ports['grpc']}")

        channel = p.run(connect())
        p.stub = pb_grpc.ExternalProcessorStub(channel)
        yield p
    finally:
        epp_log.removeHandler(p.errors)
        try:
            if channel is not None:
                p.run(channel.close(), 10)
            p.run(server.stop(), 30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
